"""Training a diffusion model on a set of images with the protocol's recipe (L_Simple, AdamW, cosine)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from .data import load_images
from .models import DiffusionModel, build_model


def train(model: DiffusionModel, images: torch.Tensor, labels: torch.Tensor | None, spec: dict,
          seed: int, device: torch.device = torch.device("cpu")) -> pd.DataFrame:
    """Train in place on `device`; deterministic given `seed` on CPU. Returns the loss log (one row per step).

    Batches are drawn epoch by epoch from a seeded permutation; flips, timesteps and noise come from
    the same CPU generator whatever the device, dropout from torch's global generator seeded with `seed`.
    The training images are held on the device: no loader is needed for data that fit there.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps, batch_size = int(spec["steps"]), int(spec["batch_size"])
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=float(spec["lr"]), betas=tuple(spec["betas"]),
                                  weight_decay=float(spec["weight_decay"]), foreach=True)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(round(float(spec["warmup_fraction"]) * steps)), steps)
    n_timesteps = model.scheduler.config.num_train_timesteps
    images = images.to(device)
    labels = None if labels is None else labels.to(device)
    model.to(device).train(True)
    order, cursor, log = torch.randperm(len(images), generator=gen), 0, []
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        index = order[cursor:cursor + batch_size].to(device)
        cursor += batch_size
        x0 = images[index]
        if spec.get("hflip", False):
            flip = (torch.rand(len(index), generator=gen) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        x0 = model.latents(x0)
        t = torch.randint(0, n_timesteps, (len(index),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = model.scheduler.add_noise(x0, noise, t)
        cond = model.conditioning(labels[index] if labels is not None else None)
        loss = (model.eps(x_t, t, cond) - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(spec["grad_clip"]))
        optimizer.step()
        schedule.step()
        log.append((step, loss.item(), float(grad_norm), schedule.get_last_lr()[0]))
    model.train(False)
    return pd.DataFrame(log, columns=["step", "loss", "grad_norm", "lr"])


def train_and_save(images_path, subsets_path, subset, seed: int, spec: dict, weights_path,
                   device: torch.device = torch.device("cpu")) -> None:
    """Train one model (on the whole split, or on LDS subset `subset`) and save it beside `weights_path`.

    Files are written to a temporary folder and moved in with the weights last, so an
    interrupted job never leaves weights that look finished.
    """
    images = load_images(images_path)
    if subsets_path is not None:
        table = pd.read_csv(subsets_path)
        positions = table.loc[table["subset"] == subset, "train_position"].to_numpy()
        if len(positions) == 0:
            raise ValueError(f"{subsets_path}: subset {subset} has no members")
        images = images[np.sort(positions)]
    model = build_model(spec["model"], seed)
    log = train(model, torch.from_numpy(np.ascontiguousarray(images)), None, spec, seed, device)
    model.to(torch.device("cpu"))
    out = Path(weights_path).parent
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staging = Path(staging)
        model.save(staging)
        log.to_csv(staging / "train_log.csv", index=False)
        for name in sorted(os.listdir(staging), key=lambda name: name == Path(weights_path).name):
            os.replace(staging / name, out / name)
