"""Features: per-sample gradients of a model-output function, averaged over K timesteps, projected.

g(x) = (1/K) sum_t grad_theta f(x, t, eps_t). The K noised copies of one sample go through the
network as one batch and the mean of their f values is differentiated once: the same average as K
separate backward passes (the network treats batch items independently in eval mode).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from .data import load_images
from .functions import model_output
from .models import DiffusionModel, load_model
from .noise import noise_batch
from .project import make_projector
from .storage import array_sha256, atomic_output, file_sha256


def sample_gradient(model: DiffusionModel, image: torch.Tensor, index: int, function: str,
                    timesteps, noise_seed: int, label=None) -> torch.Tensor:
    """Flat fp32 gradient (p,) of (1/K) sum_t f(image, t, eps(noise_seed, index, t))."""
    params = [p for _, p in model.featurized_parameters()]
    t = torch.tensor(list(timesteps))
    latent = model.latents(image[None])
    x0 = latent.expand(len(t), *latent.shape[1:])
    eps = noise_batch([(noise_seed, index, int(s)) for s in t], x0.shape[1:])
    cond = model.conditioning(None if label is None else torch.tensor([label] * len(t)))
    pred = model.eps(model.scheduler.add_noise(x0, eps, t), t, cond)
    value = model_output(function, pred, eps, t, model.scheduler).mean()
    grads = torch.autograd.grad(value, params)
    return torch.cat([g.reshape(-1) for g in grads]).float()


def gradient_dim(model: DiffusionModel) -> int:
    return sum(p.numel() for _, p in model.featurized_parameters())


def features(model: DiffusionModel, images: np.ndarray, function: str, timesteps, noise_seed: int,
             projector, batch_size: int):
    """Yield (start, projected features of rows start..start+len) for batches of samples."""
    model.train(False)
    for start in range(0, len(images), batch_size):
        stop = min(len(images), start + batch_size)
        grads = torch.stack([
            sample_gradient(model, torch.from_numpy(images[i]), i, function, timesteps, noise_seed)
            for i in range(start, stop)])
        yield start, projector.project(grads, model_id=0).float().numpy()


def featurize_split(weights_path, model_spec: dict, images_path, function: str, timesteps,
                    proj_dim: int, spec: dict, out_path) -> None:
    """Projected features of every image of a split, written in row chunks with their provenance."""
    model = load_model(model_spec, Path(weights_path).parent)
    images = load_images(images_path)
    batch_size = int(spec["batch_size"])
    projector, projector_info = make_projector(gradient_dim(model), proj_dim, int(spec["proj_seed"]),
                                               torch.device("cpu"), batch_size)
    attrs = {"model_sha256": file_sha256(weights_path), "function": function,
             "K": len(timesteps), "timesteps": list(timesteps), "scheme": spec["scheme"],
             "noise_seed": int(spec["noise_seed"]), "dtype": "float32",
             "query_sha256": array_sha256(images), "torch": torch.__version__, **projector_info}
    with atomic_output(out_path) as tmp:
        array = zarr.create_array(tmp, shape=(len(images), proj_dim), dtype="float32",
                                  chunks=(batch_size, proj_dim))
        array.attrs.update(attrs)
        for start, rows in features(model, images, function, timesteps, int(spec["noise_seed"]),
                                    projector, batch_size):
            array[start:start + len(rows)] = rows
