"""Datasets: load a source, split it stratified, store images (zarr) and an index table per split."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .storage import atomic_output, read_array, write_array


def load_source(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, C, H, W) in [-1, 1] and integer labels (N,)."""
    source = spec["source"]
    if source == "sklearn_digits":
        return _sklearn_digits(int(spec.get("image_size", 8)))
    raise ValueError(f"dataset.source: unknown source '{source}' (expected: sklearn_digits)")


def _sklearn_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16
    if size != 8:
        import torch
        import torch.nn.functional as F

        images = F.interpolate(torch.from_numpy(images), size=(size, size), mode="bilinear",
                               align_corners=False).clamp(-1, 1).numpy()
    return images, digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, n_train: int, n_val: int, seed: int):
    """Original indices of the train and validation splits, each sorted, class-stratified."""
    if n_train + n_val > len(labels):
        raise ValueError(f"dataset: n_train + n_val = {n_train + n_val} exceeds the {len(labels)} images")
    index = np.arange(len(labels))
    rest = len(labels) - n_train - n_val
    train, holdout = train_test_split(index, train_size=n_train, stratify=labels, random_state=seed)
    if rest:
        val, _ = train_test_split(holdout, train_size=n_val, stratify=labels[holdout], random_state=seed)
    else:
        val = holdout
    return np.sort(train), np.sort(val)


def build_splits(spec: dict, out: dict) -> None:
    """Write `train`/`val` image stores and index tables to the paths in `out`."""
    images, labels = load_source(spec)
    splits = dict(zip(("train", "val"), stratified_split(
        labels, int(spec["n_train"]), int(spec["n_val"]), int(spec["split_seed"]))))
    for split, index in splits.items():
        write_array(out[f"{split}_images"], images[index],
                    {"split": split, "source": spec["source"], "range": [-1.0, 1.0]})
        table = pd.DataFrame({"position": np.arange(len(index)), "original_index": index,
                              "label": labels[index]})
        with atomic_output(out[f"{split}_index"]) as tmp:
            table.to_csv(tmp, index=False)


def load_images(path) -> np.ndarray:
    return read_array(path)[0]
