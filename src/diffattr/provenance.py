"""Refuse to combine arrays whose recorded provenance disagrees, or that record none."""
from __future__ import annotations

import json

import numpy as np

# Everything that changes a feature's value except the images themselves. `device` ('cpu' or the GPU
# model) also identifies the projector's matrix: torch's CPU and CUDA generators draw different numbers
# from one seed (BasicProjector), and fast_jl's matrix depends on the GPU (`gpu`, `sm_count`).
# `checkpoint`: the training step of the weights when they are a kept checkpoint (None: the final ones).
# A factorized projection (diffattr.factorized) records its split and its dense part's matrix.
# `arithmetic`: featurize.dtype, fp32 or tf32 (`dtype` is the array's); a store written before the key
# records none and reads as fp32 (with_arithmetic).
FEATURE_KEYS = ("model_sha256", "checkpoint", "function", "K", "timesteps", "scheme", "noise_seed", "dtype",
                "arithmetic", "device",
                "projector", "proj_dim", "proj_seed", "proj_type", "grad_dim", "block_size", "gpu",
                "sm_count", "noises", "factor_split", "factor_sides", "factorized_layers", "dense_dim", "dense")
# What every feature store written by featurize records; a store without them is not trusted.
REQUIRED_FEATURE_KEYS = ("model_sha256", "function", "K", "timesteps", "projector", "proj_dim",
                         "proj_seed", "query_sha256")
# What DAS's residual weights of the train split share with the train features they weight.
RESIDUAL_KEYS = ("model_sha256", "timesteps", "noise_seed", "query_sha256")
# What a model's ground truth must share with every other model's (query hashes are per split).
GROUND_TRUTH_KEYS = ("query_sha256", "timesteps", "noise_seeds", "function", "dtype", "subsets_sha256")
REQUIRED_GROUND_TRUTH_KEYS = ("model_sha256", "query_sha256", "timesteps", "noise_seeds")


class ProvenanceError(ValueError):
    pass


def with_arithmetic(attrs: dict) -> dict:
    """A gradient store's attributes with its `arithmetic`, fp32 (the only one there was) when it was
    written before featurize.dtype and records none."""
    return {**attrs, "arithmetic": attrs.get("arithmetic") or "fp32"}


def require_same(keys, first: tuple[str, dict], second: tuple[str, dict]) -> None:
    """Raise naming both files and every key on which their attributes differ."""
    (name_a, attrs_a), (name_b, attrs_b) = first, second
    diffs = [f"{key}: {_short(attrs_a.get(key))} vs {_short(attrs_b.get(key))}"
             for key in keys if attrs_a.get(key) != attrs_b.get(key)]
    if diffs:
        raise ProvenanceError(f"{name_a} and {name_b} cannot be combined; they differ in "
                              + "; ".join(diffs))


def require_present(keys, store: tuple[str, dict], written_by: str) -> None:
    """Raise when a store lacks provenance attributes that `written_by` always records."""
    name, attrs = store
    missing = [key for key in keys if attrs.get(key) is None]
    if missing:
        raise ProvenanceError(f"{name} records no {', '.join(missing)}: it was not written by "
                              f"{written_by} (or by an older version); recompute it")


def require_finite(name: str, data: np.ndarray) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ProvenanceError(f"{name} holds {int(bad.sum())} non-finite values (first at {where}); "
                              "recompute it")


def _short(value) -> str:
    """A long list shown by its ends and length, so that 1000 timesteps fit in an error line."""
    if isinstance(value, (list, tuple)) and len(value) > 6:
        ends = ", ".join(json.dumps(v) for v in value[:3]) + ", ..., " + json.dumps(value[-1])
        return f"[{ends}] ({len(value)} values)"
    return repr(value)
