"""TRAK / D-TRAK ensembles: the average of the C models' kernel score matrices, each with its own
X^T X + lambda I, and the store that checks its members belong together."""
import numpy as np
import pandas as pd
import pytest

from diffattr.ensemble import ensemble_predictions, ensemble_split
from diffattr.lds import lds
from diffattr.methods import label, read_predictions
from diffattr.provenance import ProvenanceError
from diffattr.protocol import lambda_grid
from diffattr.score import scores
from diffattr.storage import array_sha256, file_sha256, write_array
from diffattr.subsets import make_subsets, membership_matrix

LAMBDAS = [0.1, 1.0, 10.0]


def models(count, n=12, m=3, k=5, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, k)), rng.normal(size=(m, k))) for _ in range(count)]


def dense_ensemble(pairs, masks, lambdas):
    """-sum over each subset of the mean of the models' dense score matrices, one loop per entry."""
    out = np.zeros((len(lambdas), len(pairs[0][1]), len(masks)))
    for l, lam in enumerate(lambdas):
        mean = sum(scores(train, query, lam) for train, query in pairs) / len(pairs)
        for z in range(mean.shape[0]):
            for j, mask in enumerate(masks):
                out[l, z, j] = -sum(mean[z, i] for i in np.flatnonzero(mask))
    return out


@pytest.mark.parametrize("count", [1, 2, 4])
def test_ensemble_is_the_mean_of_the_models_kernel_scores(count):
    masks = membership_matrix(make_subsets(np.arange(12) % 2, 5, 0.5, 42), 12)
    pairs = models(count)
    got = ensemble_predictions(iter(pairs), masks, LAMBDAS)
    np.testing.assert_allclose(got, dense_ensemble(pairs, masks, LAMBDAS), rtol=1e-9, atol=1e-12)
    if count > 1:  # each model has its own kernel: not the kernel of the averaged features
        mean_features = (sum(t for t, _ in pairs) / count, sum(q for _, q in pairs) / count)
        assert not np.allclose(got, dense_ensemble([mean_features], masks, LAMBDAS))


def test_ensemble_of_noisy_models_predicts_better_than_one():
    """Models whose features are a shared signal plus their own noise: the average of their scores
    ranks subsets closer to the signal's own kernel scores than one model does (known by construction)."""
    rng = np.random.default_rng(1)
    n, m, k = 40, 20, 8
    masks = membership_matrix(make_subsets(np.arange(n) % 2, 30, 0.5, 42), n)
    train, query = rng.normal(size=(n, k)), rng.normal(size=(m, k))
    truth = ensemble_predictions([(train, query)], masks, [1.0])[0]
    noisy = [(train + rng.normal(scale=1.0, size=train.shape), query + rng.normal(scale=1.0, size=query.shape))
             for _ in range(8)]
    one = lds(ensemble_predictions(noisy[:1], masks, [1.0])[0], truth)
    eight = lds(ensemble_predictions(noisy, masks, [1.0])[0], truth)
    assert eight > one + 0.1


def test_ensemble_needs_a_model():
    with pytest.raises(ValueError, match="at least one model"):
        ensemble_predictions([], np.ones((2, 3), bool), LAMBDAS)


# ---------------------------------------------------------------- the predictions store

def write_features(path, data, model, images, **attrs):
    write_array(path, data.astype(np.float32), {
        "model_sha256": model, "function": "square", "K": 10, "timesteps": list(range(0, 1000, 100)),
        "scheme": "uniform", "noise_seed": 0, "device": "cpu", "projector": "basic", "proj_dim": data.shape[1],
        "proj_seed": 42, "query_sha256": images, **attrs})


@pytest.fixture
def members(tmp_path):
    """Train and val features of 3 models, and an LDS subsets table."""
    make_subsets(np.arange(12) % 2, 4, 0.5, 42).to_csv(tmp_path / "subsets.csv", index=False)
    pairs = models(3)
    paths = []
    for c, (train, query) in enumerate(pairs):
        paths.append((tmp_path / f"m{c}" / "train.zarr", tmp_path / f"m{c}" / "val.zarr"))
        write_features(paths[-1][0], train, f"{c}" * 64, "t" * 64)
        write_features(paths[-1][1], query, f"{c}" * 64, "v" * 64)
    return tmp_path, paths, [(t.astype(np.float32), q.astype(np.float32)) for t, q in pairs]


