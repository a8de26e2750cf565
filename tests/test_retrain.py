"""Retraining-based methods: Empirical IF and Datamodel against explicit loops and refits, a planted
datamodel whose ranking they must recover, and the predictions store of a pool's outputs."""
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import stats
from sklearn.linear_model import Ridge

from diffattr.methods import label, read_predictions
from diffattr.provenance import ProvenanceError
from diffattr.retrain import datamodel, empirical_if, retrain_split
from diffattr.protocol import lambda_grid
from diffattr.storage import file_sha256
from diffattr.subsets import make_subsets, membership_matrix

ALPHAS = lambda_grid((-2, 3))


def random_pool(n_models=12, n=10, m=3, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n)) < 0.5
    outputs = rng.normal(size=(n_models, m))
    return outputs, masks


def test_empirical_if_is_the_difference_in_means_over_models():
    outputs, masks = random_pool()
    masks[:, 0] = True   # image 0 in every model, image 1 in none: no difference to take
    masks[:, 1] = False
    got = empirical_if(outputs, masks)
    expected = np.zeros((outputs.shape[1], masks.shape[1]))
    for z in range(outputs.shape[1]):
        for i in range(masks.shape[1]):
            with_i = [outputs[k, z] for k in range(len(masks)) if masks[k, i]]
            without_i = [outputs[k, z] for k in range(len(masks)) if not masks[k, i]]
            if with_i and without_i:
                expected[z, i] = sum(without_i) / len(without_i) - sum(with_i) / len(with_i)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert np.all(got[:, :2] == 0) and np.all(got[:, 2:] != 0)


def loo_alpha(x, y, alphas):
    """The alpha with the least leave-one-out squared error, refitting Ridge without each model."""
    errors = []
    for alpha in alphas:
        residuals = [y[k] - Ridge(alpha=alpha).fit(np.delete(x, k, 0), np.delete(y, k)).predict(x[k:k + 1])[0]
                     for k in range(len(x))]
        errors.append(np.mean(np.square(residuals)))
    return alphas[int(np.argmin(errors))]


def test_datamodel_is_a_ridge_fit_per_query_at_its_cross_validated_alpha():
    outputs, masks = random_pool(n_models=15, n=8, m=3, seed=1)
    # queries with a strong, a weak and no linear signal: they must pick different alphas
    w = np.random.default_rng(5).normal(size=8)
    outputs[:, 0] = masks @ w + 0.1 * outputs[:, 0]
    outputs[:, 1] = masks @ w * 0.2 + outputs[:, 1]
    scores, chosen = datamodel(outputs, masks, ALPHAS)
    assert scores.shape == (3, 8) and chosen.shape == (3,)
    x = masks.astype(float)
    for z in range(3):
        assert chosen[z] == pytest.approx(loo_alpha(x, outputs[:, z], ALPHAS))
        ridge = Ridge(alpha=chosen[z], fit_intercept=True).fit(x, outputs[:, z])
        np.testing.assert_allclose(scores[z], -ridge.coef_, rtol=1e-6, atol=1e-10)
    assert len(set(chosen)) > 1


def test_planted_datamodel_ranking_is_recovered_and_helpful_images_score_positive():
    """f_S(z) = b_z + sum_{i in S} w_zi + noise: a helpful image (w < 0 lowers the loss) must score
    positive, and both estimators must rank the images as -w does; the regression nearly exactly,
    the difference in means up to the spread that the other images' w add to it."""
    rng = np.random.default_rng(3)
    n, n_models, m = 30, 400, 4
    labels = np.arange(n) % 2
    table = make_subsets(labels, n_models, 0.5, 43)
    masks = membership_matrix(table, n)
    w = rng.normal(scale=1.0, size=(m, n))
    outputs = 5.0 + masks @ w.T + rng.normal(scale=0.3, size=(n_models, m))
    for scores, least in ((datamodel(outputs, masks, ALPHAS)[0], 0.99), (empirical_if(outputs, masks), 0.85)):
        for z in range(m):
            assert stats.spearmanr(scores[z], -w[z]).statistic > least
            helpful, harmful = np.argmin(w[z]), np.argmax(w[z])
            assert scores[z, helpful] > 0 > scores[z, harmful]


def test_datamodel_refuses_too_few_models_and_a_bad_grid():
    outputs, masks = random_pool(n_models=2)
    with pytest.raises(ValueError, match="at least 3 models"):
        datamodel(outputs, masks, ALPHAS)
    outputs, masks = random_pool()
    with pytest.raises(ValueError, match="positive"):
        datamodel(outputs, masks, [0.0, 1.0])
    with pytest.raises(ValueError, match="masks"):
        empirical_if(outputs, masks[:-1])


# ---------------------------------------------------------------- the predictions store

