"""TracInCP and GAS: gradient similarities summed over checkpoints of the full model's training.

TracInCP(z, i) = sum_c phi_c(z) . phi_c(x_i) (Pruthi et al. 2020), phi_c the projected gradient of
the feature function at checkpoint c: the kept training checkpoints a featurize grid lists and the
final weights. GAS (Hammoudeh & Lowd 2022) is the same sum of cosines. No learning-rate weights:
Pruthi et al. weight checkpoint c by the learning rate there, but the D-TRAK paper's formula for its
TracInCP baseline is lost from our copy of its text (../shared/seeds/), which says only that four
checkpoints spread evenly over training are used, so the terms are summed unweighted. (The paper's
reference notebook, sail-sg/D-TRAK CIFAR2/methods/01_tracin, also forms the per-checkpoint products
X_q,c X_c^T and their cosines without any weight.)
"""
from __future__ import annotations

import numpy as np

from .methods import methods_reading, predictions, write_predictions
from .provenance import FEATURE_KEYS, ProvenanceError, require_same
from .score import dot_predictions, read_feature_pair, read_masks
from .storage import file_sha256

# What the features of every checkpoint share: everything but the weights they were computed from.
TRAJECTORY_KEYS = tuple(key for key in FEATURE_KEYS if key not in ("model_sha256", "checkpoint"))


def trajectory_predictions(trains, queries, masks: np.ndarray, cosine: bool = False) -> np.ndarray:
    """Predicted outputs (1, m, M): pred[0, z, j] = -sum_{i in subset j} sum_c S_c(z, i), with
    S_c = Xq_c X_c^T (TracInCP) or its cosines (GAS), for train features X_c (n, k) and query features
    Xq_c (m, k) of each checkpoint c."""
    if len(trains) != len(queries) or not trains:
        raise ValueError(f"expected train and query features of the same checkpoints, at least one; got "
                         f"{len(trains)} train and {len(queries)} query feature matrices")
    return sum(dot_predictions(x, xq, masks, cosine) for x, xq in zip(trains, queries))


class TrajectoryJob:
    """The inputs of the methods that read the features of several checkpoints (Method.reads
    'trajectory'): each checkpoint's train and query features."""

    lambdas: list = []

    def __init__(self, trains, queries, masks: np.ndarray):
        self.trains, self.queries, self.masks = trains, queries, masks

    def dot(self, cosine: bool) -> np.ndarray:
        return trajectory_predictions(self.trains, self.queries, self.masks, cosine)


def read_trajectory(train_paths, query_paths) -> tuple[list, list, list[dict], list[dict]]:
    """Train and query features of each checkpoint with their attributes, refused unless every pair
    comes from one checkpoint and all checkpoints share function, K, k, timesteps, noise, projector,
    train images and query images, and no weights appear twice."""
    if len(train_paths) != len(query_paths) or not train_paths:
        raise ValueError(f"expected one query store per train store, at least one; got {len(train_paths)} "
                         f"train and {len(query_paths)} query stores")
    trains, queries, train_attrs, query_attrs = [], [], [], []
    shared = (*TRAJECTORY_KEYS, "query_sha256")  # query_sha256: the hash of the store's images
    for train_path, query_path in zip(train_paths, query_paths):
        train, query, t_attrs, q_attrs = read_feature_pair(train_path, query_path)
        if train_attrs:
            require_same(shared, (str(train_paths[0]), train_attrs[0]), (str(train_path), t_attrs))
            require_same(shared, (str(query_paths[0]), query_attrs[0]), (str(query_path), q_attrs))
        trains.append(train)
        queries.append(query)
        train_attrs.append(t_attrs)
        query_attrs.append(q_attrs)
    seen: dict[str, str] = {}
    for path, attrs in zip(train_paths, train_attrs):
        if attrs["model_sha256"] in seen:
            raise ProvenanceError(f"{path} and {seen[attrs['model_sha256']]} are features of the same weights "
                                  f"(model_sha256 {attrs['model_sha256']}); expected one store per checkpoint")
        seen[attrs["model_sha256"]] = str(path)
    return trains, queries, train_attrs, query_attrs


def score_trajectory(train_paths, query_paths, subsets_path, methods, out_path) -> None:
    """Subset predictions of TracInCP and / or GAS (`methods`) over the checkpoints whose feature stores
    are given (train and query stores in the same order), in one predictions store whose `checkpoints`
    attribute lists their training steps (None for the final weights)."""
    known = methods_reading("trajectory")
    if not methods or any(method not in known for method in methods):
        raise ValueError(f"trajectory methods {list(methods)}: expected a non-empty list of {', '.join(known)}")
    trains, queries, train_attrs, query_attrs = read_trajectory(train_paths, query_paths)
    masks = read_masks(subsets_path, len(trains[0]), train_paths[0])
    job = TrajectoryJob(trains, queries, masks)
    write_predictions(out_path, predictions(methods, job), {
        **{key: train_attrs[0].get(key) for key in TRAJECTORY_KEYS},
        "checkpoints": [each.get("checkpoint") for each in train_attrs],
        "model_sha256": [each["model_sha256"] for each in train_attrs],
        "query_sha256": query_attrs[0]["query_sha256"], "subsets_sha256": file_sha256(subsets_path)})
