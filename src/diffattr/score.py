"""Attribution scores and their subset sums: TRAK-style S(lambda) = Xq (X^T X + lambda I)^{-1} X^T,
its relative and renormalized variants and DAS (train columns rescaled), Journey-TRAK (the same kernel
on trajectory query features), and kernel-free dot products."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .provenance import (FEATURE_KEYS, REQUIRED_FEATURE_KEYS, RESIDUAL_KEYS, ProvenanceError,
                         require_finite, require_present, require_same, with_arithmetic)
from .methods import METHODS, methods_reading, predictions, write_predictions
from .protocol import FeatureSet, lambda_grid
from .storage import file_sha256, read_array
from .subsets import membership_matrix

RENORMALIZATIONS = (None, "relative", "renormalized", "weighted")
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
    """{renormalization: predictions (L, m, M)} of `subset_predictions`, for several renormalizations,
    from one `Kernel`."""
    kernel = Kernel(train, query, masks, lambdas)
    return {renormalize: kernel.predictions(renormalize, weights) for renormalize in renormalizations}


class Kernel:
    """Subset predictions of the kernel (X^T X + lambda I)^-1 for one set of train and query rows and
    every renormalization, over the whole lambda grid.

    One eigendecomposition serves every renormalization and the whole lambda grid, and the (m, n)
    score matrix is never formed: the masks are applied on the train side first. The k x k matrix
    X^T X is decomposed when k <= n, otherwise the n x n Gram matrix X X^T, using
    (X^T X + lambda I)^{-1} X^T = X^T (X X^T + lambda I)^{-1}.
    """

    def __init__(self, train: np.ndarray, query: np.ndarray, masks: np.ndarray, lambdas):
        x = np.asarray(train, dtype=np.float64)
        xq = np.asarray(query, dtype=np.float64)
        _check_features(x, xq)
        self.sums = _check_masks(masks, len(x)).astype(np.float64).T  # (n, M)
        self.lambdas = np.asarray(lambdas, dtype=np.float64)
        if self.lambdas.ndim != 1 or not np.all(self.lambdas > 0):
            raise ValueError(f"lambdas must be a 1-D sequence of positive values, got {self.lambdas}")
        self.x, (n, k) = x, x.shape
        self.primal = k <= n
        if self.primal:
            e, self.basis = np.linalg.eigh(x.T @ x)
            self.left = xq @ self.basis
        else:
            e, self.basis = np.linalg.eigh(x @ x.T)
            self.left = (xq @ x.T) @ self.basis
        self.e = np.clip(e, 0.0, None)  # round-off can make a PSD matrix's smallest eigenvalues slightly negative

    def _right(self, weights: np.ndarray) -> np.ndarray:
        """V^T X^T diag(weights) masks^T (primal), U^T diag(weights) masks^T (Gram)."""
        if self.primal:
            return self.basis.T @ (self.x.T @ (self.sums * weights[:, None]))
        return self.basis.T @ (self.sums * weights[:, None])

    def _coordinates(self, rows):
        """V^T x_i, so that H^{-1} x_i = V diag(1/(e + lambda)) V^T x_i (primal); U^T e_i, so that
        H^{-1} x_i = X^T U diag(1/(e + lambda)) U^T e_i (Gram)."""
        return self.x[rows] @ self.basis if self.primal else self.basis[rows]

    def predictions(self, renormalize: str | None, weights: np.ndarray | None = None) -> np.ndarray:
        """(L, m, M) of `subset_predictions` with renormalization `renormalize`; 'weighted' multiplies
        train column i by `weights[i]` (DAS's residuals), which it requires."""
        n = len(self.x)
        if renormalize not in RENORMALIZATIONS:
            raise ValueError(f"renormalize must be one of {RENORMALIZATIONS}, got {renormalize!r}")
        if renormalize == "weighted":
            if weights is None or np.shape(weights) != (n,) or not np.all(np.isfinite(weights)):
                raise ValueError(f"'weighted' needs {n} finite train weights, got "
                                 f"{None if weights is None else np.shape(weights)}")
            weights = np.asarray(weights, dtype=np.float64)
        e, left = self.e, self.left
        row_norms = np.linalg.norm(self.x, axis=1)
        if renormalize == "relative":  # w = 0 exactly for a zero row, whatever the round-off in the norms
            norms = _relative_norms(self._coordinates, e, self.primal, self.lambdas, n) * (row_norms > 0)[:, None]
            return np.stack([-(left / (e + lam)) @ self._right(_inverse(norms[:, l]))
                             for l, lam in enumerate(self.lambdas)])
        column = {None: lambda: np.ones(n), "renormalized": lambda: _inverse(row_norms),
                  "weighted": lambda: weights}[renormalize]
        fixed = self._right(column())
        return np.stack([-(left / (e + lam)) @ fixed for lam in self.lambdas])


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


def _check_features(x: np.ndarray, xq: np.ndarray) -> None:
    if x.ndim != 2 or xq.ndim != 2:
        raise ValueError(f"train and query features must be 2-D, got shapes {x.shape} and {xq.shape}")
    if x.shape[1] != xq.shape[1]:
        raise ValueError(f"train features have k={x.shape[1]} columns but query features have k={xq.shape[1]}")


def read_features(path) -> tuple[np.ndarray, dict]:
    """A feature store, refused unless it records its provenance and holds finite (n, proj_dim) rows."""
    features, attrs = read_array(path)
    attrs = with_arithmetic(attrs)  # a store from before featurize.dtype: fp32
    require_present(REQUIRED_FEATURE_KEYS, (str(path), attrs), "diffattr's featurize")
    if features.ndim != 2 or features.shape[1] != attrs["proj_dim"]:
        raise ProvenanceError(f"{path}: features of shape {features.shape}, but its proj_dim is "
                              f"{attrs['proj_dim']}")
    require_finite(str(path), features)
    return features, attrs


def read_feature_pair(train_path, query_path) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Train and query features with their attributes, refused unless computed alike (FEATURE_KEYS)."""
    train, train_attrs = read_features(train_path)
    query, query_attrs = read_features(query_path)
    require_same(FEATURE_KEYS, (str(train_path), train_attrs), (str(query_path), query_attrs))
    return train, query, train_attrs, query_attrs


class DotJob:
    """What methods on one matrix of train rows and one of query rows compute (gradient features,
    flattened images or CLIP embeddings): kernel-free dot products or cosines."""

    lambdas: list = []

    def __init__(self, train: np.ndarray, query: np.ndarray, masks: np.ndarray):
        self.train, self.query, self.masks = train, query, masks

    def dot(self, cosine: bool) -> np.ndarray:
        return dot_predictions(self.train, self.query, self.masks, cosine)


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


class FeatureJob(DotJob):
    """A score job's inputs: train and query features, the subsets, the lambda grid, and the extra
    inputs its methods read (`extras`: Journey-TRAK's query features, DAS's residual weights). Every
    kernel method shares one eigendecomposition: the query rows of every query matrix are stacked."""

    def __init__(self, train: np.ndarray, query: np.ndarray, masks: np.ndarray, lambdas, extras: dict):
        super().__init__(train, query, masks)
        self.lambdas, self.extras = lambdas, extras
        self._rows = {"query": slice(0, len(query))}
        if "journey" in extras:  # stacked under the store's queries: one eigendecomposition serves both
            self._rows["journey"] = slice(len(query), len(query) + len(extras["journey"]))
        self._stacked = np.concatenate([query, extras["journey"]]) if "journey" in extras else query
        self._kernel, self._by_renormalization = None, {}

    def kernel(self, renormalize: str | None, queries: str = "query", weights: str | None = None) -> np.ndarray:
        """Predictions of the kernel with `renormalize` for the rows of `queries` ('query' or an extra
        input of query features), train columns weighted by the extra input `weights`."""
        if self._kernel is None:
            self._kernel = Kernel(self.train, self._stacked, self.masks, self.lambdas)
        key = (renormalize, weights)
        if key not in self._by_renormalization:
            self._by_renormalization[key] = self._kernel.predictions(
                renormalize, None if weights is None else self.extras[weights])
        return self._by_renormalization[key][:, self._rows[queries]]


READERS = {"journey": lambda path, train_path, train_attrs, query_attrs, n:
           read_journey(path, train_path, train_attrs, query_attrs),
           "residual": lambda path, train_path, train_attrs, query_attrs, n:
           read_residuals(path, train_path, train_attrs, n)}


def singleton_scores(method: str, train: np.ndarray, query: np.ndarray, lam: float | None = None,
                     extras: dict | None = None) -> np.ndarray:
    """(m, n) attribution scores S(z, i) of registered `method` (at `lam`, for a method with a lambda)
    for the `query` rows against every `train` row: its predictions over the n singleton subsets {i}
    are -S(z, i) (the galleries' and the counterfactual removals' scores)."""
    train = np.asarray(train).reshape(len(train), -1)
    query = np.asarray(query).reshape(len(query), -1)
    masks = np.eye(len(train), dtype=bool)
    if METHODS[method].reads in ("pixels", "embeddings"):
        job = DotJob(train, query, masks)
    else:
        if METHODS[method].uses_lambda and lam is None:
            raise ValueError(f"{method} scores at a lambda; none was given")
        job = FeatureJob(train, query, masks, [lam] if METHODS[method].uses_lambda else [], extras or {})
    return -METHODS[method].predict(job)[0]


def score_split(train_path, query_path, subsets_path, spec: dict, out_path, split: str | None = None,
                extra_paths: dict | None = None) -> None:
    """Subset predictions g_j(z) of every method in `spec['methods']` (default every method on
    features) that applies to the features' feature set and query `split` (`Method.applies`), each
    over the lambda grid or at its single point, in one store with their provenance. `extra_paths`
    gives the stores of the extra inputs those methods read ({'journey': ..., 'residual': ...})."""
    train, query, train_attrs, query_attrs = read_feature_pair(train_path, query_path)
    masks = read_masks(subsets_path, len(train), train_path)
    fset = FeatureSet(train_attrs["function"], int(train_attrs["K"]), int(train_attrs["proj_dim"]),
                      step=train_attrs.get("checkpoint"))
    methods = [name for name in spec.get("methods", methods_reading("features"))
               if METHODS[name].applies(fset, split)]
    extras, extra_paths = {}, extra_paths or {}
    for extra in dict.fromkeys(e for name in methods for e in METHODS[name].extra_inputs):
        if extra not in extra_paths:
            raise ValueError(f"{', '.join(n for n in methods if extra in METHODS[n].extra_inputs)} needs the "
                             f"{extra} store of {train_path}")
        extras[extra] = READERS[extra](extra_paths[extra], train_path, train_attrs, query_attrs, len(train))
    job = FeatureJob(train, query, masks, lambda_grid(spec["lambda_exponents"]), extras)
    attrs = {key: train_attrs.get(key) for key in FEATURE_KEYS}
    write_predictions(out_path, predictions(methods, job), {**attrs, "query_sha256": query_attrs["query_sha256"],
                                                            "subsets_sha256": file_sha256(subsets_path)})
