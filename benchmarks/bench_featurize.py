"""Featurization: ours (`batch_gradients`: one backward of the mean over each sample's K noised copies,
vmapped over samples) against the paper's code path (for each timestep, per-sample gradients by
vmap(grad(functional_call)) over the batch; summed over timesteps, divided by K), fp32, same noise."""
from __future__ import annotations

import numpy as np
import torch

from diffattr.config import select_timesteps
from diffattr.featurize import batch_gradients, gradient_dim
from diffattr.functions import model_output
from diffattr.noise import noise_batch
from harness import max_rel_diff, median_time, row
from presets import preset_model

NOISE_SEED, FUNCTION, TOL = 0, "square", 1e-5
# (preset, samples, K, repeats): the default model at its featurize batch size; a few cifar2 samples
FULL = [("default", 50, 10, 5), ("cifar2", 2, 10, 3)]
TINY = [("tiny", 3, 4, 1)]


def reference_gradients(model, images, indices, function, timesteps, noise_seed) -> torch.Tensor:
    """(B, p): per timestep, vmap over samples of the gradient of f(one sample, t); mean over t."""
    params = {name: p.detach() for name, p in model.featurized_parameters()}

    def value(params, x_t, t, eps):
        pred = model.eps_with(params, x_t[None], t[None])
        return model_output(function, pred, eps[None], t[None], model.scheduler)[0]

    per_sample_grad = torch.func.vmap(torch.func.grad(value), in_dims=(None, 0, 0, 0))
    total = torch.zeros(len(images), sum(p.numel() for p in params.values()))
    for t in timesteps:
        t_batch = torch.full((len(images),), t)
        eps = noise_batch([(noise_seed, int(i), t) for i in indices], images.shape[1:])
        x_t = model.scheduler.add_noise(images, eps, t_batch)
        grads = per_sample_grad(params, x_t, t_batch, eps)
        total += torch.cat([grads[name].reshape(len(images), -1) for name in params], dim=1)
    return total / len(timesteps)


def loop_gradients(model, images, indices, function, timesteps, noise_seed) -> torch.Tensor:
    """A candidate for `batch_gradients` (not in featurize.py): a plain loop over samples, each one
    backward of the mean over its K noised copies, with ordinary autograd (no vmap)."""
    params = [p for _, p in model.featurized_parameters()]
    t = torch.tensor(list(timesteps))
    rows = []
    for image, index in zip(images, indices):
        eps = noise_batch([(noise_seed, int(index), int(s)) for s in t], image.shape)
        x_t = model.scheduler.add_noise(image.expand(len(t), *image.shape), eps, t)
        value = model_output(function, model.eps(x_t, t), eps, t, model.scheduler).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def run(full: bool) -> list[dict]:
    rows = []
    for preset, n, k, repeats in FULL if full else TINY:
        model, settings = preset_model(preset)
        size = settings["model"]["unet"]["sample_size"]
        channels = settings["model"]["unet"]["in_channels"]
        images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (n, channels, size, size))
                                  .astype(np.float32))
        timesteps = select_timesteps(k, "uniform")
        args = (model, images, range(n), FUNCTION, timesteps, NOISE_SEED)
        for engine in (batch_gradients, reference_gradients, loop_gradients):  # first-call costs
            engine(model, images[:1], [0], FUNCTION, timesteps[:1], NOISE_SEED)
        ours_s, ours = median_time(lambda: batch_gradients(*args), repeats)
        ref_s, ref = median_time(lambda: reference_gradients(*args), repeats)
        loop_s, loop = median_time(lambda: loop_gradients(*args), repeats)
        case = f"{preset} p={gradient_dim(model)} B={n} K={k}"
        rows.append(row("featurize", case, ours_s, ref_s, max_rel_diff(ours.numpy(), ref.numpy()), TOL,
                        f"ours {n / ours_s:.2g} samples/s"))
        rows.append(row("featurize: loop candidate", case, loop_s, ref_s,
                        max_rel_diff(loop.numpy(), ref.numpy()), TOL,
                        f"{n / loop_s:.2g} samples/s; not in featurize.py"))
    return rows
