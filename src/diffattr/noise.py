"""Noise as a pure function of (seed, sample index, timestep): never of batch size or position."""
from __future__ import annotations

import numpy as np
import torch


def gaussian(seed: int, index: int, t: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([int(seed), int(index), int(t)]).standard_normal(shape, dtype=np.float32)


def noise_batch(triples, shape) -> torch.Tensor:
    """Noise for each (seed, index, t) triple, stacked along the batch axis."""
    return torch.from_numpy(np.stack([gaussian(s, i, t, shape) for s, i, t in triples]))
