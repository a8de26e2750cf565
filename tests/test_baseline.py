"""Raw-pixel baselines: their stores, a ranking known by construction, and their LDS rows."""
import numpy as np
import pandas as pd
import pytest

from diffattr.baseline import baseline_split
from diffattr.lds import lds, lds_table
from diffattr.methods import read_predictions
from diffattr.provenance import ProvenanceError
from diffattr.storage import array_sha256, file_sha256, write_array
from diffattr.subsets import make_subsets, membership_matrix

from test_provenance import write_truth

N, SHAPE = 12, (1, 4, 4)
LDS_SPEC = {"lambda_rules": ["oracle", "heldout"], "confidence": 0.9, "bootstrap_resamples": 50,
            "heldout_seed": 0}


@pytest.fixture
def stores(tmp_path):
    """Train image 3 lives on the top half of the pixels, every other train image on the bottom half
    only; query 0 is a copy of image 3 and query 1 a random image."""
    rng = np.random.default_rng(0)
    train = np.zeros((N, *SHAPE), np.float32)
    train[:, :, 2:] = rng.uniform(-1, 1, (N, 1, 2, 4))
    train[3] = 0
    train[3, :, :2] = rng.uniform(-1, 1, (1, 2, 4))
    query = np.stack([train[3], rng.uniform(-1, 1, SHAPE).astype(np.float32)])
    write_array(tmp_path / "train.zarr", train, {})
    write_array(tmp_path / "val.zarr", query, {})
    subsets = tmp_path / "subsets.csv"
    make_subsets(np.arange(N) % 2, 6, 0.5, 42).to_csv(subsets, index=False)
    return tmp_path / "train.zarr", tmp_path / "val.zarr", subsets, train, query


def baseline_predictions(stores, baseline: str, folder):
    """Run `baseline` on `stores` (train path, query path, subsets path, train, query) into `folder`;
    check that the store holds its predictions alone, without lambdas, and the hashes of its inputs;
    return the predictions, the store's attributes and its path."""
    train_path, query_path, subsets, train, query = stores
    out = folder / "scores" / baseline / "val.zarr"
    baseline_split(train_path, query_path, subsets, baseline, out)
    predictions, attrs = read_predictions(out)
    preds, lambdas = predictions[baseline]
    assert list(predictions) == [baseline] and np.isnan(lambdas).all()
    assert attrs["train_sha256"] == array_sha256(train) and attrs["query_sha256"] == array_sha256(query)
    assert attrs["subsets_sha256"] == file_sha256(subsets)
    return preds, attrs, out


def baseline_lds(stores, baseline: str, folder):
    """`baseline`'s LDS table (val queries) against ground truth that is its first query's predictions
    plus noise: the table's rows, the store's path, the predictions and the ground truth."""
    _, _, subsets, _, query = stores
    preds, _, out = baseline_predictions(stores, baseline, folder)
    truth = preds[0] + np.random.default_rng(1).normal(size=preds[0].shape)
    lds_table(out, subsets, truth_stores(folder, truth, array_sha256(query)), "val", LDS_SPEC, folder / "lds.csv")
    return pd.read_csv(folder / "lds.csv"), out, preds, truth


@pytest.mark.parametrize("baseline", ["pixel_dot", "pixel_cos"])
def test_query_equal_to_a_train_image_ranks_its_subsets_first(baseline, stores, tmp_path):
    train_path, query_path, subsets, train, query = stores
    preds, _, _ = baseline_predictions(stores, baseline, tmp_path)
    assert preds.shape == (1, 2, 6)
    masks = membership_matrix(pd.read_csv(subsets), N)
    assert 0 < masks[:, 3].sum() < len(masks)  # some subsets hold image 3, some do not
    # query 0 meets only image 3 (the others are orthogonal to it): -cos = -1, or -||x_3||^2 for dot
    self_score = 1.0 if baseline == "pixel_cos" else float(np.sum(train[3].astype(np.float64) ** 2))
    np.testing.assert_allclose(preds[0, 0], -self_score * masks[:, 3], rtol=1e-12, atol=1e-12)
    assert set(np.flatnonzero(preds[0, 0] == preds[0, 0].min())) == set(np.flatnonzero(masks[:, 3]))
    # query 1, from the flattened images one pair at a time
    x, q = train.reshape(N, -1).astype(np.float64), query[1].ravel().astype(np.float64)
    score = [q @ x[i] / ((np.linalg.norm(q) * np.linalg.norm(x[i])) if baseline == "pixel_cos" else 1)
             for i in range(N)]
    np.testing.assert_allclose(preds[0, 1], [-sum(score[i] for i in range(N) if masks[j, i]) for j in range(6)],
                               rtol=1e-10)


def test_bad_inputs_are_refused(stores, tmp_path):
    train_path, _, subsets, _, _ = stores
    out = tmp_path / "out.zarr"
    with pytest.raises(ValueError, match="unknown baseline 'pixel_l2'; expected one of pixel_dot, pixel_cos"):
        baseline_split(train_path, train_path, subsets, "pixel_l2", out)
    write_array(tmp_path / "big.zarr", np.zeros((2, 1, 8, 8), np.float32), {})
    with pytest.raises(ProvenanceError, match=r"holds images of shape \(1, 4, 4\), but .*big.zarr holds images "
                                              r"of shape \(1, 8, 8\)"):
        baseline_split(train_path, tmp_path / "big.zarr", subsets, "pixel_dot", out)
    make_subsets(np.arange(20) % 2, 4, 0.5, 42).to_csv(tmp_path / "bigger.csv", index=False)
    with pytest.raises(ProvenanceError, match=r"names train position 19, but .*train.zarr has 12 train images$"):
        baseline_split(train_path, train_path, tmp_path / "bigger.csv", "pixel_dot", out)
    assert not out.exists()


def truth_stores(tmp_path, truth, query_sha256):
    paths = {}
    for j in range(truth.shape[1]):
        for r in (0, 1):
            paths[f"s{j:03d}-r{r}"] = tmp_path / "gt" / f"s{j:03d}-r{r}.zarr"
            write_truth(paths[f"s{j:03d}-r{r}"], truth[:, j] + (0.5 if r else -0.5), f"{j}{r}" * 32, query_sha256)
    return paths


def test_baseline_lds_rows(stores, tmp_path):
    _, _, subsets, _, query = stores
    rows, out, preds, truth = baseline_lds(stores, "pixel_cos", tmp_path)
    assert list(rows.lambda_rule) == ["oracle", "heldout"] and set(rows.method) == {"Raw pixel (cos)"}
    assert rows[["function", "timesteps", "proj_dim", "lambda"]].isna().all().all()
    assert rows.lds[0] == pytest.approx(lds(preds[0], truth), rel=1e-12)
    # ground truth of other queries is refused by the query hash the baseline recorded
    other = truth_stores(tmp_path / "other", truth, array_sha256(query[::-1].copy()))
    with pytest.raises(ProvenanceError, match="were computed on different 'val' query sets"):
        lds_table(out, subsets, other, "val", LDS_SPEC, tmp_path / "lds2.csv")
    assert not (tmp_path / "lds2.csv").exists()
