"""The generation set: DDIM samples from the full model, one fixed generator seed per image.

A class-conditional kind (`num_classes` set) generates image i of class i mod num_classes, recorded in
the store's `labels` attribute (`data.load_labels`); an unconditional kind's images have no labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from .device import device_name, precision
from .models import DiffusionModel, load_model
from .progress import Progress
from .storage import file_sha256, write_array


def ddim_scheduler(model: DiffusionModel, steps: int) -> DDIMScheduler:
    """The generation set's sampler: DDIM on the model's DDPM schedule, `steps` steps."""
    ddim = DDIMScheduler.from_config(model.scheduler.config)
    ddim.set_timesteps(steps)
    return ddim


def generation_labels(model: DiffusionModel, n: int) -> np.ndarray | None:
    """The class of each of the n generated images: i mod num_classes; None for an unconditional kind."""
    return None if model.num_classes is None else np.arange(n, dtype=np.int64) % model.num_classes


@torch.no_grad()
def denoise(model: DiffusionModel, ddim: DDIMScheduler, index, shape, eta: float, seed: int,
            device: torch.device = torch.device("cpu"), dtype: str = "fp32", keep_states: bool = False,
            labels: np.ndarray | None = None):
    """Images `index` of the generation set, (B, ...) decoded and clamped to [-1, 1], conditioned on
    their `labels` (B,), and with `keep_states` also their trajectories: (B, S, ...) fp32, the
    sampler's input x_t at each of its S steps (at t = ddim.timesteps[s]), in the diffusion space.

    Image i draws all its randomness from a CPU generator seeded with seed + i: independent of the
    batch, and the same draws on any device. The UNet runs in precision `dtype`, the sampler in fp32.
    """
    gens = [torch.Generator().manual_seed(int(seed) + int(i)) for i in index]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    cond = model.conditioning(None if labels is None else torch.as_tensor(labels, device=device))
    states = []
    for t in ddim.timesteps:
        if keep_states:
            states.append(x)
        with precision(dtype, device):
            pred = model.predict(x, t.expand(len(x)), cond).float()
        # with eta > 0 each image draws its step noise from its own generator too
        variance_noise = (torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                          if eta > 0 else None)
        x = ddim.step(pred, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    images = model.decode(x).clamp(-1, 1)
    if keep_states:
        return images, torch.stack(states, dim=1)
    return images


def sample(model: DiffusionModel, n: int, shape, steps: int, eta: float, seed: int,
           batch_size: int, device: torch.device = torch.device("cpu"), dtype: str = "fp32",
           labels: np.ndarray | None = None) -> np.ndarray:
    """The n images of the generation set (see `denoise`; image i of class labels[i]), computed
    `batch_size` at a time."""
    ddim = ddim_scheduler(model, steps)
    model.to(device).train(False)
    out, progress = [], Progress(n, "generated images")
    for start in range(0, n, batch_size):
        out.append(denoise(model, ddim, range(start, min(n, start + batch_size)), shape, eta, seed, device, dtype,
                           labels=None if labels is None else labels[start:start + batch_size]).cpu().numpy())
        progress.step(len(out[-1]))
    return np.concatenate(out).astype(np.float32)


def generate_set(weights_path, model_spec: dict, spec: dict, out_path,
                 device: torch.device = torch.device("cpu")) -> None:
    model = load_model(model_spec, Path(weights_path).parent)
    dtype, labels = spec.get("dtype", "fp32"), generation_labels(model, int(spec["n"]))
    images = sample(model, int(spec["n"]), model.latent_shape(), int(spec["steps"]), float(spec["eta"]),
                    int(spec["seed"]), int(spec["batch_size"]), device, dtype, labels)
    attrs = {} if labels is None else {"labels": labels.tolist(), "labels_rule": "i mod num_classes"}
    write_array(out_path, images, {"split": "gen", "model_sha256": file_sha256(weights_path),
                                   "sampler": "DDIM", **spec, "dtype": dtype,
                                   "device": device_name(device), **attrs})
