"""Noise as a pure function of (seed, sample index, timestep, draw): never of batch size or position."""
from __future__ import annotations

import numpy as np
import torch


def gaussian(seed: int, index: int, t: int, shape: tuple[int, ...], draw: int = 0) -> np.ndarray:
    """Draw 0 is the noise of (seed, index, t); draw d > 0 another, independent one (numpy's seed
    sequence ignores a trailing 0, so [seed, index, t, d] is a new key exactly when d > 0)."""
    key = [int(seed), int(index), int(t)] + ([int(draw)] if draw else [])
    return np.random.default_rng(key).standard_normal(shape, dtype=np.float32)


def noise_batch(keys, shape) -> torch.Tensor:
    """Noise for each (seed, index, t) or (seed, index, t, draw) key, stacked along the batch axis."""
    return torch.from_numpy(np.stack([gaussian(s, i, t, shape, *draw) for s, i, t, *draw in keys]))
