"""The generation set: DDIM samples from the full model, one fixed generator seed per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from .device import device_name, precision
from .models import DiffusionModel, load_model
from .storage import file_sha256, write_array


@torch.no_grad()
def sample(model: DiffusionModel, n: int, shape, steps: int, eta: float, seed: int,
           batch_size: int, device: torch.device = torch.device("cpu"), dtype: str = "fp32") -> np.ndarray:
    """Image i draws all its randomness from a CPU generator seeded with seed + i: independent of the
    batch, and the same draws on any device. The UNet runs in precision `dtype`, the sampler in fp32."""
    ddim = DDIMScheduler.from_config(model.scheduler.config)
    ddim.set_timesteps(steps)
    model.to(device).train(False)
    out = []
    for start in range(0, n, batch_size):
        index = range(start, min(n, start + batch_size))
        gens = [torch.Generator().manual_seed(int(seed) + i) for i in index]
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        for t in ddim.timesteps:
            with precision(dtype, device):
                eps = model.eps(x, t.expand(len(x)), model.conditioning(None)).float()
            # with eta > 0 each image draws its step noise from its own generator too
            variance_noise = (torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                              if eta > 0 else None)
            x = ddim.step(eps, t, x, eta=eta, variance_noise=variance_noise).prev_sample
        out.append(x.clamp(-1, 1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def generate_set(weights_path, model_spec: dict, spec: dict, out_path,
                 device: torch.device = torch.device("cpu")) -> None:
    model = load_model(model_spec, Path(weights_path).parent)
    dtype = spec.get("dtype", "fp32")
    images = sample(model, int(spec["n"]), model.latent_shape(), int(spec["steps"]), float(spec["eta"]),
                    int(spec["seed"]), int(spec["batch_size"]), device, dtype)
    write_array(out_path, images, {"split": "gen", "model_sha256": file_sha256(weights_path),
                                   "sampler": "DDIM", **spec, "dtype": dtype,
                                   "device": device_name(device)})
