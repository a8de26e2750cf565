"""Ground truth: each query's L_Simple under one model, averaged over timesteps x noise seeds."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import zarr

from .config import select_timesteps
from .data import load_images
from .device import device_name, precision
from .models import DiffusionModel, load_model
from .noise import noise_batch
from .storage import array_sha256, atomic_output, file_sha256


@torch.no_grad()
def loss_simple(model: DiffusionModel, images: np.ndarray, timesteps, noise_seeds,
                batch_size: int, device: torch.device = torch.device("cpu"), dtype: str = "fp32") -> np.ndarray:
    """(n,) float64: mean over (t, seed) of mean_pixels (eps_theta(x_t, t) - eps)^2.

    The noise of (query, t, seed) comes from `noise.gaussian`, so batching never changes it. The
    UNet runs in precision `dtype` (`diffattr.device.precision`); the loss is taken in fp32.
    """
    model.to(device).train(False)
    triples = list(itertools.product(noise_seeds, range(len(images)), timesteps))
    totals = np.zeros(len(images), dtype=np.float64)
    for start in range(0, len(triples), batch_size):
        chunk = triples[start:start + batch_size]
        index = np.array([i for _, i, _ in chunk])
        t = torch.tensor([t for _, _, t in chunk], device=device)
        x0 = model.latents(torch.from_numpy(images[index]).to(device))
        eps = noise_batch(chunk, x0.shape[1:]).to(device)
        with precision(dtype, device):
            pred = model.eps(model.scheduler.add_noise(x0, eps, t), t, model.conditioning(None)).float()
        np.add.at(totals, index, (pred - eps).pow(2).flatten(1).mean(1).double().cpu().numpy())
    return totals / (len(timesteps) * len(noise_seeds))


def compute_and_save(weights_path, model_spec: dict, query_paths: dict, spec: dict, out_path,
                     device: torch.device = torch.device("cpu")) -> None:
    """One store per model: an array of per-query losses for each query split."""
    model = load_model(model_spec, Path(weights_path).parent)
    timesteps = select_timesteps(int(spec["timesteps"]), "uniform", model.scheduler.config.num_train_timesteps)
    dtype = spec.get("dtype", "fp32")
    attrs = {"model_sha256": file_sha256(weights_path), "timesteps": timesteps,
             "noise_seeds": list(spec["noise_seeds"]), "function": "simple", "dtype": dtype,
             "device": device_name(device)}
    with atomic_output(out_path) as tmp:
        group = zarr.open_group(tmp, mode="w")
        group.attrs.update(attrs)
        for split, path in query_paths.items():
            images = load_images(path)
            losses = loss_simple(model, images, timesteps, spec["noise_seeds"], int(spec["batch_size"]),
                                 device, dtype)
            array = group.create_array(split, shape=losses.shape, dtype=losses.dtype)
            array[...] = losses
            array.attrs["query_sha256"] = array_sha256(images)

