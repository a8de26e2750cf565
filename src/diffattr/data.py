"""Datasets: load a source, split it stratified, store images (zarr) and an index table per split.

Each image store carries its images' class labels in its attribute `labels` (`load_labels`), so
that the stages condition a model on them without the index table.

Sources (`dataset.source`):
- `sklearn_digits`: one pool of images, split stratified into train and val (`classes`: the digits
  kept, e.g. ["5", "6"], labelled 0, 1, ...);
- `cifar10`, `celeba`, `image_folder`, `artbench`: sources with their own train/test partition (read by
  `diffattr.datasets`). As in the paper, n_train images are drawn stratified from the source's
  train images and n_val from its test images, both with `split_seed` (CelebA: partitions train
  and test of list_eval_partition.txt).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .datasets import SHORT_SIDE
from .storage import atomic_output, read_array, read_attrs, write_array


PARTITIONED_SOURCES = ("cifar10", "celeba", "image_folder", "artbench")
# per source: the defaults of dataset.image_size and dataset.crop (crop SHORT_SIDE: the central square)
SOURCE_DEFAULTS = {"celeba": (64, 140), "artbench": (256, SHORT_SIDE)}
SOURCES = ("sklearn_digits", *PARTITIONED_SOURCES)
# Which split of a partitioned source feeds each of our splits, and the count's config key.
PARTITION = {"train": ("train", "n_train"), "val": ("test", "n_val")}
DIGITS = tuple(str(d) for d in range(10))  # sklearn_digits' class names (dataset.classes)


def load_source(spec: dict):
    """Images as float32 (N, C, H, W) in [-1, 1] and integer labels (N,).

    A pool source gives one (images, labels); a partitioned source gives
    {"train": (images, labels), "test": (images, labels)} with every image of each split.
    """
    source = spec["source"]
    if source == "sklearn_digits":
        return _select_digits(*_sklearn_digits(int(spec.get("image_size", 8))), _classes(spec))
    if source in PARTITIONED_SOURCES:
        return {split: (to_float(part.read()), part.labels)
                for split, part in open_partitioned(spec).items()}
    raise ValueError(f"dataset.source: unknown source '{source}' (expected one of {', '.join(SOURCES)})")


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return (images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).clip(-1, 1)


def _optional_int(spec: dict, key: str, default=None) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"dataset.{key}: expected a positive integer or null, got {value!r}")
    return value


def _classes(spec: dict):
    classes = spec.get("classes")
    if classes is None:
        return None
    if (isinstance(classes, str) or not isinstance(classes, (list, tuple)) or not classes
            or not all(isinstance(c, str) for c in classes)):
        raise ValueError(f"dataset.classes: expected null or a non-empty list of class names, "
                         f"got {classes!r}")
    return list(classes)


@contextlib.contextmanager
def _config_key_errors():
    """Name the config key in the readers' errors about `classes` (`dataset.classes: ...`)."""
    try:
        yield
    except ValueError as error:
        if str(error).startswith("classes:"):
            raise ValueError(f"dataset.{error}") from None
        raise


def open_partitioned(spec: dict) -> dict:
    """The `train` and `test` splits of a partitioned source, listed, not yet decoded
    (`diffattr.datasets.SplitSource`)."""
    from . import datasets

    source, path = spec["source"], spec.get("path")
    if path is None:
        if source == "cifar10":
            raise ValueError(
                "dataset.path: null stands for the official CIFAR-10 archive that the workflow "
                "downloads (data/downloads/cifar-10-python.tar.gz); outside the workflow, set it to "
                "a local copy (the tarball, an extracted cifar-10-batches-py folder or an ImageFolder "
                "tree or archive), e.g. one fetched with diffattr.datasets.fetch_cifar10")
        raise ValueError(f"dataset.path: source {source} needs the path of a local copy, got null")
    if not isinstance(path, (str, Path)):
        raise ValueError(f"dataset.path: expected a file or folder path, got {path!r}")
    if not Path(path).exists():
        hint = {"celeba": f"\n{datasets.celeba_help(path)}",
                "artbench": f"; {datasets.artbench_help(path)}"}.get(source, "")
        raise FileNotFoundError(f"dataset.path: {path} does not exist{hint}")
    size, crop = SOURCE_DEFAULTS.get(source, (None, None))
    size = _optional_int(spec, "image_size", size)
    crop = _optional_int(spec, "crop") if "crop" in spec else crop
    classes = _classes(spec)
    with _config_key_errors():
        if source == "cifar10":
            if crop is not None:
                raise ValueError("dataset.crop: not supported for source cifar10 (expected null)")
            return datasets.open_cifar10(path, classes, size)
        if source == "celeba":
            if classes is not None:
                raise ValueError("dataset.classes: CelebA has no classes (expected null)")
            return {split: datasets.open_celeba(path, split, crop, size) for split in ("train", "test")}
        if source in ("image_folder", "artbench"):
            parts = {split: datasets.open_image_folder(path, split, classes, crop, size)
                     for split in ("train", "test")}
            if parts["train"].classes != parts["test"].classes:  # labels would mean different classes
                only = {split: sorted(set(parts[split].classes) - set(parts[other].classes))
                        for split, other in (("train", "test"), ("test", "train"))}
                raise FileNotFoundError(
                    f"{path}: train/ and test/ hold different class folders (only in train: "
                    f"{', '.join(only['train']) or 'none'}; only in test: {', '.join(only['test']) or 'none'}); "
                    "add the missing folders or list the classes to use in dataset.classes")
            return parts
    raise ValueError(f"dataset.source: '{source}' has no train/test partition "
                     f"(expected one of {', '.join(PARTITIONED_SOURCES)})")


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


