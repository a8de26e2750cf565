"""Model-output functions f(x, t, eps) whose gradients make the features (protocol table).

Each maps the network's prediction (B, ...) and its target (B, ...) at timesteps t to one value per
sample (B,): eps_theta and the true noise eps for an epsilon-prediction model, v_theta and the
velocity for a v-prediction one (`DiffusionModel.target`). `simple`, `elbo` and `interp` compare the
prediction with the target (for v, ||v_theta - v||^2 = ||eps_theta - eps||^2 / abar_t with eps_theta
the noise that v_theta implies, so `elbo` applies the epsilon ELBO's weights to the v error); the
others are functions of the prediction alone.
"""
from __future__ import annotations

import torch

from .protocol import parse_function


def _mean(x):
    return x.flatten(1).mean(1)


def _sum(x):
    return x.flatten(1).sum(1)


def elbo_weights(scheduler, t: torch.Tensor) -> torch.Tensor:
    """w_t = beta_t / (2 alpha_t (1 - abar_t))."""
    betas, abar = scheduler.betas.to(t.device)[t], scheduler.alphas_cumprod.to(t.device)[t]
    return betas / (2 * (1 - betas) * (1 - abar))


def model_output(name: str, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                 scheduler) -> torch.Tensor:
    function, eta = parse_function(name)
    if function == "simple":
        return _mean((pred - target) ** 2)
    if function == "elbo":
        return elbo_weights(scheduler, t).to(pred.dtype) * _mean((pred - target) ** 2)
    if function == "square":
        return _mean(pred ** 2)
    if function == "avg":
        return _mean(pred)
    if function == "l1":
        return _sum(pred.abs())
    if function == "l2":
        return _sum(pred ** 2).sqrt()
    if function == "linf":
        return pred.flatten(1).abs().amax(1)
    # interp(eta): our reconstruction of Fig. 1 (docs/methods.md); eta=0 square, 0.5 simple/2.
    return _mean((1 - eta) * pred ** 2 - 2 * eta * target * pred)
