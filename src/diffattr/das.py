"""DAS, the Diffusion Attribution Score (Lin, Tao, Dong and Xu, ICLR 2025, arXiv 2410.18639).

What DAS is. Instead of linearizing a loss (TRAK, D-TRAK), DAS compares the noise predictions of
the model trained with and without train sample i: its objective (the paper's Eq. 9) is the KL
divergence between the two models' distributions for the query, which for Gaussian reverse steps
is E_{t,eps} ||eps_theta(z_t, t) - eps_theta\\i(z_t, t)||^2. The noise predictor's OUTPUT is
linearized around the trained weights, eps_theta'(x_t, t) ~ eps_theta(x_t, t) + J(x_t)(theta' - theta)
with J = d eps_theta / d theta, so training becomes a least-squares regression of the residual
r_i = eps - eps_theta(x^i_t, t) on J, and one Newton step (leave-one-out by Sherman-Morrison) gives
theta - theta\\i ~ (Phi^T Phi)^-1 phi_i r_i / (1 - h_ii). Hence the score of train sample i for
query z is phi(z)^T (Phi^T Phi)^-1 phi_i r_i: TRAK's form, with gradients of the noise predictor's
output in place of gradients of a loss and the train sample's residual in place of TRAK's
out-to-loss weight (the paper's Eq. 16; D-TRAK is its special case with the residual set to 1).

What we follow. The paper's accelerated estimator as its public code computes it (github.com/
Jinxu-Lin/DAS: CIFAR2/03_grad.py, 04_eval.py and 07_scpre.py, method `DAS1`, run as the README's
`03_grad.sh ... mean uniform 10 4096` and `07_score.sh val das mean 10 4096 uniform`):
- the output's d pixels are reduced by their mean before differentiating (the code's `mean`
  output, our `avg` function): phi(x) = P^T (1/K) sum_t grad_theta mean_pixels eps_theta(x_t, t),
  with TRAK's projector P, the K timesteps and noises of the feature set, the expectation over
  timesteps moved inside (one feature per sample); so DAS is scored on `avg` feature sets only;
- the residual weight of train sample i is r_i = mean_t e_it / ||e_i||_2 with
  e_it = sqrt(mean_pixels (eps_theta(x^i_t, t) - eps)^2) the full model's RMS residual at the
  feature set's (t, eps) (the code's `load_error`);
- S_lambda(z, i) = phi(z)^T (Phi^T Phi + lambda I)^-1 phi_i r_i over the protocol's lambda grid,
  without the leverage factor 1 / (1 - h_ii) (dropped as TRAK drops it, and as `DAS1` does).
Deviations: the code's residuals use all 1000 timesteps and its own noise seeds (ours: the feature
set's K timesteps and noises, so that residual and gradient describe the same (t, eps)); the code
normalizes each timestep's gradient to unit length before averaging (ours: the plain mean, as for
every feature set of this workflow); the code divides (Phi^T Phi + lambda I)^-1 by its mean absolute
entry, a positive factor per lambda that leaves every ranking, hence the LDS, unchanged (ours: not).
The paper's text itself (Eq. 16's exact typesetting) could not be read from here; the formula above
is the paper's derivation as its reviews and code state it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import load_images, load_labels
from .device import device_name
from .ground_truth import query_losses
from .models import load_model
from .storage import array_sha256, file_sha256, write_array


def residual_weights(errors: np.ndarray) -> np.ndarray:
    """(n,) DAS weights r_i = mean_t e_it / ||e_i||_2 of RMS residuals e (n, K); 0 for an all-zero row."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or (errors < 0).any():
        raise ValueError(f"residuals must be an (n, K) array of RMS errors >= 0, got shape {errors.shape}")
    norms = np.linalg.norm(errors, axis=1)
    out = np.zeros(len(errors))
    np.divide(errors.mean(axis=1), norms, out=out, where=norms > 0)
    return out


def rms_residuals(model, images: np.ndarray, timesteps, noise_seed: int, batch_size: int,
                  device: torch.device = torch.device("cpu"), labels: np.ndarray | None = None) -> np.ndarray:
    """(n, K) e_it = sqrt(mean_pixels (eps_theta(x_t, t) - eps)^2) at the featurizer's noise
    eps(noise_seed, i, t) (`ground_truth.query_losses` draws the same noise), image i conditioned on
    labels[i]; for a v-prediction model the residual of v_theta against the velocity."""
    return np.stack([np.sqrt(query_losses(model, images, [t], [noise_seed], batch_size, device,
                                          labels=labels)) for t in timesteps], axis=1)


def compute_residuals(weights_path, model_spec: dict, images_path, timesteps, noise_seed: int, batch_size: int,
                      out_path, device: torch.device = torch.device("cpu")) -> None:
    """The (n,) residual weights of the train split under the full model, with their provenance;
    `batch_size` noised images per forward pass (as the ground truth's)."""
    model = load_model(model_spec, Path(weights_path).parent)
    images = load_images(images_path)
    errors = rms_residuals(model, images, timesteps, int(noise_seed), int(batch_size), device,
                           load_labels(images_path))
    write_array(out_path, residual_weights(errors), {
        "model_sha256": file_sha256(weights_path), "timesteps": list(timesteps),
        "noise_seed": int(noise_seed), "query_sha256": array_sha256(images),
        "residual": "mean_t(e) / ||e||_2, e = RMS of eps_theta - eps", "device": device_name(device)})
