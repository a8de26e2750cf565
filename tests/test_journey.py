"""Journey-TRAK: query features along each generated image's DDIM trajectory, and their scores.

The trajectory, its implied noises and the per-step gradients are recomputed here by hand (a DDIM
loop written from its update rule, one backward per step) and compared with `diffattr.journey`;
the scores are compared with the mean of per-step TRAK scores from a dense inverse.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from diffattr.protocol import FeatureSet, select_timesteps
from diffattr.featurize import batch_gradients, featurize_split, gradient_dim
from diffattr.generate import ddim_scheduler, denoise, generate_set, sample
from diffattr import journey
from diffattr.journey import TrajectoryMismatch, featurize_journey
from diffattr.methods import METHODS, read_predictions
from diffattr.models import load_model
from diffattr.project import make_projector
from diffattr.score import score_split, subset_predictions
from diffattr.storage import read_array, write_array
from diffattr.subsets import make_subsets, membership_matrix

from test_featurize import dense_projection

GEN = {"n": 3, "steps": 4, "eta": 0.0, "seed": 5, "batch_size": 2, "dtype": "fp32"}
FEATURIZE = {"batch_size": 2, "proj_seed": 42, "scheme": "uniform", "noise_seed": 0}
PROJ_DIM = 16
SHAPE = (1, 8, 8)


@pytest.fixture
def subsets_csv(tmp_path):
    path = tmp_path / "subsets.csv"
    make_subsets(np.arange(12) % 2, 4, 0.5, 42).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(make_tiny_model, tmp_path_factory):
    """A saved tiny model, its generation set, train features and journey features."""
    root = tmp_path_factory.mktemp("journey")
    model = make_tiny_model(2)
    model.save(root / "model")
    weights = root / "model" / "diffusion_pytorch_model.safetensors"
    from conftest import TINY_SPEC
    spec = {**TINY_SPEC, "unet": dict(TINY_SPEC["unet"])}
    generate_set(weights, spec, GEN, root / "gen.zarr")
    train = np.random.default_rng(0).uniform(-1, 1, (12, *SHAPE)).astype(np.float32)
    write_array(root / "train.zarr", train, {})
    timesteps = select_timesteps(2, "uniform")
    for split in ("train", "gen"):
        featurize_split(weights, spec, root / f"{split}.zarr", "simple", timesteps, PROJ_DIM, FEATURIZE,
                        root / "f" / f"{split}.zarr")
    featurize_journey(weights, spec, root / "gen.zarr", "simple", GEN, PROJ_DIM, FEATURIZE,
                      root / "f" / "gen_journey.zarr")
    return {"root": root, "model": model, "weights": weights, "spec": spec}


@torch.no_grad()
def reference_trajectory(model, index, steps=GEN["steps"], seed=GEN["seed"]):
    """DDIM with eta = 0 from its update rule, in float64: the inputs x_t of every step and x_0."""
    abar = model.scheduler.alphas_cumprod.to(torch.float64)
    step = 1000 // steps
    timesteps = list(range(0, 1000, step))[::-1]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + index)).double()[None]
    states = []
    for t in timesteps:
        states.append(x)
        eps = model.unet(x.float(), torch.tensor([t])).sample.double()
        a, a_prev = abar[t], (abar[t - step] if t - step >= 0 else torch.tensor(1.0, dtype=torch.float64))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)  # the scheduler clips x0 (clip_sample)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return timesteps, torch.cat(states), x[0].clamp(-1, 1)


def reference_journey_gradient(model, z, index):
    """(1/S) sum_s grad mean((eps_theta(x_s, t_s) - eps_s)^2), eps_s = (x_s - sqrt(abar) z) / sqrt(1 - abar),
    one backward per step."""
    timesteps, states, end = reference_trajectory(model, index)
    np.testing.assert_allclose(end.numpy(), z, atol=1e-4)  # the reference really is the stored image's
    abar = model.scheduler.alphas_cumprod.to(torch.float64)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    zt = torch.from_numpy(z).double()
    for t, x in zip(timesteps, states):
        target = (x - abar[t].sqrt() * zt) / (1 - abar[t]).sqrt()
        for p in params:
            p.grad = None
        pred = model.unet(x[None].float(), torch.tensor([t])).sample.double()
        ((pred - target[None]) ** 2).mean().backward()
        for acc, p in zip(total, params):
            acc += p.grad.double()
    for p in params:
        p.grad = None
    return torch.cat([g.reshape(-1) for g in total]) / len(timesteps)


def test_denoise_keeps_the_trajectory_of_sample(make_tiny_model):
    model = make_tiny_model(2)
    ddim = ddim_scheduler(model, 5)
    end, states = denoise(model, ddim, range(1, 4), SHAPE, 0.0, 10, keep_states=True)
    # the same images as `sample` draws (up to the round-off of another batch size)
    np.testing.assert_allclose(end.numpy(), sample(model, 4, SHAPE, 5, 0.0, 10, 4)[1:], atol=1e-4)
    assert states.shape == (3, 5, *SHAPE)
    first = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))  # image 1: seed 10 + 1
    np.testing.assert_array_equal(states[0, 0].numpy(), first.numpy())
    for i in range(3):
        timesteps, ref_states, ref_end = reference_trajectory(model, 1 + i, steps=5, seed=10)
        np.testing.assert_allclose(states[i].double().numpy(), ref_states.numpy(), atol=1e-4)
        np.testing.assert_allclose(end[i].double().numpy(), ref_end.numpy(), atol=1e-4)


def test_journey_features_match_the_per_step_reference(run):
    rows, attrs = read_array(run["root"] / "f" / "gen_journey.zarr")
    gen, _ = read_array(run["root"] / "gen.zarr")
    model = run["model"]
    projector, _ = make_projector(gradient_dim(model), PROJ_DIM, 42, torch.device("cpu"), 2)
    P = dense_projection(projector, gradient_dim(model))
    ref = np.stack([(reference_journey_gradient(model, gen[i], i) @ P).numpy() for i in range(len(gen))])
    scale = np.abs(ref).max()
    assert scale > 0 and rows.shape == (3, PROJ_DIM)
    np.testing.assert_allclose(rows, ref, rtol=1e-3, atol=1e-3 * scale)
    assert attrs["K"] == 4 and attrs["timesteps"] == [750, 500, 250, 0]
    assert attrs["scheme"] == "ddim_trajectory" and attrs["function"] == "simple"
    train_attrs = read_array(run["root"] / "f" / "gen.zarr")[1]
    assert attrs["query_sha256"] == train_attrs["query_sha256"]  # the same generated images
    # the trajectory's features are not the fresh-noise features of the same images
    assert not np.allclose(rows, read_array(run["root"] / "f" / "gen.zarr")[0])


def per_step_features(run):
    """(S, m, k): each generated image's projected gradient at one trajectory step at a time."""
    model = run["model"]
    gen, _ = read_array(run["root"] / "gen.zarr")
    projector, _ = make_projector(gradient_dim(model), PROJ_DIM, 42, torch.device("cpu"), 3)
    out = []
    for s, t in enumerate([750, 500, 250, 0]):
        eps = []
        for i in range(len(gen)):
            _, states, _ = reference_trajectory(model, i)
            abar = model.scheduler.alphas_cumprod.double()[t]
            eps.append(((states[s] - abar.sqrt() * torch.from_numpy(gen[i]).double()) / (1 - abar).sqrt())[None])
        grads = batch_gradients(model, torch.from_numpy(gen), range(len(gen)), "simple", [t], 0,
                                eps=torch.stack(eps).float())
        out.append(projector.project(grads, model_id=0).double().numpy())
    return np.stack(out)


