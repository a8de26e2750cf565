"""Retraining-based attribution from a pool of models trained on random subsets drawn apart from
the LDS subsets: Empirical IF (Feldman & Zhang 2020) and Datamodel (Ilyas et al. 2022).

`outputs` (N, m) holds f_k(z), query z's L_Simple under pool model k (the ground-truth job run on
the pool), and `masks` (N, n) model k's training subset. As for every method, S(z, i) > 0 means that
training on image i helps z: it lowers z's loss, so the LDS's prediction -sum_{i in S} S(z, i) is a
predicted loss.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV

from .lds import ground_truth_matrix
from .methods import methods_reading, predictions, write_predictions
from .provenance import ProvenanceError
from .protocol import lambda_grid
from .score import read_masks
from .storage import file_sha256

def _check(outputs, masks) -> tuple[np.ndarray, np.ndarray]:
    outputs = np.asarray(outputs, dtype=np.float64)
    masks = np.asarray(masks)
    if outputs.ndim != 2 or masks.ndim != 2 or len(outputs) != len(masks):
        raise ValueError(f"outputs must be (N models, m queries) and masks (N models, n train images); "
                         f"got {outputs.shape} and {masks.shape}")
    return outputs, masks.astype(np.float64)


def empirical_if(outputs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Scores (m, n): the difference in means S(z, i) = mean over models without i of f(z) minus
    mean over models with i. An image that every model, or no model, was trained on scores 0."""
    outputs, inside = _check(outputs, masks)
    n_in = inside.sum(axis=0)
    n_out = len(inside) - n_in
    sum_in = outputs.T @ inside                       # (m, n)
    sum_out = outputs.sum(axis=0)[:, None] - sum_in
    defined = (n_in > 0) & (n_out > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined, sum_out / n_out - sum_in / n_in, 0.0)


def datamodel(outputs: np.ndarray, masks: np.ndarray, alphas) -> tuple[np.ndarray, np.ndarray]:
    """(scores (m, n), ridge alpha chosen for each query (m,)).

    Per query, the linear datamodel f(z) ~ b + sum_i w_i [i in S] is fitted by ridge regression on
    the N models, with an intercept and alpha chosen from `alphas` by leave-one-out cross-validation
    (scikit-learn's RidgeCV, one alpha per query). Including a helpful image lowers the loss (w_i < 0),
    so the score is -w.
    """
    outputs, inside = _check(outputs, masks)
    alphas = np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 1 or not len(alphas) or not np.all(alphas > 0):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of positive values, got {alphas}")
    if len(outputs) < 3:
        raise ValueError(f"a datamodel needs at least 3 models for leave-one-out cross-validation, got {len(outputs)}")
    ridge = RidgeCV(alphas=alphas, fit_intercept=True, alpha_per_target=True).fit(inside, outputs)
    return -np.atleast_2d(ridge.coef_), np.atleast_1d(ridge.alpha_).astype(np.float64)


class RetrainJob:
    """The inputs of the methods that read retrained models' outputs (Method.reads 'outputs'): the
    pool's outputs (N, m) and subsets (N, n), the LDS subsets (M, n) the predictions sum over, and
    the datamodel's ridge grid. `attrs` collects what a method chose (the datamodel's alphas)."""

    lambdas: list = []

    def __init__(self, outputs: np.ndarray, pool: np.ndarray, masks: np.ndarray, alphas):
        self.outputs, self.pool, self.masks, self.alphas, self.attrs = outputs, pool, masks, alphas, {}

    def _subset_sums(self, scores: np.ndarray) -> np.ndarray:
        return -(scores @ self.masks.T.astype(np.float64))[None]

    def empirical_if(self) -> np.ndarray:
        return self._subset_sums(empirical_if(self.outputs, self.pool))

    def datamodel(self) -> np.ndarray:
        scores, chosen = datamodel(self.outputs, self.pool, self.alphas)
        self.attrs["datamodel_alphas"] = chosen.tolist()
        return self._subset_sums(scores)


def retrain_split(output_paths: dict, split: str, pool_subsets_path, subsets_path, train_index_path,
                  spec: dict, out_path) -> None:
    """Subset predictions (1, m, M) of Empirical IF and Datamodel on one query split, from the first
    N = len(output_paths) pool models, in one predictions store.

    `output_paths` maps pool model names s<subset>-r<seed> to their ground-truth stores; they are
    checked (lds.ground_truth_matrix) to be those of the pool's subsets 0..N-1 and its subsets table,
    with the same queries, timesteps and noise seeds.
    """
    n = len(pd.read_csv(train_index_path))
    n_models = len(output_paths)
    truth, attrs = ground_truth_matrix(output_paths, split, n_models, file_sha256(pool_subsets_path))
    pool = read_masks(pool_subsets_path, n, train_index_path, rows="")
    if len(pool) < n_models:
        raise ProvenanceError(f"{pool_subsets_path} holds {len(pool)} subsets, fewer than the {n_models} "
                              "models whose outputs were given")
    masks = read_masks(subsets_path, n, train_index_path, rows="")
    outputs, pool = truth.T, pool[:n_models]   # (N, m), (N, n)
    known = methods_reading("outputs")
    methods = spec.get("methods", known)
    for method in [m for m in methods if m not in known]:
        raise ValueError(f"retrain.methods: got {method!r}; expected one of {', '.join(known)}")
    job = RetrainJob(outputs, pool, masks, lambda_grid(spec["datamodel_alpha_exponents"]))
    stored = predictions(methods, job)
    write_predictions(out_path, stored, {
        "query_sha256": attrs["query_sha256"], "subsets_sha256": file_sha256(subsets_path),
        "pool_subsets_sha256": file_sha256(pool_subsets_path), "models": n_models,
        "output_timesteps": attrs["timesteps"], "output_noise_seeds": attrs["noise_seeds"], **job.attrs})
