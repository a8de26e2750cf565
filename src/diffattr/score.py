"""TRAK-style attribution scores S(lambda) = Xq (X^T X + lambda I)^{-1} X^T and their subset sums."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .provenance import (FEATURE_KEYS, REQUIRED_FEATURE_KEYS, ProvenanceError, require_finite,
                         require_present, require_same)
from .storage import file_sha256, read_array, write_array
from .subsets import membership_matrix


def scores(train: np.ndarray, query: np.ndarray, lam: float) -> np.ndarray:
    """Score matrix (m, n) for one lambda: query features Xq (m, k), train features X (n, k)."""
    x = np.asarray(train, dtype=np.float64)
    xq = np.asarray(query, dtype=np.float64)
    _check_features(x, xq)
    gram = x.T @ x + lam * np.eye(x.shape[1])
    return np.linalg.solve(gram, xq.T).T @ x.T  # gram is symmetric, so (gram^{-1} Xq^T)^T = Xq gram^{-1}


def subset_predictions(train: np.ndarray, query: np.ndarray, masks: np.ndarray, lambdas) -> np.ndarray:
    """Predicted outputs (L, m, M): pred[l, z, j] = -sum_{i in subset j} S(lambda_l)[z, i].

    One eigendecomposition serves the whole lambda grid, and the (m, n) score matrix is never
    formed: the masks are applied on the train side first. The k x k matrix X^T X is decomposed
    when k <= n, otherwise the n x n Gram matrix X X^T, using
    (X^T X + lambda I)^{-1} X^T = X^T (X X^T + lambda I)^{-1}.
    """
    x = np.asarray(train, dtype=np.float64)
    xq = np.asarray(query, dtype=np.float64)
    _check_features(x, xq)
    masks = np.asarray(masks)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    n, k = x.shape
    if masks.ndim != 2 or masks.shape[1] != n:
        raise ValueError(f"masks must have shape (M, n={n}), got {masks.shape}")
    if lambdas.ndim != 1 or not np.all(lambdas > 0):
        raise ValueError(f"lambdas must be a 1-D sequence of positive values, got {lambdas}")
    sums = masks.astype(np.float64).T  # (n, M)
    if k <= n:
        e, v = np.linalg.eigh(x.T @ x)
        left, right = xq @ v, v.T @ (x.T @ sums)
    else:
        e, u = np.linalg.eigh(x @ x.T)
        left, right = (xq @ x.T) @ u, u.T @ sums
    e = np.clip(e, 0.0, None)  # round-off can make a PSD matrix's smallest eigenvalues slightly negative
    return np.stack([-(left / (e + lam)) @ right for lam in lambdas])


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


def score_split(train_path, query_path, subsets_path, spec: dict, out_path) -> None:
    """Subset predictions g_j(z) for every lambda of the grid (L, m, M), with provenance."""
    train, train_attrs = read_features(train_path)
    query, query_attrs = read_features(query_path)
    require_same(FEATURE_KEYS, (str(train_path), train_attrs), (str(query_path), query_attrs))
    table = pd.read_csv(subsets_path)
    if len(table) and table["train_position"].max() >= len(train):
        raise ProvenanceError(f"{subsets_path} names train position {table['train_position'].max()}, but "
                              f"{train_path} has features of {len(train)} train images")
    masks = membership_matrix(table, len(train))
    low, high = spec["lambda_exponents"]
    lambdas = lambda_grid(range(int(low), int(high) + 1))
    preds = subset_predictions(train, query, masks, lambdas)
    attrs = {key: train_attrs.get(key) for key in FEATURE_KEYS}
    write_array(out_path, preds, {**attrs, "lambdas": lambdas, "query_sha256": query_attrs["query_sha256"],
                                  "subsets_sha256": file_sha256(subsets_path)})
