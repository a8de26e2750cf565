"""Refuse to combine arrays whose recorded provenance disagrees."""
from __future__ import annotations

# Everything that changes a feature's value except the images themselves.
FEATURE_KEYS = ("model_sha256", "function", "K", "timesteps", "scheme", "noise_seed", "dtype", "device",
                "projector", "proj_dim", "proj_seed", "proj_type", "grad_dim", "block_size", "gpu",
                "sm_count")


class ProvenanceError(ValueError):
    pass


def require_same(keys, first: tuple[str, dict], second: tuple[str, dict]) -> None:
    """Raise naming both files and every key on which their attributes differ."""
    (name_a, attrs_a), (name_b, attrs_b) = first, second
    diffs = [f"{key}: {attrs_a.get(key)!r} vs {attrs_b.get(key)!r}"
             for key in keys if attrs_a.get(key) != attrs_b.get(key)]
    if diffs:
        raise ProvenanceError(f"{name_a} and {name_b} cannot be combined; they differ in "
                              + "; ".join(diffs))