def write_outputs(path, losses, subset, pool_sha256, **attrs):
    """A ground-truth store of one pool model, laid out as ground_truth.compute_and_save writes it."""
    group = zarr.open_group(path, mode="w")
    group.attrs.update({"model_sha256": f"{subset:064d}", "timesteps": [0, 500], "noise_seeds": [0],
                        "function": "simple", "dtype": "fp32", "subsets_sha256": pool_sha256,
                        "subset": subset, "train_seed": 0, **attrs})
    array = group.create_array("val", shape=losses.shape, dtype=losses.dtype)
    array[...] = losses
    array.attrs["query_sha256"] = "q" * 64


@pytest.fixture
def pool(tmp_path):
    """12 train images, an LDS table of 4 subsets, a pool table of 6 subsets and 5 models' outputs."""
    labels = np.arange(12) % 2
    pd.DataFrame({"label": labels}).to_csv(tmp_path / "train.csv", index=False)
    make_subsets(labels, 4, 0.5, 42).to_csv(tmp_path / "subsets.csv", index=False)
    make_subsets(labels, 6, 0.5, 43).to_csv(tmp_path / "pool.csv", index=False)
    outputs = np.random.default_rng(4).normal(size=(5, 3))
    paths = {}
    for j in range(5):
        paths[f"s{j:03d}-r0"] = tmp_path / "gt" / f"s{j:03d}-r0.zarr"
        write_outputs(paths[f"s{j:03d}-r0"], outputs[j], j, file_sha256(tmp_path / "pool.csv"))
    return tmp_path, paths, outputs


SPEC = {"methods": ["empirical_if", "datamodel"], "datamodel_alpha_exponents": [-2, 3]}


def test_retrain_split_stores_both_methods_subset_predictions(pool):
    root, paths, outputs = pool
    out = root / "scores" / "val.zarr"
    retrain_split(paths, "val", root / "pool.csv", root / "subsets.csv", root / "train.csv", SPEC, out)
    predictions, attrs = read_predictions(out)
    assert list(predictions) == ["empirical_if", "datamodel"]
    pool_masks = membership_matrix(pd.read_csv(root / "pool.csv"), 12)[:5]
    lds_masks = membership_matrix(pd.read_csv(root / "subsets.csv"), 12)
    expected = {"empirical_if": empirical_if(outputs, pool_masks),
                "datamodel": datamodel(outputs, pool_masks, lambda_grid((-2, 3)))[0]}
    for method, scores in expected.items():
        preds, lambdas = predictions[method]
        assert preds.shape == (1, 3, 4) and np.isnan(lambdas).all()
        for z in range(3):
            for j in range(4):
                assert preds[0, z, j] == pytest.approx(-sum(scores[z, i] for i in range(12) if lds_masks[j, i]))
    assert attrs["models"] == 5 and attrs["query_sha256"] == "q" * 64
    assert attrs["subsets_sha256"] == file_sha256(root / "subsets.csv")
    assert len(attrs["datamodel_alphas"]) == 3
    assert label("datamodel", None, attrs["models"]) == "Datamodel (N=5)"
    assert label("empirical_if") == "Empirical IF"


def test_outputs_of_another_pool_or_model_are_refused(pool):
    root, paths, outputs = pool
    out = root / "scores" / "val.zarr"
    write_outputs(paths["s002-r0"], outputs[2], 2, "another table" * 4)
    with pytest.raises(ProvenanceError, match="differ in subsets_sha256"):
        retrain_split(paths, "val", root / "pool.csv", root / "subsets.csv", root / "train.csv", SPEC, out)
    lds_table = file_sha256(root / "subsets.csv")  # the LDS models' outputs given as the pool's
    for j, path in enumerate(paths.values()):
        write_outputs(path, outputs[j], j, lds_table)
    with pytest.raises(ProvenanceError, match="trained on another subsets table"):
        retrain_split(paths, "val", root / "pool.csv", root / "subsets.csv", root / "train.csv", SPEC, out)
    for j, path in enumerate(paths.values()):
        write_outputs(path, outputs[j], j, file_sha256(root / "pool.csv"))
    write_outputs(paths["s002-r0"], outputs[2], 3, file_sha256(root / "pool.csv"))
    with pytest.raises(ProvenanceError, match="trained on subset 3, given as s002-r0's"):
        retrain_split(paths, "val", root / "pool.csv", root / "subsets.csv", root / "train.csv", SPEC, out)
    write_outputs(paths["s002-r0"], outputs[2], 2, file_sha256(root / "pool.csv"), noise_seeds=[0, 1])
    with pytest.raises(ProvenanceError, match="noise_seeds"):
        retrain_split(paths, "val", root / "pool.csv", root / "subsets.csv", root / "train.csv", SPEC, out)
    assert not out.exists()
