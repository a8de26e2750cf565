"""Journey-TRAK's query features: gradients along each generated image's own DDIM trajectory.

Journey-TRAK (Georgiev et al. 2023, "The Journey, Not the Destination") attributes a generated image
step by step along its sampling trajectory; the D-TRAK paper's baseline averages TRAK over the 50
sampling steps. For generated query z with trajectory inputs x_s at timesteps t_s (s = 1..S, the
generation's DDIM steps) we use, at each step, the feature set's model-output function at
(x_s, t_s) with target

    eps_s = (x_s - sqrt(abar_{t_s}) z) / sqrt(1 - abar_{t_s}),

the noise that carries the final image z to the trajectory point x_s: the forward process noising z
with eps_s gives x_s exactly, so the per-step function is L_Simple (for `simple` features; the
feature set's function in general) on the sampler's own x_t instead of on a fresh noising of z, as
the protocol asks ("TRAK at each of the 50 sampling steps on x_t, averaged"). Journey-TRAK's own
code (MadryLab/journey-TRAK, diffusion_trak/modelout_functions.py, `_get_output_scoring`) takes at
step s the L_Simple of the step's predicted x0 noised afresh to t_s, averaged over a few fresh noises;
we keep its per-step TRAK and its average over steps, and evaluate the loss on the trajectory point
itself, whose target is then this implied noise, which ties every step to the query image without
extra noise draws. The query feature is P^T (1/S) sum_s grad f(x_s, t_s, eps_s):
TRAK scores are linear in the query feature, so scoring it gives the mean over the S steps of the
per-step TRAK scores (tests/test_journey.py checks this identity).

With a model kind that diffuses elsewhere than in pixels, z above is the stored image encoded
(`DiffusionModel.encode`), the space of the trajectory; with v-prediction the per-step target is
the velocity of (z, eps_s) (`DiffusionModel.target`); a class-conditional kind is conditioned on
each image's label from the generation set's store, as it was when generating.

The trajectory is regenerated from the generation settings and the full model (deterministic per
image seed, `generate.denoise`, in the generate job's batches) rather than stored by the generate
job: storing S states per image would multiply the generation set's size by S, and regenerating
costs S forward passes per image, little beside the S per-sample gradients. The regenerated end
point must match the stored image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import load_images, load_labels
from .featurize import write_features
from .generate import ddim_scheduler, denoise, guidance_scale
from .models import DiffusionModel, load_model
from .protocol import stage_dtype

# Largest |regenerated - stored| pixel difference accepted for a generated image (pixels in [-1, 1]):
# round-off of another device or library version, not another trajectory.
ENDPOINT_TOLERANCE = 1e-3


class TrajectoryMismatch(ValueError):
    """The regenerated trajectory does not end at the stored generated image."""


def trajectory_noise(sampler: DiffusionModel, images: np.ndarray, spec: dict, device: torch.device,
                     labels: np.ndarray | None = None):
    """`noise(rows)` for `features`: the (B, S, ...) implied noise eps_s of rows `rows` of the
    generation set `images` (of classes `labels`), from their regenerated trajectories; and the S
    timesteps t_s.

    Trajectories are regenerated in the generate job's own batches (`spec['batch_size']` images from
    image 0 on), so that on the same device and precision they are the generate job's, bit for bit;
    the last two such batches are kept, as the featurizer's row chunks may straddle one.
    """
    ddim = ddim_scheduler(sampler, int(spec["steps"]))
    timesteps = [int(t) for t in ddim.timesteps]
    abar = sampler.scheduler.alphas_cumprod.to(torch.float64)[timesteps]
    size, n = int(spec["batch_size"]), len(images)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def generated(batch: int):
        if batch not in kept:
            if len(kept) == 2:
                kept.pop(min(kept))
            index = range(batch * size, min(n, (batch + 1) * size))
            kept[batch] = denoise(sampler, ddim, index, sampler.latent_shape(), float(spec["eta"]),
                                  int(spec["seed"]), device, stage_dtype(spec), keep_states=True,
                                  labels=None if labels is None else labels[index.start:index.stop],
                                  guidance=guidance_scale(spec))
        return kept[batch]

    def noise(rows: range) -> torch.Tensor:
        parts = [generated(b) for b in range(rows.start // size, (rows.stop - 1) // size + 1)]
        first = rows.start // size * size
        end = torch.cat([p[0] for p in parts])[rows.start - first:rows.stop - first]
        states = torch.cat([p[1] for p in parts])[rows.start - first:rows.stop - first]
        z = torch.from_numpy(images[rows.start:rows.stop]).to(device)
        gap = (end - z).abs().max().item()
        if gap > ENDPOINT_TOLERANCE:
            raise TrajectoryMismatch(
                f"images {rows.start}..{rows.stop - 1} of the generation set: the regenerated DDIM trajectory "
                f"ends {gap:.3g} away from the stored image (tolerance {ENDPOINT_TOLERANCE}); the generate "
                "settings or the full model differ from those that made the generation set")
        return implied_noise(states, sampler.encode(z), abar)

    return noise, timesteps


def implied_noise(states: torch.Tensor, z: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps_s = (x_s - sqrt(abar_s) z) / sqrt(1 - abar_s) for states (B, S, ...) and images z (B, ...)."""
    shape = (1, len(abar)) + (1,) * (states.ndim - 2)
    a = abar.reshape(shape).to(states.device)
    return ((states.double() - a.sqrt() * z[:, None].double()) / (1 - a).sqrt()).to(states.dtype)


def featurize_journey(weights_path, model_spec: dict, images_path, function: str, generate_spec: dict,
                      proj_dim: int, spec: dict, out_path, device: torch.device = torch.device("cpu"),
                      max_pass_items: int | None = None, calibration=None) -> None:
    """Journey features of every generated image, in a store of the feature layout (resumable like
    `featurize_split`, `calibration` as there); its K and timesteps are the sampler's steps, its
    `scheme` 'ddim_trajectory'."""
    directory = Path(weights_path).parent
    sampler = load_model(model_spec, directory).to(device).train(False)  # as the generate job ran it
    model = load_model(model_spec, directory).to(device).for_per_sample_gradients()
    images, labels = load_images(images_path), load_labels(images_path)
    noise, timesteps = trajectory_noise(sampler, images, generate_spec, device, labels)
    trajectory = {key: generate_spec[key] for key in ("steps", "eta", "seed")}
    write_features(model, weights_path, images, function, timesteps, proj_dim, spec, out_path, device,
                   {"checkpoint": None, "scheme": "ddim_trajectory", "noise_seed": None,
                    "trajectory": {**trajectory, "dtype": stage_dtype(generate_spec)}},
                   max_pass_items, noise=noise, labels=labels, calibration=calibration)