def test_ensemble_split_stores_the_average_with_its_model_count(members):
    root, paths, pairs = members
    out = root / "scores" / "val.zarr"
    ensemble_split([t for t, _ in paths], [q for _, q in paths], root / "subsets.csv",
                   {"lambda_exponents": [-1, 1]}, out)
    predictions, attrs = read_predictions(out)
    preds, lambdas = predictions["trak_ens"]
    masks = membership_matrix(pd.read_csv(root / "subsets.csv"), 12)
    np.testing.assert_allclose(lambdas, lambda_grid((-1, 1)))
    np.testing.assert_allclose(preds, dense_ensemble(pairs, masks, lambdas), rtol=1e-7, atol=1e-9)
    assert attrs["models"] == 3 and attrs["model_sha256"] == [f"{c}" * 64 for c in range(3)]
    assert (attrs["function"], attrs["K"], attrs["proj_dim"]) == ("square", 10, 5)
    assert attrs["query_sha256"] == "v" * 64 and attrs["subsets_sha256"] == file_sha256(root / "subsets.csv")
    assert label("trak_ens", attrs["function"], attrs["models"]) == "D-TRAK ensemble (C=3)"
    assert label("trak_ens", "simple", 8) == "TRAK ensemble (C=8)"


def test_members_split_by_their_own_gradient_norms_are_averaged(members):
    """A factorized projection's norm split is measured on each model: members whose sides (and so
    dense part) differ are one ensemble, their own train and query features agreeing."""
    root, paths, pairs = members
    for c, ((train_path, query_path), (train, query)) in enumerate(zip(paths, pairs)):
        split = {"factor_split": "norm", "factor_sides": [c + 1, 2], "dense_dim": 3 - c, "dense": {"proj_dim": 3 - c}}
        write_features(train_path, train, f"{c}" * 64, "t" * 64, **split)
        write_features(query_path, query, f"{c}" * 64, "v" * 64, **split)
    out = root / "scores" / "val.zarr"
    ensemble_split([t for t, _ in paths], [q for _, q in paths], root / "subsets.csv",
                   {"lambda_exponents": [-1, 1]}, out)
    predictions, attrs = read_predictions(out)
    masks = membership_matrix(pd.read_csv(root / "subsets.csv"), 12)
    np.testing.assert_allclose(predictions["trak_ens"][0], dense_ensemble(pairs, masks, lambda_grid((-1, 1))),
                               rtol=1e-7, atol=1e-9)
    assert attrs["factor_split"] == "norm" and "factor_sides" not in attrs


@pytest.mark.parametrize("case, message", [
    ("same model", "are features of the same model"),
    ("other function", "differ in function: 'square' vs 'avg'"),
    ("other queries", "differ in query_sha256"),
    ("other factor split", "differ in factor_split: 'norm' vs 'even'"),
])
def test_members_that_do_not_belong_together_are_refused(members, case, message):
    root, paths, pairs = members
    train, query = pairs[2]
    if case == "same model":
        write_features(paths[2][0], train, "1" * 64, "t" * 64)
        write_features(paths[2][1], query, "1" * 64, "v" * 64)
    elif case == "other function":
        write_features(paths[2][0], train, "2" * 64, "t" * 64, function="avg")
        write_features(paths[2][1], query, "2" * 64, "v" * 64, function="avg")
    elif case == "other factor split":
        for c in range(3):
            split = "even" if c == 2 else "norm"
            write_features(paths[c][0], pairs[c][0], f"{c}" * 64, "t" * 64, factor_split=split)
            write_features(paths[c][1], pairs[c][1], f"{c}" * 64, "v" * 64, factor_split=split)
    else:
        write_features(paths[2][1], query, "2" * 64, array_sha256(query))
    out = root / "scores" / "val.zarr"
    with pytest.raises(ProvenanceError, match=message):
        ensemble_split([t for t, _ in paths], [q for _, q in paths], root / "subsets.csv",
                       {"lambda_exponents": [-1, 1]}, out)
    assert not out.exists()
