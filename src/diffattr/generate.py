"""The generation set: DDIM samples from the full model, one fixed generator seed per image.

A latent kind's generation set holds its latents (what attribution reads); `decode_set` writes their
images beside them (what the pixel / CLIP baselines and the galleries read).

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
from .protocol import DEFAULT_DTYPE, stage_dtype
from .progress import Progress
from .storage import array_sha256, file_sha256, read_array, write_array


def ddim_scheduler(model: DiffusionModel, steps: int) -> DDIMScheduler:
    """The generation set's sampler: DDIM on the model's DDPM schedule, `steps` steps."""
    ddim = DDIMScheduler.from_config(model.scheduler.config)
    ddim.set_timesteps(steps)
    return ddim


def guidance_scale(spec: dict) -> float:
    """generate.guidance_scale: classifier-free guidance's w (1: none, the pixel presets')."""
    return float(spec.get("guidance_scale", 1.0))


def generation_labels(model: DiffusionModel, n: int) -> np.ndarray | None:
    """The class of each of the n generated images: i mod num_classes; None for an unconditional kind."""
    return None if model.num_classes is None else np.arange(n, dtype=np.int64) % model.num_classes


@torch.no_grad()
def denoise(model: DiffusionModel, ddim: DDIMScheduler, index, shape, eta: float, seed: int,
            device: torch.device = torch.device("cpu"), dtype: str = DEFAULT_DTYPE, keep_states: bool = False,
            labels: np.ndarray | None = None, guidance: float = 1.0):
    """Samples `index` of the generation set (B, ...) as a split's store holds them (`stored`),
    conditioned on their `labels` (B,), and with `keep_states` also their trajectories: (B, S, ...)
    fp32, the sampler's input x_t at each of its S steps (at t = ddim.timesteps[s]), in the diffusion space.

    Image i draws all its randomness from a CPU generator seeded with seed + i: independent of the
    batch, and the same draws on any device. The UNet runs in precision `dtype`, the sampler in fp32.
    With `guidance` w != 1, the prediction is classifier-free guidance's u + w (c - u), c conditioned
    on the labels and u on nothing (`DiffusionModel.unconditional`), both from one batch.
    """
    gens = [torch.Generator().manual_seed(int(seed) + int(i)) for i in index]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    cond = model.conditioning(None if labels is None else torch.as_tensor(labels, device=device))
    if guidance != 1:
        cond = torch.cat([model.unconditional(len(x)).to(cond.device), cond])
    states = []
    for t in ddim.timesteps:
        if keep_states:
            states.append(x)
        with precision(dtype, device):
            if guidance == 1:
                pred = model.predict(x, t.expand(len(x)), cond).float()
            else:
                free, conditioned = model.predict(torch.cat([x, x]), t.expand(2 * len(x)), cond).float().chunk(2)
                pred = free + guidance * (conditioned - free)
        # with eta > 0 each image draws its step noise from its own generator too
        variance_noise = (torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                          if eta > 0 else None)
        x = ddim.step(pred, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    samples = stored(model, x)
    if keep_states:
        return samples, torch.stack(states, dim=1)
    return samples


def stored(model: DiffusionModel, x0: torch.Tensor) -> torch.Tensor:
    """A generated sample as a split's store holds it: the decoded image clamped to [-1, 1], or the
    latent itself for a kind that `stores_latents` (its images: `decode_images`)."""
    return x0 if model.stores_latents else model.decode(x0).clamp(-1, 1)


@torch.no_grad()
def decode_images(model: DiffusionModel, samples: np.ndarray, batch_size: int,
                  device: torch.device = torch.device("cpu")) -> np.ndarray:
    """A latent kind's stored samples -> images in [-1, 1], float32 (the baselines' and galleries' view)."""
    model.to(device).train(False)
    return np.concatenate([model.decode(torch.from_numpy(samples[i:i + batch_size]).to(device)).clamp(-1, 1).cpu()
                           .numpy() for i in range(0, len(samples), batch_size)]).astype(np.float32)


def sample(model: DiffusionModel, n: int, shape, steps: int, eta: float, seed: int,
           batch_size: int, device: torch.device = torch.device("cpu"), dtype: str = DEFAULT_DTYPE,
           labels: np.ndarray | None = None, guidance: float = 1.0) -> np.ndarray:
    """The n images of the generation set (see `denoise`; image i of class labels[i]), computed
    `batch_size` at a time."""
    ddim = ddim_scheduler(model, steps)
    model.to(device).train(False)
    out, progress = [], Progress(n, "generated images")
    for start in range(0, n, batch_size):
        out.append(denoise(model, ddim, range(start, min(n, start + batch_size)), shape, eta, seed, device, dtype,
                           labels=None if labels is None else labels[start:start + batch_size],
                           guidance=guidance).cpu().numpy())
        progress.step(len(out[-1]))
    return np.concatenate(out).astype(np.float32)


def generate_set(weights_path, model_spec: dict, spec: dict, out_path,
                 device: torch.device = torch.device("cpu")) -> None:
    model = load_model(model_spec, Path(weights_path).parent)
    dtype, labels = stage_dtype(spec), generation_labels(model, int(spec["n"]))
    images = sample(model, int(spec["n"]), model.latent_shape(), int(spec["steps"]), float(spec["eta"]),
                    int(spec["seed"]), int(spec["batch_size"]), device, dtype, labels, guidance_scale(spec))
    attrs = {} if labels is None else {"labels": labels.tolist(), "labels_rule": "i mod num_classes"}
    write_array(out_path, images, {"split": "gen", "model_sha256": file_sha256(weights_path),
                                   "sampler": "DDIM", **spec, "dtype": dtype,
                                   "device": device_name(device), **attrs})


def decode_set(samples_path, weights_path, model_spec: dict, out_path, batch_size: int,
               device: torch.device = torch.device("cpu")) -> None:
    """The images of a latent kind's generation set (`decode_images`), labels and provenance kept."""
    model = load_model(model_spec, Path(weights_path).parent)
    samples, attrs = read_array(samples_path)
    write_array(out_path, decode_images(model, samples, batch_size, device),
                {**attrs, "decoded_from": str(samples_path), "samples_sha256": array_sha256(samples)})