def _select_digits(images: np.ndarray, labels: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """The digits of `classes` (names "0".."9"), labelled by their position in it (all ten: unchanged)."""
    if classes is None:
        return images, labels
    if unknown := [c for c in classes if c not in DIGITS]:
        raise ValueError(f"dataset.classes: {unknown} are not digits (expected names among {', '.join(DIGITS)})")
    if len(set(classes)) != len(classes):
        raise ValueError(f"dataset.classes: {classes} names a digit twice")
    keep = np.isin(labels, [int(c) for c in classes])
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[[int(c) for c in classes]] = np.arange(len(classes))
    return images[keep], relabel[labels[keep]]


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


def stratified_sample(labels: np.ndarray, n: int, seed: int, what: str = "dataset") -> np.ndarray:
    """n positions drawn class-stratified, sorted; all of them when n is the number of labels."""
    if not 1 <= n <= len(labels):
        raise ValueError(f"{what}: {n} images asked for, expected 1 to {len(labels)}")
    if n == len(labels):
        return np.arange(n)
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels,
                                 random_state=seed)
    return np.sort(chosen)


def build_splits(spec: dict, out: dict) -> None:
    """Write `train`/`val` image stores and index tables to the paths in `out`."""
    if spec["source"] in PARTITIONED_SOURCES:
        return _build_partitioned(spec, out)
    images, labels = load_source(spec)
    splits = dict(zip(("train", "val"), stratified_split(
        labels, int(spec["n_train"]), int(spec["n_val"]), int(spec["split_seed"]))))
    for split, index in splits.items():
        _write_split(out, split, images[index],
                     {"split": split, "source": spec["source"], "range": [-1.0, 1.0]},
                     {"original_index": index, "label": labels[index]})


def _build_partitioned(spec: dict, out: dict) -> None:
    """n_train drawn stratified from the source's train split, n_val from its test split."""
    parts = open_partitioned(spec)
    chosen = {split: stratified_sample(parts[part].labels, int(spec[key]), int(spec["split_seed"]),
                                       f"dataset.{key} (from the {len(parts[part])} {part} images)")
              for split, (part, key) in PARTITION.items()}  # every count checked before writing
    # every image decoded before anything is written: a bad file leaves no split behind
    images = {split: to_float(parts[part].read(chosen[split])) for split, (part, _) in PARTITION.items()}
    for split, (part, _) in PARTITION.items():
        source, positions = parts[part], chosen[split]
        attrs = {"split": split, "source": spec["source"], "source_split": part,
                 "classes": list(source.classes), "range": [-1.0, 1.0]}
        _write_split(out, split, images.pop(split), attrs,
                     {"original_index": source.index[positions], "label": source.labels[positions],
                      "source_split": part})


def _write_split(out: dict, split: str, images: np.ndarray, attrs: dict, columns: dict) -> None:
    write_array(out[f"{split}_images"], images, {**attrs, "labels": [int(c) for c in columns["label"]]})
    table = pd.DataFrame({"position": np.arange(len(images)), **columns})
    with atomic_output(out[f"{split}_index"]) as tmp:
        table.to_csv(tmp, index=False)


def load_images(path) -> np.ndarray:
    return read_array(path)[0]


def load_labels(path) -> np.ndarray | None:
    """(N,) int64 class labels of an image store's images; None for a store without them (a
    generation set of an unconditional model, or a store written before labels were stored)."""
    labels = read_attrs(path).get("labels")
    return None if labels is None else np.asarray(labels, dtype=np.int64)
