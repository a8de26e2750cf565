"""Determinism: noise, ground truth, generation and training are functions of their seeds only,
never of batch size or position in a batch; and the timestep / function settings parse as documented."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from diffattr import noise
from diffattr.protocol import parse_function, select_timesteps, stratified_timesteps
from diffattr.generate import sample
from diffattr.ground_truth import compute_and_save, draw_losses, query_losses
from diffattr.models import build_model, load_model
from diffattr.storage import write_array
from diffattr.train import train, train_and_save

SHAPE = (1, 8, 8)


# ---------------------------------------------------------------- noise

def test_gaussian_is_a_pure_function_of_the_triple():
    a = noise.gaussian(3, 11, 500, SHAPE)
    assert a.dtype == np.float32 and a.shape == SHAPE
    np.testing.assert_array_equal(a, noise.gaussian(3, 11, 500, SHAPE))
    for other in [(4, 11, 500), (3, 12, 500), (3, 11, 501), (11, 3, 500), (500, 11, 3), (0, 0, 0)]:
        assert not np.allclose(a, noise.gaussian(*other, SHAPE)), other


def test_gaussian_is_standard_normal():
    x = noise.gaussian(0, 0, 0, (200, 200))
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02


def test_noise_batch_rows_are_independent_of_order_and_company():
    triples = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 999), (5, 3, 17), (0, 1, 0)]
    batch = noise.noise_batch(triples, SHAPE)
    assert isinstance(batch, torch.Tensor) and batch.shape == (len(triples), *SHAPE)
    for row, triple in zip(batch, triples):
        np.testing.assert_array_equal(row.numpy(), noise.gaussian(*triple, SHAPE))
    reordered = noise.noise_batch(triples[::-1], SHAPE)
    np.testing.assert_array_equal(reordered.numpy(), batch.numpy()[::-1])
    alone = noise.noise_batch([triples[4]], SHAPE)
    np.testing.assert_array_equal(alone[0].numpy(), batch[4].numpy())
    np.testing.assert_array_equal(batch[1].numpy(), batch[5].numpy())  # same triple, same noise


# ---------------------------------------------------------------- ground truth

def reference_draw_losses(model, images, timesteps, noise_seeds):
    """(n, seeds, timesteps): mean_pixels (eps_theta(x_t, t) - eps)^2 of each draw, one sample at a
    time, in float64, with x_t built by hand."""
    unet = model.unet
    abar = model.scheduler.alphas_cumprod.to(torch.float64)
    out = np.zeros((len(images), len(noise_seeds), len(timesteps)))
    with torch.no_grad():
        for q, image in enumerate(images):
            for (s, seed), (j, t) in itertools.product(enumerate(noise_seeds), enumerate(timesteps)):
                eps = torch.from_numpy(noise.gaussian(seed, q, t, image.shape)).double()[None]
                x0 = torch.from_numpy(image).double()[None]
                x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
                pred = unet(x_t, torch.tensor([t])).sample
                out[q, s, j] = ((pred - eps) ** 2).mean().item()
    return out


def test_query_losses_is_batch_independent_and_matches_loop(make_tiny_model, tiny_images):
    model = make_tiny_model(3)
    images, timesteps, seeds = tiny_images[:4], [0, 300, 999], [0, 2]
    got = {b: query_losses(model, images, timesteps, seeds, b) for b in (1, 7, 1000)}
    assert got[1].dtype == np.float64 and got[1].shape == (4,)
    np.testing.assert_allclose(got[7], got[1], rtol=1e-6)
    np.testing.assert_allclose(got[1000], got[1], rtol=1e-6)
    reference = reference_draw_losses(make_tiny_model(3, torch.float64), images, timesteps, seeds)
    np.testing.assert_allclose(got[7], reference.mean(axis=(1, 2)), rtol=1e-5)
    assert len(np.unique(np.round(reference.mean(axis=(1, 2)), 6))) == 4  # queries really differ
    draws = draw_losses(model, images, timesteps, seeds, 5, rows=range(1, 4))
    assert draws.shape == (3, 2, 3)  # (rows, noise seeds, timesteps)
    np.testing.assert_allclose(draws, reference[1:], rtol=1e-5)
    assert np.ptp(reference, axis=(1, 2)).min() > 1e-3  # draws really differ within a query


def test_query_losses_depends_on_noise_seeds(make_tiny_model, tiny_images):
    model = make_tiny_model(3)
    a = query_losses(model, tiny_images[:2], [100], [0], 10)
    b = query_losses(model, tiny_images[:2], [100], [1], 10)
    assert not np.allclose(a, b)


# ---------------------------------------------------------------- generation

def reference_ddim(model, n, steps, seed):
    """DDIM with eta = 0 written out (Song et al. eq. 12, sigma = 0), in float64, one image at a time.

    Conventions of diffusers' DDIMScheduler built from the DDPM config: 'leading' timesteps
    (T // steps) * [steps-1, ..., 0], abar_prev = 1 after the last step, x0 prediction clipped to [-1, 1].
    """
    unet = model.unet
    T = model.scheduler.config.num_train_timesteps
    abar = model.scheduler.alphas_cumprod.to(torch.float64)
    stride = T // steps
    images = []
    with torch.no_grad():
        for i in range(n):
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + i)).double()[None]
            for t in range(stride * (steps - 1), -1, -stride):
                eps = unet(x, torch.tensor([t])).sample
                a_t = abar[t]
                a_prev = abar[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
                x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            images.append(x.clamp(-1, 1)[0].numpy())
    return np.stack(images)


def test_sample_is_batch_independent(make_tiny_model):
    model = make_tiny_model(4)
    kwargs = dict(shape=SHAPE, steps=5, eta=0.0, seed=10)
    five_b4 = sample(model, 5, batch_size=4, **kwargs)
    five_b1 = sample(model, 5, batch_size=1, **kwargs)
    two_b4 = sample(model, 2, batch_size=4, **kwargs)
    assert five_b4.dtype == np.float32 and five_b4.shape == (5, *SHAPE)
    # float32 convolutions round differently with the batch size (~1e-6 per step, amplified up to
    # ~1e-5 by the 1/sqrt(abar_t) of the x0 prediction); a noise drawn by position instead of by
    # image index would differ by O(1)
    np.testing.assert_allclose(five_b1, five_b4, rtol=0, atol=1e-4)
    np.testing.assert_allclose(two_b4, five_b4[:2], rtol=0, atol=1e-4)
    assert not np.allclose(five_b4[0], five_b4[1])
    assert five_b4.min() >= -1 and five_b4.max() <= 1


def test_sample_matches_handwritten_ddim(make_tiny_model):
    model = make_tiny_model(4)
    got = sample(model, 3, SHAPE, steps=5, eta=0.0, seed=10, batch_size=2)
    reference = reference_ddim(make_tiny_model(4, torch.float64), 3, steps=5, seed=10)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- training

TRAIN_SPEC = {"steps": 5, "batch_size": 8, "lr": 1e-3, "betas": [0.95, 0.999], "weight_decay": 1e-6,
              "grad_clip": 1.0, "warmup_fraction": 0.2, "hflip": True}


@pytest.fixture(scope="module")
def train_images():
    return torch.from_numpy(np.random.default_rng(9).uniform(-1, 1, size=(12, *SHAPE)).astype(np.float32))


def trained(spec, images, init_seed, train_seed):
    model = build_model(spec, init_seed)
    log = train(model, images, None, TRAIN_SPEC, train_seed)
    return model, log


def params(model):
    return [p.detach().clone() for p in model.unet.parameters()]


def test_train_is_deterministic_given_seed(tiny_spec, train_images):
    initial = params(build_model(tiny_spec, 0))
    a, log_a = trained(tiny_spec, train_images, 0, 0)
    b, log_b = trained(tiny_spec, train_images, 0, 0)
    assert len(log_a) == TRAIN_SPEC["steps"] and list(log_a["step"]) == list(range(TRAIN_SPEC["steps"]))
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True)
    assert np.all(np.isfinite(log_a["loss"]))
    assert not all(torch.equal(p, q) for p, q in zip(params(a), initial))  # training did something


def test_train_depends_on_seed(tiny_spec, train_images):
    a, log_a = trained(tiny_spec, train_images, 0, 0)
    c, log_c = trained(tiny_spec, train_images, 1, 1)
    assert not all(torch.equal(p, q) for p, q in zip(params(a), params(c)))
    # the same initial weights but a different training seed (batches, flips, t, noise) also differ
    d, log_d = trained(tiny_spec, train_images, 0, 1)
    assert not all(torch.equal(p, q) for p, q in zip(params(a), params(d)))
    assert not np.allclose(log_a["loss"], log_d["loss"])


def test_train_and_save_trains_on_the_subset_and_saves(tiny_spec, train_images, tmp_path):
    images_path = tmp_path / "train.zarr"
    write_array(images_path, train_images.numpy(), {"split": "train"})
    members = [7, 1, 10, 3, 5, 0, 11, 8]  # subset 1, deliberately unsorted
    table = pd.DataFrame({"subset": [0] * 3 + [1] * len(members), "seed": [42] * 3 + [44] * len(members),
                          "train_position": [2, 4, 6] + members})
    table.to_csv(tmp_path / "subsets.csv", index=False)
    weights = tmp_path / "models" / "s001-r2" / "diffusion_pytorch_model.safetensors"
    train_and_save(images_path, tmp_path / "subsets.csv", 1, 2, {**TRAIN_SPEC, "model": tiny_spec}, weights)

    assert weights.exists() and (weights.parent / "train_log.csv").exists()
    saved = load_model(tiny_spec, weights.parent)
    expected = build_model(tiny_spec, 2)
    log = train(expected, train_images[np.sort(members)], None, TRAIN_SPEC, 2)
    assert all(torch.equal(p, q) for p, q in zip(params(saved), params(expected)))
    np.testing.assert_array_equal(pd.read_csv(weights.parent / "train_log.csv")["loss"], log["loss"])
    # no staging folder left behind
    assert sorted(p.name for p in weights.parent.parent.iterdir()) == ["s001-r2"]

    with pytest.raises(ValueError, match="no members"):
        train_and_save(images_path, tmp_path / "subsets.csv", 5, 2, {**TRAIN_SPEC, "model": tiny_spec},
                       tmp_path / "models" / "s005-r2" / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------- config

def test_select_timesteps_uniform_and_cumulative():
    assert select_timesteps(10, "uniform") == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert select_timesteps(1, "uniform") == [0]
    assert select_timesteps(1000, "uniform") == list(range(1000))
    assert select_timesteps(3, "cumulative") == [0, 1, 2]
    assert select_timesteps(4, "uniform", num_train_timesteps=100) == [0, 25, 50, 75]
    for k in (3, 7, 64, 100, 333, 999):
        ts = select_timesteps(k, "uniform")
        assert len(ts) == k and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] < 1000
        assert ts == list(range(0, 1000, 1000 // k))[:k]


@pytest.mark.parametrize("k", [0, -1, 1001])
def test_select_timesteps_rejects_k_out_of_range(k):
    with pytest.raises(ValueError):
        select_timesteps(k, "uniform")
    with pytest.raises(ValueError):
        select_timesteps(k, "cumulative")


def test_select_timesteps_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="linear"):
        select_timesteps(10, "linear")


def test_stratified_timesteps_one_uniform_draw_per_stratum():
    for count, T in ((10, 1000), (7, 1000), (3, 10), (1000, 1000)):
        ts = stratified_timesteps(count, T, seed=3)
        edges = [j * T // count for j in range(count + 1)]
        assert len(ts) == count and all(low <= t < high for t, low, high in zip(ts, edges[:-1], edges[1:]))
    assert stratified_timesteps(20, seed=1) == stratified_timesteps(20, seed=1)
    assert stratified_timesteps(20, seed=1) != stratified_timesteps(20, seed=2)
    # each stratum's draw is uniform over it: over many seeds, every offset of a 10-wide stratum shows up
    # about as often as the others (chi-square-sized tolerance), and their mean estimates the stratum's
    offsets = np.array([stratified_timesteps(100, seed=s) for s in range(400)]) % 10
    counts = np.bincount(offsets.ravel(), minlength=10)
    assert np.abs(counts - counts.mean()).max() < 5 * np.sqrt(counts.mean())
    with pytest.raises(ValueError):
        stratified_timesteps(0)


def test_parse_function():
    for name in ("simple", "elbo", "square", "avg", "l1", "l2", "linf"):
        assert parse_function(name) == (name, None)
    assert parse_function("interp0.25") == ("interp", 0.25)
    assert parse_function("interp0") == ("interp", 0.0)
    assert parse_function("interp1.0") == ("interp", 1.0)
    assert parse_function("interp.5") == ("interp", 0.5)


@pytest.mark.parametrize("name", ["bogus", "interp", "interp1.5", "interp-0.1", "Square", "l3", ""])
def test_parse_function_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        parse_function(name)


def test_stratified_ground_truth_is_deterministic_and_batch_independent(make_tiny_model, tiny_spec, tiny_images,
                                                                       tmp_path):
    """ground_truth.scheme: stratified averages over stratified_timesteps(timesteps, seed=timestep_seed),
    recorded in the store; the values do not depend on the batch size, and another seed draws others."""
    make_tiny_model(3).save(tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    write_array(tmp_path / "val.zarr", tiny_images[:3], {})
    write_array(tmp_path / "gen.zarr", tiny_images[3:5], {})
    paths = {"val": tmp_path / "val.zarr", "gen": tmp_path / "gen.zarr"}
    spec = {"timesteps": 5, "noise_seeds": [0, 1], "scheme": "stratified", "timestep_seed": 7}
    stores = {}
    for batch_size in (3, 1000):
        stores[batch_size] = tmp_path / f"b{batch_size}.zarr"
        compute_and_save(weights, tiny_spec, paths, {**spec, "batch_size": batch_size}, stores[batch_size])
    small, large = (zarr.open_group(stores[b], mode="r") for b in (3, 1000))
    timesteps = stratified_timesteps(5, seed=7)
    assert small.attrs["timesteps"] == timesteps != select_timesteps(5, "uniform")
    np.testing.assert_allclose(small["val"][...], large["val"][...], rtol=1e-6)
    np.testing.assert_allclose(small["val"][...], query_losses(make_tiny_model(3), tiny_images[:3], timesteps, [0, 1], 4),
                               rtol=1e-6)
    compute_and_save(weights, tiny_spec, paths, {**spec, "timestep_seed": 8, "batch_size": 8}, tmp_path / "other.zarr")
    assert zarr.open_group(tmp_path / "other.zarr", mode="r").attrs["timesteps"] != timesteps
