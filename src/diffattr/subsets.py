"""LDS subsets: M stratified random subsets of the training set, one seed each."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split


def subset_seed(base_seed: int, subset: int) -> int:
    """The reference code's seeds: 42, 44, 46, ... for base 42."""
    return base_seed + 2 * subset


def make_subsets(labels: np.ndarray, m: int, alpha: float, base_seed: int) -> pd.DataFrame:
    """Long table (subset, seed, train_position): subset j holds round(alpha n) train positions."""
    n = len(labels)
    size = int(round(alpha * n))
    if not 0 < size < n:
        raise ValueError(f"subsets.alpha={alpha} gives subsets of {size} of {n} images")
    rows = []
    for j in range(m):
        seed = subset_seed(base_seed, j)
        members, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)
        rows.append(pd.DataFrame({"subset": j, "seed": seed, "train_position": np.sort(members)}))
    return pd.concat(rows, ignore_index=True)


def membership_matrix(table: pd.DataFrame, n: int) -> np.ndarray:
    """Boolean (M, n): masks[j, i] is True when train position i is in subset j."""
    m = int(table["subset"].max()) + 1
    masks = np.zeros((m, n), dtype=bool)
    masks[table["subset"].to_numpy(), table["train_position"].to_numpy()] = True
    return masks
