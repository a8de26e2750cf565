"""TRAK / D-TRAK ensembles: the kernel score S_c = Xq_c (X_c^T X_c + lambda I)^{-1} X_c^T of each of C
models trained on random subsets (each featurizing every train image), averaged over the models
(protocol, Scoring: "Ensembles over C models: average the C score matrices")."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import zarr

from .methods import predictions, write_predictions
from .provenance import FEATURE_KEYS, ProvenanceError, require_same
from .protocol import lambda_grid
from .score import kernel_predictions, read_feature_pair, read_masks
from .storage import file_sha256

# What every model's features must share: all of their provenance but the model itself and what a
# factorized projection's `norm` split measures on it (each model's sides, hence its dense part's k):
# each model's kernel is computed apart, so only its own train and query features must agree.
MODEL_KEYS = ("model_sha256", "factor_sides", "dense_dim", "dense")
SHARED_KEYS = tuple(key for key in FEATURE_KEYS if key not in MODEL_KEYS)


def ensemble_predictions(models: Iterable[tuple[np.ndarray, np.ndarray]], masks: np.ndarray,
                         lambdas) -> np.ndarray:
    """Predictions (L, m, M) of the averaged score matrix: the mean over models c of
    -sum_{i in subset j} S_c(lambda_l)[z, i] (subset sums are linear in S, so averaging them averages
    the matrices). `models` yields (train features, query features) one model at a time."""
    total, count = None, 0
    for train, query in models:
        preds = kernel_predictions(train, query, masks, lambdas, [None])[None]
        total = preds if total is None else total + preds
        count += 1
    if not count:
        raise ValueError("an ensemble needs at least one model")
    return total / count


class EnsembleJob:
    """The inputs of the methods that read several retrained models' features (Method.reads
    'ensemble'): `models` yields each model's (train, query) features once."""

    def __init__(self, models: Iterable[tuple[np.ndarray, np.ndarray]], masks: np.ndarray, lambdas):
        self.models, self.masks, self.lambdas = models, masks, lambdas

    def kernel(self, renormalize: None) -> np.ndarray:
        if renormalize is not None:
            raise ValueError(f"an ensemble averages TRAK's kernel scores; got renormalization {renormalize!r}")
        return ensemble_predictions(self.models, self.masks, self.lambdas)


def ensemble_split(train_paths, query_paths, subsets_path, spec: dict, out_path) -> None:
    """The `trak_ens` predictions of the C = len(train_paths) models whose features are given (model c's
    train and query features at position c), in one predictions store that records C as `models`."""
    if len(train_paths) != len(query_paths) or not len(train_paths):
        raise ValueError(f"an ensemble needs the train and query features of each model; got "
                         f"{len(train_paths)} train and {len(query_paths)} query stores")
    lambdas = lambda_grid(spec["lambda_exponents"])
    n = zarr.open_array(train_paths[0], mode="r").shape[0]
    masks = read_masks(subsets_path, n, train_paths[0])
    seen: dict[str, tuple] = {}  # model_sha256 -> ((train path, attrs), (query path, attrs))

    def models():
        for train_path, query_path in zip(train_paths, query_paths):
            train, query, train_attrs, query_attrs = read_feature_pair(train_path, query_path)
            train_store, query_store = (str(train_path), train_attrs), (str(query_path), query_attrs)
            if seen:
                first_train, first_query = next(iter(seen.values()))
                # the same settings, train images and queries; query_sha256 hashes a store's images
                require_same((*SHARED_KEYS, "query_sha256"), first_train, train_store)
                require_same(("query_sha256",), first_query, query_store)
            if train_attrs["model_sha256"] in seen:
                raise ProvenanceError(f"{train_path} and {seen[train_attrs['model_sha256']][0][0]} are features "
                                      "of the same model; an ensemble averages distinct models")
            seen[train_attrs["model_sha256"]] = train_store, query_store
            yield train, query

    stored = predictions(["trak_ens"], EnsembleJob(models(), masks, lambdas))
    (_, train_attrs), (_, query_attrs) = next(iter(seen.values()))
    write_predictions(out_path, stored, {
        **{key: train_attrs.get(key) for key in SHARED_KEYS}, "model_sha256": list(seen),
        "models": len(seen), "query_sha256": query_attrs["query_sha256"],
        "subsets_sha256": file_sha256(subsets_path)})
