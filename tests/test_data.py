"""Datasets, LDS subsets and atomic outputs."""
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from diffattr.data import build_splits, load_images, stratified_split
from diffattr.storage import atomic_output, read_array
from diffattr.subsets import make_subsets, membership_matrix


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def class_counts(labels, classes):
    return np.array([(labels == c).sum() for c in classes])


# ---------------------------------------------------------------- LDS subsets

@pytest.fixture(scope="module")
def imbalanced_labels():
    labels = np.repeat([0, 1, 2], [10, 7, 5])
    return np.random.default_rng(0).permutation(labels)


def test_make_subsets_sizes_strata_and_seeds(imbalanced_labels):
    labels, m, alpha, base = imbalanced_labels, 5, 0.5, 42
    table = make_subsets(labels, m, alpha, base)
    assert list(table.columns) == ["subset", "seed", "train_position"]
    assert sorted(table["subset"].unique()) == list(range(m))
    classes = np.unique(labels)
    full = class_counts(labels, classes)
    for j, group in table.groupby("subset"):
        positions = group["train_position"].to_numpy()
        assert len(positions) == round(alpha * len(labels)) == 11
        assert np.all(np.diff(positions) > 0)  # sorted, no repeats
        assert positions.min() >= 0 and positions.max() < len(labels)
        assert set(group["seed"]) == {base + 2 * j}
        # stratified: each class holds alpha of its members, up to rounding
        assert np.all(np.abs(class_counts(labels[positions], classes) - alpha * full) <= 1), j


def test_make_subsets_is_reproducible_and_subsets_differ(imbalanced_labels):
    a = make_subsets(imbalanced_labels, 6, 0.5, 42)
    pd.testing.assert_frame_equal(a, make_subsets(imbalanced_labels, 6, 0.5, 42))
    sets = [frozenset(g["train_position"]) for _, g in a.groupby("subset")]
    assert len(set(sets)) == len(sets)
    assert not a.equals(make_subsets(imbalanced_labels, 6, 0.5, 43))


def test_subset_j_is_drawn_with_its_own_seed(imbalanced_labels):
    """Subset j of base b is the subset 0 of base b + 2j: each subset depends on its seed only."""
    table = make_subsets(imbalanced_labels, 4, 0.5, 42)
    for j in range(4):
        alone = make_subsets(imbalanced_labels, 1, 0.5, 42 + 2 * j)
        np.testing.assert_array_equal(table.loc[table["subset"] == j, "train_position"],
                                      alone["train_position"])


def test_membership_matrix_matches_table(imbalanced_labels):
    n = len(imbalanced_labels)
    table = make_subsets(imbalanced_labels, 5, 0.5, 7)
    masks = membership_matrix(table, n)
    assert masks.dtype == bool and masks.shape == (5, n)
    for j in range(5):
        np.testing.assert_array_equal(np.flatnonzero(masks[j]),
                                      table.loc[table["subset"] == j, "train_position"])
    assert masks.sum() == len(table)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
def test_make_subsets_rejects_empty_or_full_subsets(imbalanced_labels, alpha):
    with pytest.raises(ValueError):
        make_subsets(imbalanced_labels, 2, alpha, 42)


# ---------------------------------------------------------------- splits

def test_stratified_split(digits):
    labels = digits.target
    classes = np.unique(labels)
    train, val = stratified_split(labels, 400, 100, seed=0)
    assert len(train) == 400 and len(val) == 100
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not set(train) & set(val)
    assert train.min() >= 0 and max(train.max(), val.max()) < len(labels)
    share = class_counts(labels, classes) / len(labels)
    assert np.all(np.abs(class_counts(labels[train], classes) - 400 * share) <= 1)
    assert np.all(np.abs(class_counts(labels[val], classes) - 100 * share) <= 2)
    again = stratified_split(labels, 400, 100, seed=0)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    other = stratified_split(labels, 400, 100, seed=1)
    assert not np.array_equal(other[0], train)


def test_stratified_split_using_every_image():
    labels = np.repeat([0, 1], [30, 20])
    train, val = stratified_split(labels, 40, 10, seed=3)
    assert len(train) == 40 and len(val) == 10
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))
    assert class_counts(labels[val], [0, 1]).tolist() == [6, 4]


def test_stratified_split_rejects_too_many():
    with pytest.raises(ValueError):
        stratified_split(np.repeat([0, 1], 10), 15, 6, seed=0)


def test_build_splits_sklearn_digits(digits, tmp_path):
    spec = {"source": "sklearn_digits", "image_size": 8, "n_train": 60, "n_val": 20, "split_seed": 0}
    out = {f"{split}_{kind}": tmp_path / f"{split}.{'zarr' if kind == 'images' else 'csv'}"
           for split in ("train", "val") for kind in ("images", "index")}
    build_splits(spec, out)
    expected_index = dict(zip(("train", "val"), stratified_split(digits.target, 60, 20, 0)))
    for split, n in (("train", 60), ("val", 20)):
        images, attrs = read_array(out[f"{split}_images"])
        np.testing.assert_array_equal(load_images(out[f"{split}_images"]), images)
        assert images.dtype == np.float32 and images.shape == (n, 1, 8, 8)
        assert images.min() >= -1 and images.max() <= 1
        assert attrs["split"] == split
        table = pd.read_csv(out[f"{split}_index"])
        assert list(table["position"]) == list(range(n))
        original = table["original_index"].to_numpy()
        np.testing.assert_array_equal(original, expected_index[split])
        np.testing.assert_array_equal(table["label"], digits.target[original])
        # pixel values 0..16 mapped linearly onto [-1, 1]
        np.testing.assert_allclose(images[:, 0], digits.images[original] / 8.0 - 1.0, rtol=0, atol=1e-6)
    assert images.min() == -1 and images.max() == 1  # the full range is used
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


# ---------------------------------------------------------------- atomic outputs

def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_failure_leaves_nothing(tmp_path, exc):
    target = tmp_path / "sub" / "out.zarr"
    with pytest.raises(exc):
        with atomic_output(target) as tmp:
            tmp.mkdir()
            (tmp / "part").write_text("half written")
            raise exc("boom")
    assert not target.exists()
    assert leftovers(target.parent) == []


def test_atomic_output_failure_keeps_previous_output(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_output_success_writes_and_replaces(tmp_path):
    target = tmp_path / "out.csv"
    with atomic_output(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        assert not target.exists()  # nothing visible while the block runs
        tmp.write_text("first")
    assert target.read_text() == "first"
    with atomic_output(target) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_atomic_output_replaces_directory_without_merging(tmp_path):
    target = tmp_path / "store"
    target.mkdir()
    (target / "stale").write_text("old chunk")
    with atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("new chunk")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
    assert leftovers(tmp_path) == []


def test_atomic_output_clears_stale_temporary(tmp_path):
    """A temporary left by a killed job with the same pid is not merged into the new output."""
    target = tmp_path / "store"
    stale = tmp_path / f".store.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "junk").write_text("from a killed job")
    with atomic_output(target) as tmp:
        assert not tmp.exists()
        tmp.mkdir()
        (tmp / "data").write_text("ok")
    assert sorted(p.name for p in target.iterdir()) == ["data"]
    assert leftovers(tmp_path) == []