def test_journey_trak_is_the_mean_of_the_per_step_trak_scores(run, subsets_csv):
    """Scores are linear in the query feature: scoring the mean over the S steps equals the mean of
    the S per-step TRAK score matrices (each from a dense inverse here)."""
    f = run["root"] / "f"
    out = run["root"] / "scores.zarr"
    score_split(f / "train.zarr", f / "gen.zarr", subsets_csv, {"lambda_exponents": [-1, 1]}, out, "gen",
                extra_paths={"journey": f / "gen_journey.zarr"})
    predictions, _ = read_predictions(out)
    assert "journey_trak" in predictions and "trak" in predictions
    x = read_array(f / "train.zarr")[0].astype(np.float64)
    masks = membership_matrix(pd.read_csv(subsets_csv), len(x))
    steps = per_step_features(run)
    preds, lambdas = predictions["journey_trak"]
    for l, lam in enumerate(lambdas):
        h_inv = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
        mean_scores = np.mean([q @ h_inv @ x.T for q in steps], axis=0)  # (m, n), step by step
        expected = -mean_scores @ masks.T.astype(np.float64)
        np.testing.assert_allclose(preds[l], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # the store's own (fresh-noise) queries are untouched by the stacking
    np.testing.assert_allclose(predictions["trak"][0], subset_predictions(
        x, read_array(f / "gen.zarr")[0], masks, lambdas), rtol=1e-10)


def test_trajectories_are_regenerated_bit_for_bit_in_the_generate_batches(run, monkeypatch):
    """Rows that straddle two of the generate job's batches (of 2) end exactly at the stored images."""
    monkeypatch.setattr(journey, "ENDPOINT_TOLERANCE", 0.0)
    gen, _ = read_array(run["root"] / "gen.zarr")
    model = load_model(run["spec"], run["root"] / "model")  # as the generate job loaded it
    noise, timesteps = journey.trajectory_noise(model, gen, GEN, torch.device("cpu"))
    assert timesteps == [750, 500, 250, 0]
    eps = noise(range(1, 3))
    assert eps.shape == (2, 4, *SHAPE)
    abar = model.scheduler.alphas_cumprod.double()[timesteps].reshape(4, 1, 1, 1)
    for row, i in enumerate((1, 2)):
        _, states, _ = reference_trajectory(model, i)
        # compared before the division by sqrt(1 - abar), which magnifies float32 round-off 100x at t = 0
        expected = states - abar.sqrt() * torch.from_numpy(gen[i]).double()
        np.testing.assert_allclose((eps[row].double() * (1 - abar).sqrt()).numpy(), expected.numpy(), atol=1e-4)


def test_trajectory_that_does_not_end_at_the_stored_image_is_refused(run):
    gen, attrs = read_array(run["root"] / "gen.zarr")
    other = run["root"] / "other_gen.zarr"
    write_array(other, gen[::-1].copy(), attrs)  # the same images in another order
    out = run["root"] / "f" / "other_journey.zarr"
    with pytest.raises(TrajectoryMismatch, match="images 0..1 of the generation set"):
        featurize_journey(run["weights"], run["spec"], other, "simple", GEN, PROJ_DIM, FEATURIZE, out)
    assert not out.exists()


def feature_store(path, rows, **attrs):
    base = {"model_sha256": "a" * 64, "function": "simple", "K": 2, "timesteps": [0, 500], "scheme": "uniform",
            "noise_seed": 0, "dtype": "float32", "device": "cpu", "projector": "BasicProjector",
            "proj_dim": rows.shape[1], "proj_seed": 42, "proj_type": "normal", "grad_dim": 99,
            "block_size": 8, "query_sha256": "q" * 64}
    write_array(path, rows.astype(np.float32), {**base, **attrs})
    return path


def test_journey_trak_ranks_the_train_image_the_trajectory_points_to(tmp_path):
    """By construction: every step's feature is e_3 plus a step-specific push that cancels over the
    steps, and the fresh-noise query feature is e_1. Journey-TRAK puts train image 3 first, TRAK 1."""
    k = n = 6
    x = np.eye(n)
    e = np.eye(k)
    steps = [e[3] + 4 * (e[0] - e[1]), e[3] - 4 * (e[0] - e[1]), e[3] + 4 * (e[4] - e[5]), e[3] - 4 * (e[4] - e[5])]
    journey = np.mean(steps, axis=0)[None]
    np.testing.assert_allclose(journey[0], np.eye(k)[3])
    train = feature_store(tmp_path / "train.zarr", x, query_sha256="t" * 64)
    query = feature_store(tmp_path / "gen.zarr", np.eye(k)[1][None])
    path = feature_store(tmp_path / "journey.zarr", journey, K=4, timesteps=[750, 500, 250, 0],
                         scheme="ddim_trajectory", noise_seed=None)
    # one subset per train image: pred_j = -S(z, j)
    subsets = tmp_path / "subsets.csv"
    pd.DataFrame({"subset": range(n), "train_position": range(n)}).to_csv(subsets, index=False)
    out = tmp_path / "scores.zarr"
    score_split(train, query, subsets, {"lambda_exponents": [-2, 2], "methods": ["trak", "journey_trak"]}, out,
                "gen", extra_paths={"journey": path})
    predictions, _ = read_predictions(out)
    for preds in predictions["journey_trak"][0]:
        assert np.argmin(preds[0]) == 3  # the largest score: the most negative prediction
    for preds in predictions["trak"][0]:
        assert np.argmin(preds[0]) == 1


def test_journey_trak_exists_for_generated_simple_features_only(tmp_path):
    assert METHODS["journey_trak"].applies(FeatureSet("simple", 1, 1), "gen")
    assert not METHODS["journey_trak"].applies(FeatureSet("simple", 1, 1), "val")
    assert not METHODS["journey_trak"].applies(FeatureSet("square", 1, 1), "gen")
    train = feature_store(tmp_path / "train.zarr", np.eye(4), query_sha256="t" * 64)
    query = feature_store(tmp_path / "val.zarr", np.ones((2, 4)))
    subsets = tmp_path / "subsets.csv"
    pd.DataFrame({"subset": [0, 1], "train_position": [0, 1]}).to_csv(subsets, index=False)
    score_split(train, query, subsets, {"lambda_exponents": [0, 0]}, tmp_path / "val_scores.zarr", "val")
    assert "journey_trak" not in read_predictions(tmp_path / "val_scores.zarr")[0]
    with pytest.raises(ValueError, match="journey_trak needs the journey"):
        score_split(train, query, subsets, {"lambda_exponents": [0, 0]}, tmp_path / "gen_scores.zarr", "gen")
    other = feature_store(tmp_path / "other.zarr", np.ones((2, 4)), query_sha256="o" * 64, K=4)
    with pytest.raises(Exception, match="other generated images"):
        score_split(train, query, subsets, {"lambda_exponents": [0, 0]}, tmp_path / "gen_scores.zarr", "gen",
                    extra_paths={"journey": other})


def test_journey_features_in_timestep_chunks_are_the_same(run):
    """featurize.max_pass_items splits the S steps of a batch into passes: each pass gets its own
    steps' implied noises."""
    out = run["root"] / "f" / "chunked_journey.zarr"
    featurize_journey(run["weights"], run["spec"], run["root"] / "gen.zarr", "simple", GEN, PROJ_DIM, FEATURIZE,
                      out, max_pass_items=3)  # 2 images a batch: passes of 1 step
    chunked, whole = read_array(out)[0], read_array(run["root"] / "f" / "gen_journey.zarr")[0]
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5 * np.abs(whole).max())


