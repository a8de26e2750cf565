"""Featurization: ours (`batch_gradients`: one ordinary backward pass over every sample's K noised
copies, split by sample at each layer by per_sample's hooks; and its vmap engine) against the paper's
code path (for each timestep, per-sample gradients by vmap(grad(functional_call)) over the batch;
summed over timesteps, divided by K), fp32, same noise. A floor row times an ordinary batched
forward and backward pass (one gradient for the whole batch): no engine doing the same arithmetic
can be faster, so its ratio bounds what any engine can reach on the machine."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from diffattr.protocol import select_timesteps
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
        pred = model.predict_with(params, x_t[None], t[None])
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


def floor_gradient(model, images, indices, function, timesteps, noise_seed) -> torch.Tensor:
    """(p,): the gradient of the sum over samples of their mean f over the K noised copies, by one
    ordinary forward and backward pass over the B x K copies: the sum of the reference's rows."""
    params = [p for _, p in model.featurized_parameters()]
    t = torch.tensor(list(timesteps), device=images.device).repeat(len(images))
    eps = noise_batch([(noise_seed, int(i), int(s)) for i in indices for s in timesteps],
                      images.shape[1:]).to(images.device)
    x_t = model.scheduler.add_noise(images.repeat_interleave(len(timesteps), 0), eps, t)
    value = model_output(function, model.predict(x_t, t), eps, t, model.scheduler).sum() / len(timesteps)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


def backward_flops(model, images, timesteps) -> float:
    """FLOPs of one ordinary forward and backward pass over the B x K noised copies (torch's counter:
    matmuls and convolutions): the work any engine must do, whatever its per-sample bookkeeping."""
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.tensor(list(timesteps), device=images.device).repeat(len(images))
    x_t = images.repeat_interleave(len(timesteps), 0)
    with FlopCounterMode(display=False) as counter:
        model.predict(x_t, t).square().mean().backward()
    model.unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def throughput(n: int, seconds: float, flops: float, device: torch.device, cpu_rate: float | None = None) -> str:
    """Samples/s and FLOP rate, against the GPU's fp32 peak or `cpu_rate` (TFLOP/s, when given)."""
    note = f"ours {n / seconds:.3g} samples/s, {flops / seconds / 1e12:.3g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in FP32_PEAK_TFLOPS.items() if k in name), None)
        note += f" on {name}" + ("" if peak is None else f" ({100 * flops / seconds / 1e12 / peak:.1f}% of fp32 peak)")
    elif cpu_rate is not None:
        note += f" ({100 * flops / seconds / 1e12 / cpu_rate:.0f}% of a large fp32 matmul's rate here)"
    return note


def matmul_tflops(size: int = 4096, repeats: int = 3) -> float:
    """TFLOP/s of an fp32 (size x size) matmul on the CPU: what its arithmetic can reach in practice."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    seconds, _ = median_time(lambda: a @ b, repeats)
    return 2 * size ** 3 / seconds / 1e12


def timed(fn, repeats: int, device: torch.device):
    """`median_time`, and on a GPU the peak memory the calls allocated beyond what was held before (a
    note for the table)."""
    if device.type != "cuda":
        return *median_time(fn, repeats), ""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds, result = median_time(fn, repeats)
    return seconds, result, f", peak {(torch.cuda.max_memory_allocated(device) - before) / 2**30:.1f} GiB"


def run(full: bool, device: torch.device = torch.device("cpu")) -> list[dict]:
    rows = []
    cpu_rate = matmul_tflops() if full and device.type == "cpu" else None
    for preset, n, k, repeats in FULL[device.type] if full else TINY:
        model, settings = preset_model(preset)
        model.to(device)
        size = settings["model"]["unet"]["sample_size"]
        channels = settings["model"]["unet"]["in_channels"]
        images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (n, channels, size, size))
                                  .astype(np.float32)).to(device)
        timesteps = select_timesteps(k, "uniform")
        args = (model, images, range(n), FUNCTION, timesteps, NOISE_SEED)
        vmap_gradients = partial(batch_gradients, engine="vmap")
        for engine in (batch_gradients, vmap_gradients, reference_gradients, floor_gradient):  # first calls
            engine(model, images[:1], [0], FUNCTION, timesteps[:1], NOISE_SEED)
        with precision("fp32", device):
            ours_s, ours, ours_mem = timed(lambda: batch_gradients(*args), repeats, device)
            vmap_s, vmap, vmap_mem = timed(lambda: vmap_gradients(*args), repeats, device)
            ref_s, ref, _ = timed(lambda: reference_gradients(*args), repeats, device)
            floor_s, floor, _ = timed(lambda: floor_gradient(*args), repeats, device)
            flops = backward_flops(model, images, timesteps)
        case = f"{preset} p={gradient_dim(model)} B={n} K={k}" + ("" if device.type == "cpu" else f" {device.type}")
        rows.append(row("featurize", case, ours_s, ref_s, max_rel_diff(ours.cpu().numpy(), ref.cpu().numpy()),
                        TOL, throughput(n, ours_s, flops, device, cpu_rate) + ours_mem))
        rows.append(row("featurize: vmap engine", case, vmap_s, ref_s,
                        max_rel_diff(vmap.cpu().numpy(), ref.cpu().numpy()), TOL,
                        f"{n / vmap_s:.3g} samples/s{vmap_mem}; where a layer has no per_sample rule"))
        rows.append(row("featurize: floor", case, floor_s, ref_s,
                        max_rel_diff(floor.cpu().numpy(), ref.sum(0).cpu().numpy()), TOL,
                        "one batch gradient, no per-sample split (compared with the sum of the rows): "
                        "no engine's ratio can exceed this one's"))
    return rows
