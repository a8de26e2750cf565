"""Featurization: ours (`batch_gradients`: one backward of the mean over each sample's K noised copies,
vmapped over samples) against the paper's code path (for each timestep, per-sample gradients by
vmap(grad(functional_call)) over the batch; summed over timesteps, divided by K), fp32, same noise."""
from __future__ import annotations

import numpy as np
import torch

from diffattr.config import select_timesteps
from diffattr.device import precision
from diffattr.featurize import batch_gradients, gradient_dim
from diffattr.functions import model_output
from diffattr.noise import noise_batch
from harness import max_rel_diff, median_time, row
from presets import preset_model

NOISE_SEED, FUNCTION, TOL = 0, "square", 1e-5
# (preset, samples, K, repeats): the default model at its featurize batch size; a few cifar2 samples
# on a CPU, the cifar2 preset's featurize batch size on a GPU
FULL = {"cpu": [("default", 50, 10, 5), ("cifar2", 2, 10, 3)],
        "cuda": [("default", 50, 10, 5), ("cifar2", 32, 10, 3)]}
TINY = [("tiny", 3, 4, 1)]
# Dense fp32 peak (no tensor cores) of the GPUs this was run on, from NVIDIA's data sheets (SXM)
FP32_PEAK_TFLOPS = {"H100": 67.0, "H200": 67.0, "A100": 19.5}


def reference_gradients(model, images, indices, function, timesteps, noise_seed) -> torch.Tensor:
    """(B, p): per timestep, vmap over samples of the gradient of f(one sample, t); mean over t."""
    params = {name: p.detach() for name, p in model.featurized_parameters()}

    def value(params, x_t, t, eps):
        pred = model.eps_with(params, x_t[None], t[None])
        return model_output(function, pred, eps[None], t[None], model.scheduler)[0]

    per_sample_grad = torch.func.vmap(torch.func.grad(value), in_dims=(None, 0, 0, 0))
    total = torch.zeros(len(images), sum(p.numel() for p in params.values()), device=images.device)
    for t in timesteps:
        t_batch = torch.full((len(images),), t, device=images.device)
        eps = noise_batch([(noise_seed, int(i), t) for i in indices], images.shape[1:]).to(images.device)
        x_t = model.scheduler.add_noise(images, eps, t_batch)
        grads = per_sample_grad(params, x_t, t_batch, eps)
        total += torch.cat([grads[name].reshape(len(images), -1) for name in params], dim=1)
    return total / len(timesteps)


def loop_gradients(model, images, indices, function, timesteps, noise_seed) -> torch.Tensor:
    """A candidate for `batch_gradients` (not in featurize.py): a plain loop over samples, each one
    backward of the mean over its K noised copies, with ordinary autograd (no vmap)."""
    params = [p for _, p in model.featurized_parameters()]
    t = torch.tensor(list(timesteps), device=images.device)
    rows = []
    for image, index in zip(images, indices):
        eps = noise_batch([(noise_seed, int(index), int(s)) for s in t], image.shape).to(images.device)
        x_t = model.scheduler.add_noise(image.expand(len(t), *image.shape), eps, t)
        value = model_output(function, model.eps(x_t, t), eps, t, model.scheduler).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def backward_flops(model, images, timesteps) -> float:
    """FLOPs of one ordinary forward and backward pass over the B x K noised copies (torch's counter:
    matmuls and convolutions): the work any engine must do, whatever its per-sample bookkeeping."""
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.tensor(list(timesteps), device=images.device).repeat(len(images))
    x_t = images.repeat_interleave(len(timesteps), 0)
    with FlopCounterMode(display=False) as counter:
        model.eps(x_t, t).square().mean().backward()
    model.unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def throughput(n: int, seconds: float, flops: float, device: torch.device) -> str:
    note = f"ours {n / seconds:.3g} samples/s, {flops / seconds / 1e12:.3g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in FP32_PEAK_TFLOPS.items() if k in name), None)
        note += f" on {name}" + ("" if peak is None else f" ({100 * flops / seconds / 1e12 / peak:.1f}% of fp32 peak)")
    return note


def run(full: bool, device: torch.device = torch.device("cpu")) -> list[dict]:
    rows = []
    for preset, n, k, repeats in FULL[device.type] if full else TINY:
        model, settings = preset_model(preset)
        model.to(device)
        size = settings["model"]["unet"]["sample_size"]
        channels = settings["model"]["unet"]["in_channels"]
        images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (n, channels, size, size))
                                  .astype(np.float32)).to(device)
        timesteps = select_timesteps(k, "uniform")
        args = (model, images, range(n), FUNCTION, timesteps, NOISE_SEED)
        for engine in (batch_gradients, reference_gradients, loop_gradients):  # first-call costs
            engine(model, images[:1], [0], FUNCTION, timesteps[:1], NOISE_SEED)
        with precision("fp32", device):
            ours_s, ours = median_time(lambda: batch_gradients(*args), repeats)
            ref_s, ref = median_time(lambda: reference_gradients(*args), repeats)
            loop_s, loop = median_time(lambda: loop_gradients(*args), repeats)
            flops = backward_flops(model, images, timesteps)
        case = f"{preset} p={gradient_dim(model)} B={n} K={k}" + ("" if device.type == "cpu" else f" {device.type}")
        rows.append(row("featurize", case, ours_s, ref_s, max_rel_diff(ours.cpu().numpy(), ref.cpu().numpy()),
                        TOL, throughput(n, ours_s, flops, device)))
        rows.append(row("featurize: loop candidate", case, loop_s, ref_s,
                        max_rel_diff(loop.cpu().numpy(), ref.cpu().numpy()), TOL,
                        f"{n / loop_s:.3g} samples/s; not in featurize.py"))
    return rows