def test_checkpoint_features_get_no_journey_trak(tmp_path):
    """The trajectories are the full model's: a kept checkpoint's feature set is scored without it."""
    train = feature_store(tmp_path / "train.zarr", np.eye(4), query_sha256="t" * 64, checkpoint=100)
    query = feature_store(tmp_path / "gen.zarr", np.ones((2, 4)), checkpoint=100)
    subsets = tmp_path / "subsets.csv"
    pd.DataFrame({"subset": [0, 1], "train_position": [0, 1]}).to_csv(subsets, index=False)
    score_split(train, query, subsets, {"lambda_exponents": [0, 0]}, tmp_path / "scores.zarr", "gen")
    predictions = read_predictions(tmp_path / "scores.zarr")[0]
    assert "trak" in predictions and "journey_trak" not in predictions


def test_journey_features_of_another_arithmetic_are_refused(tmp_path):
    """featurize.dtype: Journey-TRAK's query features in tf32 beside fp32 train features (here a store
    from before the key, which records no arithmetic: fp32) are refused, naming both stores."""
    from diffattr.provenance import ProvenanceError

    train = feature_store(tmp_path / "train.zarr", np.eye(4), query_sha256="t" * 64)
    query = feature_store(tmp_path / "gen.zarr", np.eye(4)[1][None], arithmetic="fp32")
    journey = feature_store(tmp_path / "journey.zarr", np.eye(4)[2][None], K=4, timesteps=[750, 500, 250, 0],
                            scheme="ddim_trajectory", noise_seed=None, arithmetic="tf32")
    pd.DataFrame({"subset": range(4), "train_position": range(4)}).to_csv(tmp_path / "subsets.csv", index=False)
    with pytest.raises(ProvenanceError) as error:
        score_split(train, query, tmp_path / "subsets.csv", {"lambda_exponents": [0], "methods": ["journey_trak"]},
                    tmp_path / "scores.zarr", "gen", extra_paths={"journey": journey})
    assert str(error.value) == f"{train} and {journey} cannot be combined; they differ in arithmetic: 'fp32' vs 'tf32'"
