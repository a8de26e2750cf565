"""Attribution scores and their subset sums: TRAK-style S(lambda) = Xq (X^T X + lambda I)^{-1} X^T,
its relative and renormalized variants and DAS (train columns rescaled), Journey-TRAK (the same kernel
on trajectory query features), and kernel-free dot products."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .provenance import (FEATURE_KEYS, REQUIRED_FEATURE_KEYS, RESIDUAL_KEYS, ProvenanceError,
                         require_finite, require_present, require_same)
from .methods import FEATURE_METHODS, METHODS, write_predictions
from .storage import file_sha256, read_array
from .subsets import membership_matrix

RENORMALIZATIONS = (None, "relative", "renormalized", "weighted")
# The methods scored with the kernel (X^T X + lambda I)^-1, and the renormalization of each.
KERNEL_METHODS = {"trak": None, "relative_if": "relative", "renormalized_if": "renormalized"}
# Kernel methods on other inputs than the store's own: Journey-TRAK is TRAK on the trajectory query
# features (diffattr.journey); DAS multiplies train column i by its residual weight (diffattr.das).
JOURNEY_METHODS = {"journey_trak": None}
WEIGHTED_METHODS = {"das": "weighted"}
# Feature attributes a journey store does not share with the train features (its timesteps and noise
# are the sampler's trajectory instead).
JOURNEY_OWN_KEYS = ("K", "timesteps", "scheme", "noise_seed", "noises")
NORM_BLOCK_ROWS = 4096  # train rows per block when computing RelatIF's norms


def scores(train: np.ndarray, query: np.ndarray, lam: float) -> np.ndarray:
    """Score matrix (m, n) for one lambda: query features Xq (m, k), train features X (n, k)."""
    x = np.asarray(train, dtype=np.float64)
    xq = np.asarray(query, dtype=np.float64)
    _check_features(x, xq)
    gram = x.T @ x + lam * np.eye(x.shape[1])
    return np.linalg.solve(gram, xq.T).T @ x.T  # gram is symmetric, so (gram^{-1} Xq^T)^T = Xq gram^{-1}


def subset_predictions(train: np.ndarray, query: np.ndarray, masks: np.ndarray, lambdas,
                       renormalize: str | None = None, weights: np.ndarray | None = None) -> np.ndarray:
    """Predicted outputs (L, m, M): pred[l, z, j] = -sum_{i in subset j} S(lambda_l)[z, i] / w_l(i).

    `renormalize` rescales each train column: None keeps w = 1 (TRAK), 'relative' divides by
    w = ||H^{-1} x_i|| with H = X^T X + lambda I (RelatIF), 'renormalized' by w = ||x_i||. A train
    row with w = 0 scores 0 against every query. See `kernel_predictions` (and its `weights`, which
    'weighted' multiplies column i by).
    """
    return kernel_predictions(train, query, masks, lambdas, (renormalize,), weights)[renormalize]


def kernel_predictions(train: np.ndarray, query: np.ndarray, masks: np.ndarray, lambdas,
                       renormalizations, weights: np.ndarray | None = None) -> dict:
    """{renormalization: predictions (L, m, M)} of `subset_predictions`, for several renormalizations.

    One eigendecomposition serves every renormalization and the whole lambda grid, and the (m, n)
    score matrix is never formed: the masks are applied on the train side first. The k x k matrix
    X^T X is decomposed when k <= n, otherwise the n x n Gram matrix X X^T, using
    (X^T X + lambda I)^{-1} X^T = X^T (X X^T + lambda I)^{-1}. 'weighted' multiplies train column i
    by `weights[i]` (DAS's residuals), which it requires.
    """
    x = np.asarray(train, dtype=np.float64)
    xq = np.asarray(query, dtype=np.float64)
    _check_features(x, xq)
    masks = _check_masks(masks, len(x))
    lambdas = np.asarray(lambdas, dtype=np.float64)
    n, k = x.shape
    if lambdas.ndim != 1 or not np.all(lambdas > 0):
        raise ValueError(f"lambdas must be a 1-D sequence of positive values, got {lambdas}")
    for renormalize in renormalizations:
        if renormalize not in RENORMALIZATIONS:
            raise ValueError(f"renormalize must be one of {RENORMALIZATIONS}, got {renormalize!r}")
    if "weighted" in renormalizations:
        if weights is None or np.shape(weights) != (n,) or not np.all(np.isfinite(weights)):
            raise ValueError(f"'weighted' needs {n} finite train weights, got "
                             f"{None if weights is None else np.shape(weights)}")
        weights = np.asarray(weights, dtype=np.float64)
    sums = masks.astype(np.float64).T  # (n, M)
    if k <= n:
        e, v = np.linalg.eigh(x.T @ x)
        left = xq @ v

        def right(weights):  # V^T X^T diag(weights) masks^T
            return v.T @ (x.T @ (sums * weights[:, None]))

        def coordinates(rows):  # V^T x_i, so that H^{-1} x_i = V diag(1/(e + lambda)) V^T x_i
            return x[rows] @ v
    else:
        e, u = np.linalg.eigh(x @ x.T)
        left = (xq @ x.T) @ u

        def right(weights):
            return u.T @ (sums * weights[:, None])

        def coordinates(rows):  # H^{-1} x_i = X^T U diag(1/(e + lambda)) U^T e_i
            return u[rows]
    e = np.clip(e, 0.0, None)  # round-off can make a PSD matrix's smallest eigenvalues slightly negative
    row_norms = np.linalg.norm(x, axis=1)
    out = {}
    for renormalize in renormalizations:
        if renormalize == "relative":  # w = 0 exactly for a zero row, whatever the round-off in the norms
            norms = _relative_norms(coordinates, e, k <= n, lambdas, n) * (row_norms > 0)[:, None]
            out[renormalize] = np.stack([-(left / (e + lam)) @ right(_inverse(norms[:, l]))
                                         for l, lam in enumerate(lambdas)])
        else:
            column = {None: lambda: np.ones(n), "renormalized": lambda: _inverse(row_norms),
                      "weighted": lambda: weights}[renormalize]
            fixed = right(column())
            out[renormalize] = np.stack([-(left / (e + lam)) @ fixed for lam in lambdas])
    return out


def _relative_norms(coordinates, e: np.ndarray, primal: bool, lambdas: np.ndarray, n: int) -> np.ndarray:
    """(n, L): ||H^{-1} x_i|| for every lambda. With c_i = coordinates(i) it is
    sum_c c_ic^2 / (e_c + lambda)^2 when V diagonalizes X^T X (primal), and
    sum_c c_ic^2 e_c / (e_c + lambda)^2 in the Gram branch (U^T X X^T U = diag(e)); rows are taken in
    blocks so that no (n, k) matrix is formed."""
    scale = (np.ones_like(e) if primal else e)[:, None] / (e[:, None] + lambdas[None, :]) ** 2  # (k', L)
    squares = np.concatenate([coordinates(slice(start, start + NORM_BLOCK_ROWS)) ** 2 @ scale
                              for start in range(0, n, NORM_BLOCK_ROWS)])
    return np.sqrt(squares)


def dot_predictions(train: np.ndarray, query: np.ndarray, masks: np.ndarray, cosine: bool = False) -> np.ndarray:
    """Predicted outputs (1, m, M) of the kernel-free scores S = Xq X^T: pred[0, z, j] =
    -sum_{i in subset j} S[z, i]; with `cosine`, rows of X and Xq are scaled to unit length first
    (a zero row scores 0)."""
    x = np.asarray(train, dtype=np.float64)
    xq = np.asarray(query, dtype=np.float64)
    _check_features(x, xq)
    masks = _check_masks(masks, len(x))
    if cosine:
        x = x * _inverse(np.linalg.norm(x, axis=1))[:, None]
        xq = xq * _inverse(np.linalg.norm(xq, axis=1))[:, None]
    return -(xq @ (x.T @ masks.astype(np.float64).T))[None]


def _inverse(norms: np.ndarray) -> np.ndarray:
    """1 / norms, and 0 where a norm is 0 (a zero vector contributes nothing)."""
    out = np.zeros_like(norms)
    np.divide(1.0, norms, out=out, where=norms > 0)
    return out


def _check_masks(masks, n: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != n:
        raise ValueError(f"masks must have shape (M, n={n}), got {masks.shape}")
    return masks


def lambda_grid(exponents=range(-2, 7), mantissas=(1, 2, 5)) -> list[float]:
    """Ascending grid mantissa x 10^exponent: 0.01, 0.02, 0.05, ..., 5e6 by default.

    Values are parsed from text, so 3 x 10^-1 gives exactly the float 0.3 (3 * 10.0**-1 does not).
    """
    return sorted(float(f"{m}e{e}") for e in exponents for m in mantissas)


def _check_features(x: np.ndarray, xq: np.ndarray) -> None:
    if x.ndim != 2 or xq.ndim != 2:
        raise ValueError(f"train and query features must be 2-D, got shapes {x.shape} and {xq.shape}")
    if x.shape[1] != xq.shape[1]:
        raise ValueError(f"train features have k={x.shape[1]} columns but query features have k={xq.shape[1]}")


def read_features(path) -> tuple[np.ndarray, dict]:
    """A feature store, refused unless it records its provenance and holds finite (n, proj_dim) rows."""
    features, attrs = read_array(path)
    require_present(REQUIRED_FEATURE_KEYS, (str(path), attrs), "diffattr's featurize")
    if features.ndim != 2 or features.shape[1] != attrs["proj_dim"]:
        raise ProvenanceError(f"{path}: features of shape {features.shape}, but its proj_dim is "
                              f"{attrs['proj_dim']}")
    require_finite(str(path), features)
    return features, attrs


def method_predictions(method: str, train: np.ndarray, query: np.ndarray, masks: np.ndarray,
                       lambdas) -> tuple[np.ndarray, list]:
    """(predictions (L, m, M), their lambdas) of one method of `methods.METHODS` on train and query
    rows (gradient features, flattened images or CLIP embeddings for the baselines); [None] when the method
    has no lambda."""
    if method in KERNEL_METHODS:
        return subset_predictions(train, query, masks, lambdas, KERNEL_METHODS[method]), list(lambdas)
    cosine = {"gradient_dot": False, "gradient_cos": True, "pixel_dot": False, "pixel_cos": True,
              "clip_dot": False, "clip_cos": True}
    if method in cosine:
        return dot_predictions(train, query, masks, cosine[method]), [None]
    raise ValueError(f"unknown attribution method {method!r}; known: {', '.join(METHODS)}")


def read_masks(subsets_path, n: int, train_path, rows: str = "features of ") -> np.ndarray:
    """The (M, n) subset membership of the subsets table, refused when it names a train position
    that `train_path` does not have."""
    table = pd.read_csv(subsets_path)
    if len(table) and table["train_position"].max() >= n:
        raise ProvenanceError(f"{subsets_path} names train position {table['train_position'].max()}, but "
                              f"{train_path} has {rows}{n} train images")
    return membership_matrix(table, n)


def read_residuals(path, train_path, train_attrs: dict, n: int) -> np.ndarray:
    """DAS's (n,) residual weights of the train split, refused unless made by the model, timesteps and
    noise of the train features they weight, on the same train images."""
    weights, attrs = read_array(path)
    require_present(RESIDUAL_KEYS, (str(path), attrs), "diffattr's residual job")
    require_same(RESIDUAL_KEYS, (str(train_path), train_attrs), (str(path), attrs))
    if weights.shape != (n,):
        raise ProvenanceError(f"{path}: residual weights of shape {weights.shape}, expected ({n},) for the "
                              f"{n} rows of {train_path}")
    require_finite(str(path), weights)
    return weights


def read_journey(path, train_path, train_attrs: dict, query_attrs: dict) -> np.ndarray:
    """Journey-TRAK's query features, refused unless projected like the train features (same model,
    function and projector) and computed on the generated images of the query store."""
    journey, attrs = read_features(path)
    shared = [key for key in FEATURE_KEYS if key not in JOURNEY_OWN_KEYS]
    require_same(shared, (str(train_path), train_attrs), (str(path), attrs))
    if attrs["query_sha256"] != query_attrs["query_sha256"]:
        raise ProvenanceError(f"{path} holds the trajectories of other generated images than the query "
                              f"features (query_sha256 {attrs['query_sha256']} vs {query_attrs['query_sha256']})")
    return journey


def score_split(train_path, query_path, subsets_path, spec: dict, out_path, split: str | None = None,
                journey_path=None, residual_path=None) -> None:
    """Subset predictions g_j(z) of every method in `spec['methods']` (default all feature methods)
    that applies to the features' function and query `split` (`Method.applies`), each over the
    lambda grid or at its single point, in one store with their provenance. Journey-TRAK reads its
    query features from `journey_path`, DAS its residual weights from `residual_path`."""
    train, train_attrs = read_features(train_path)
    query, query_attrs = read_features(query_path)
    require_same(FEATURE_KEYS, (str(train_path), train_attrs), (str(query_path), query_attrs))
    masks = read_masks(subsets_path, len(train), train_path)
    low, high = spec["lambda_exponents"]
    lambdas = lambda_grid(range(int(low), int(high) + 1))
    # Journey-TRAK's trajectories and DAS's residuals are the full model's: final-weights features only
    final = train_attrs.get("checkpoint") is None
    methods = [method for method in spec.get("methods", FEATURE_METHODS)
               if METHODS[method].applies(train_attrs["function"], split)
               and (final or method not in (*JOURNEY_METHODS, *WEIGHTED_METHODS))]
    queries, weights = query, None
    if any(method in JOURNEY_METHODS for method in methods):
        if journey_path is None:
            raise ValueError(f"{', '.join(JOURNEY_METHODS)} needs the journey features of {query_path}")
        # stacked under the store's queries: one eigendecomposition serves both
        queries = np.concatenate([query, read_journey(journey_path, train_path, train_attrs, query_attrs)])
    if any(method in WEIGHTED_METHODS for method in methods):
        if residual_path is None:
            raise ValueError(f"{', '.join(WEIGHTED_METHODS)} needs the residual weights of {train_path}")
        weights = read_residuals(residual_path, train_path, train_attrs, len(train))
    renormalizations = {**KERNEL_METHODS, **WEIGHTED_METHODS, **JOURNEY_METHODS}
    kernel = {method: renormalizations[method] for method in methods if method in renormalizations}
    by_kernel = (kernel_predictions(train, queries, masks, lambdas, list(dict.fromkeys(kernel.values())), weights)
                 if kernel else {})
    own = slice(0, len(query))
    predictions = {}
    for method in methods:
        if method in kernel:
            rows = slice(len(query), None) if method in JOURNEY_METHODS else own
            predictions[method] = by_kernel[kernel[method]][:, rows], list(lambdas)
        else:
            predictions[method] = method_predictions(method, train, query, masks, lambdas)
    attrs = {key: train_attrs.get(key) for key in FEATURE_KEYS}
    write_predictions(out_path, predictions, {**attrs, "query_sha256": query_attrs["query_sha256"],
                                              "subsets_sha256": file_sha256(subsets_path)})
