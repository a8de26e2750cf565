"""Scoring and the lambda sweep: the LDS of every lambda of the grid.

Ours: `score.subset_predictions` (one eigendecomposition, subset sums carried through it) and the
vectorized Spearman of `lds`. Reference: for each lambda, invert (X^T X + lambda I), form the full
(m, n) score matrix (in blocks of queries), its subset sums, and scipy's spearmanr per query.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from diffattr.lds import spearman_rows
from diffattr.protocol import lambda_grid
from diffattr.score import subset_predictions
from harness import max_rel_diff, median_time, row

TOL_PRED, TOL_LDS = 1e-6, 1e-9
QUERY_BLOCK = 1000
# (n, k, m, M, reference lambdas timed, repeats): with L_ref < 27 the reference's time is its time
# on the first L_ref lambdas scaled by 27 / L_ref (each lambda costs the same: one k x k inverse)
FULL = [(5000, 4096, 1000, 64, 27, 1), (2000, 8192, 1000, 64, 3, 1)]
TINY = [(60, 40, 12, 8, 27, 1), (40, 60, 12, 8, 27, 1)]


def problem(n, k, m, n_subsets, seed=0):
    """float32 features with a decaying spectrum, random half subsets, and a noisy truth."""
    rng = np.random.default_rng(seed)
    scale = (1.0 + np.arange(k)) ** -0.5
    x = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    xq = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    masks = rng.random((n_subsets, n)) < 0.5
    truth = -(xq.astype(np.float64) @ x.T.astype(np.float64)) @ masks.T
    truth += rng.standard_normal(truth.shape) * truth.std()
    return x, xq, masks, truth


def ours(x, xq, masks, truth, lambdas):
    preds = subset_predictions(x, xq, masks, lambdas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return preds, np.array([np.nanmean(spearman_rows(p, truth)) for p in preds])


def reference(x, xq, masks, truth, lambdas):
    x, xq = x.astype(np.float64), xq.astype(np.float64)
    gram = x.T @ x
    eye = np.eye(x.shape[1])
    sums = masks.T.astype(np.float64)
    preds, lds = [], []
    for lam in lambdas:
        inverse = np.linalg.inv(gram + lam * eye)
        pred = np.concatenate([-((xq[s:s + QUERY_BLOCK] @ inverse) @ x.T) @ sums
                               for s in range(0, len(xq), QUERY_BLOCK)])
        rho = [stats.spearmanr(p, t).statistic for p, t in zip(pred, truth)]
        preds.append(pred)
        lds.append(np.nanmean(rho))
    return np.stack(preds), np.array(lds)


def run(full: bool) -> list[dict]:
    rows, lambdas = [], lambda_grid()
    for n, k, m, n_subsets, n_ref, repeats in FULL if full else TINY:
        data = problem(n, k, m, n_subsets)
        ours_s, (preds, lds) = median_time(lambda: ours(*data, lambdas), repeats)
        ref_s, (ref_preds, ref_lds) = median_time(lambda: reference(*data, lambdas[:n_ref]), repeats)
        ref_s *= len(lambdas) / n_ref
        case = f"n={n} k={k} m={m} M={n_subsets} L={len(lambdas)}"
        note = "" if n_ref == len(lambdas) else f"reference timed on {n_ref} lambdas, scaled to {len(lambdas)}"
        rows.append(row("score: subset sums", case, ours_s, ref_s, max_rel_diff(preds[:n_ref], ref_preds),
                        TOL_PRED, note))
        rows.append(row("score: LDS per lambda", case, ours_s, ref_s,
                        float(np.abs(lds[:n_ref] - ref_lds).max()), TOL_LDS, "absolute difference"))
    return rows
