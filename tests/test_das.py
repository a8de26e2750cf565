"""DAS: residual weights of the train split and the residual-weighted kernel scores, against loops
and dense inverses written here from the definition (diffattr.das)."""
import numpy as np
import pandas as pd
import pytest
import torch

from diffattr import noise
from diffattr.protocol import FeatureSet, select_timesteps
from diffattr.das import compute_residuals, residual_weights, rms_residuals
from diffattr.featurize import featurize_split
from diffattr.methods import METHODS, read_predictions
from diffattr.provenance import ProvenanceError
from diffattr.score import kernel_predictions, score_split
from diffattr.storage import read_array, write_array
from diffattr.subsets import make_subsets, membership_matrix

from conftest import TINY_SPEC


def test_residual_weights_match_a_loop():
    errors = np.random.default_rng(0).uniform(0.1, 2.0, size=(5, 7))
    errors[3] = 0.0
    expected = [0.0 if not row.any() else sum(row) / len(row) / np.sqrt(sum(v * v for v in row)) for row in errors]
    np.testing.assert_allclose(residual_weights(errors), expected, rtol=1e-12)
    # a sample fit equally badly at every timestep has the largest weight, 1 / sqrt(K)
    flat = residual_weights(np.ones((1, 4)))[0]
    assert flat == pytest.approx(0.5) and residual_weights(np.array([[1.0, 0, 0, 0]]))[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\(n, K\)"):
        residual_weights(-errors)


def test_rms_residuals_match_a_per_sample_per_timestep_loop(make_tiny_model, tiny_images):
    model = make_tiny_model(3)
    timesteps, seed = [0, 400, 999], 2
    got = rms_residuals(model, tiny_images, timesteps, seed, batch_size=2)
    abar = model.scheduler.alphas_cumprod.double()
    expected = np.zeros((len(tiny_images), len(timesteps)))
    with torch.no_grad():
        for i, image in enumerate(tiny_images):
            for c, t in enumerate(timesteps):
                eps = torch.from_numpy(noise.gaussian(seed, i, t, image.shape)).double()
                x_t = abar[t].sqrt() * torch.from_numpy(image).double() + (1 - abar[t]).sqrt() * eps
                pred = model.unet(x_t[None].float(), torch.tensor([t])).sample[0].double()
                expected[i, c] = ((pred - eps) ** 2).mean().sqrt().item()
    assert expected.min() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def dense_das(x, xq, weights, masks, lam):
    """pred[z, j] = -sum_{i in S_j} xq_z^T (X^T X + lam I)^-1 x_i r_i, one train image at a time."""
    h_inv = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    out = np.zeros((len(xq), len(masks)))
    for z in range(len(xq)):
        for j in range(len(masks)):
            out[z, j] = -sum(xq[z] @ h_inv @ x[i] * weights[i] for i in range(len(x)) if masks[j, i])
    return out


@pytest.mark.parametrize("n,k", [(20, 5), (6, 15)])  # eig of X^T X, then the Gram branch
def test_das_predictions_match_a_dense_loop(n, k):
    rng = np.random.default_rng(1)
    x, xq = rng.normal(size=(n, k)), rng.normal(size=(3, k))
    masks = rng.random((5, n)) < 0.5
    weights = rng.uniform(0.1, 1.0, n)
    lambdas = [0.05, 1.0, 300.0]
    got = kernel_predictions(x, xq, masks, lambdas, ["weighted", None], weights)
    for l, lam in enumerate(lambdas):
        np.testing.assert_allclose(got["weighted"][l], dense_das(x, xq, weights, masks, lam), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(got[None][l], dense_das(x, xq, np.ones(n), masks, lam), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="'weighted' needs 20 finite train weights|'weighted' needs 6 finite"):
        kernel_predictions(x, xq, masks, lambdas, ["weighted"])


def test_das_ranks_the_worse_fit_of_two_equal_gradients_first():
    """By construction: train images 1 and 2 have the same gradient feature as the query; TRAK ties
    them, DAS puts first the one the model fits worse (the larger residual weight)."""
    x = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    query = np.array([[0, 1.0, 0]])
    singletons = np.eye(4, dtype=bool)  # pred_j = -S(z, j)
    weights = np.array([0.5, 0.2, 0.4, 0.5])
    got = kernel_predictions(x, query, singletons, [0.1], [None, "weighted"], weights)
    trak, das = -got[None][0, 0], -got["weighted"][0, 0]
    assert trak[1] == pytest.approx(trak[2]) and trak[1] > max(trak[0], trak[3])
    assert np.argmax(das) == 2 and das[2] == pytest.approx(2 * das[1])


@pytest.fixture
def stores(make_tiny_model, tmp_path):
    """avg train / val features of a saved tiny model, their residual weights, a subsets table."""
    model = make_tiny_model(1)
    model.save(tmp_path / "model")
    weights = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    rng = np.random.default_rng(2)
    paths = {"model": model, "weights": weights, "timesteps": select_timesteps(3, "uniform")}
    spec = {"batch_size": 4, "proj_seed": 0, "scheme": "uniform", "noise_seed": 1}
    for split, n in (("train", 12), ("val", 3)):
        write_array(tmp_path / f"{split}_images.zarr", rng.uniform(-1, 1, (n, 1, 8, 8)).astype(np.float32), {})
        paths[split] = tmp_path / f"{split}.zarr"
        featurize_split(weights, TINY_SPEC, tmp_path / f"{split}_images.zarr", "avg", paths["timesteps"], 8, spec,
                        paths[split])
    paths["residual"] = tmp_path / "train_residual.zarr"
    compute_residuals(weights, TINY_SPEC, tmp_path / "train_images.zarr", paths["timesteps"], 1, 5,
                      paths["residual"])
    paths["subsets"] = tmp_path / "subsets.csv"
    make_subsets(np.arange(12) % 2, 4, 0.5, 42).to_csv(paths["subsets"], index=False)
    paths["spec"] = spec
    return paths


def test_score_job_computes_das_from_the_residual_store(stores, tmp_path):
    out = tmp_path / "scores.zarr"
    score_split(stores["train"], stores["val"], stores["subsets"], {"lambda_exponents": [-1, 1]}, out, "val",
                extra_paths={"residual": stores["residual"]})
    predictions, _ = read_predictions(out)
    assert "das" in predictions and "journey_trak" not in predictions
    x, xq = read_array(stores["train"])[0].astype(np.float64), read_array(stores["val"])[0].astype(np.float64)
    images = read_array(stores["train"].parent / "train_images.zarr")[0]
    errors = rms_residuals(stores["model"], images, stores["timesteps"], 1, 4)
    weights = residual_weights(errors)
    np.testing.assert_allclose(read_array(stores["residual"])[0], weights, rtol=1e-6)  # batches of 5 vs 4
    masks = membership_matrix(pd.read_csv(stores["subsets"]), 12)
    preds, lambdas = predictions["das"]
    for l, lam in enumerate(lambdas):
        expected = dense_das(x, xq, weights, masks, lam)
        np.testing.assert_allclose(preds[l], expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    assert not np.allclose(preds, predictions["trak"][0])  # the weights matter


def test_residuals_of_other_timesteps_or_another_model_are_refused(stores, tmp_path):
    other = tmp_path / "other_residual.zarr"
    compute_residuals(stores["weights"], TINY_SPEC, stores["train"].parent / "train_images.zarr",
                      select_timesteps(2, "uniform"), 1, 5, other)
    with pytest.raises(ProvenanceError, match="differ in timesteps"):
        score_split(stores["train"], stores["val"], stores["subsets"], {"lambda_exponents": [0, 0]},
                    tmp_path / "s.zarr", "val", extra_paths={"residual": other})
    with pytest.raises(ValueError, match="das needs the residual"):
        score_split(stores["train"], stores["val"], stores["subsets"], {"lambda_exponents": [0, 0]},
                    tmp_path / "s.zarr", "val")
    assert not (tmp_path / "s.zarr").exists()


def test_das_is_scored_on_avg_features_of_the_final_weights_only():
    das = METHODS["das"]
    assert das.applies(FeatureSet("avg", 10, 64), "val") and das.applies(FeatureSet("avg", 10, 64), "gen")
    assert not any(das.applies(FeatureSet(f, 10, 64), "val") for f in ("simple", "square", "l2"))
    assert not das.applies(FeatureSet("avg", 10, 64, step=100), "val")  # the residuals are the full model's
