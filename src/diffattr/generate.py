"""The generation set: DDIM samples from the full model, one fixed generator seed per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from .models import DiffusionModel, load_model
from .storage import file_sha256, write_array


@torch.no_grad()
def sample(model: DiffusionModel, n: int, shape, steps: int, eta: float, seed: int,
           batch_size: int) -> np.ndarray:
    """Image i draws all its randomness from a generator seeded with seed + i: batch-independent."""
    ddim = DDIMScheduler.from_config(model.scheduler.config)
    ddim.set_timesteps(steps)
    model.train(False)
    out = []
    for start in range(0, n, batch_size):
        index = range(start, min(n, start + batch_size))
        gens = [torch.Generator().manual_seed(int(seed) + i) for i in index]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens])
        for t in ddim.timesteps:
            eps = model.eps(x, t.expand(len(x)), model.conditioning(None))
            # with eta > 0 each image draws its step noise from its own generator too
            variance_noise = torch.stack([torch.randn(shape, generator=g) for g in gens]) if eta > 0 else None
            x = ddim.step(eps, t, x, eta=eta, variance_noise=variance_noise).prev_sample
        out.append(x.clamp(-1, 1).numpy())
    return np.concatenate(out).astype(np.float32)


def generate_set(weights_path, model_spec: dict, spec: dict, out_path) -> None:
    model = load_model(model_spec, Path(weights_path).parent)
    images = sample(model, int(spec["n"]), model.latent_shape(), int(spec["steps"]), float(spec["eta"]),
                    int(spec["seed"]), int(spec["batch_size"]))
    write_array(out_path, images, {"split": "gen", "model_sha256": file_sha256(weights_path),
                                   "sampler": "DDIM", **spec})
