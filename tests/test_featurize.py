"""Features: per-sample gradients of the protocol's model-output functions, averaged over timesteps,
then projected with trak's BasicProjector. Every check compares values with a slow reference that is
written here again from the protocol's table, independently of `diffattr.functions`."""
import hashlib

import numpy as np
import pytest
import torch

from diffattr import noise
from diffattr.protocol import select_timesteps
from diffattr.featurize import features, featurize_split, batch_gradients, gradient_dim
from diffattr.project import make_projector
from diffattr.storage import read_array, write_array

FUNCTIONS = ["simple", "elbo", "square", "avg", "l1", "l2", "linf", "interp0.3"]
TIMESTEPS = [0, 137, 500, 999]  # both ends of the schedule included
INDEX, NOISE_SEED = 3, 7


def reference_value(name, pred, eps, t, betas, abar):
    """f(x, t, eps) for ONE sample, straight from the protocol's table (pred, eps: (1, C, H, W))."""
    if name == "simple":
        return ((pred - eps) ** 2).mean()
    if name == "elbo":
        beta = betas[t]
        alpha = 1.0 - beta
        w = beta / (2.0 * alpha * (1.0 - abar[t]))
        return w * ((pred - eps) ** 2).mean()
    if name == "square":
        return (pred ** 2).mean()
    if name == "avg":
        return pred.mean()
    if name == "l1":
        return pred.abs().sum()
    if name == "l2":
        return torch.sqrt((pred ** 2).sum())
    if name == "linf":
        return pred.abs().max()
    assert name.startswith("interp")
    eta = float(name[len("interp"):])
    return ((1.0 - eta) * pred ** 2 - 2.0 * eta * eps * pred).mean()


def reference_gradient(model, image: np.ndarray, index, name, timesteps, seed) -> torch.Tensor:
    """(1/K) sum_t grad f, one forward and one backward per timestep, noising done by hand."""
    unet = model.unet
    dtype = next(unet.parameters()).dtype
    params = [p for p in unet.parameters() if p.requires_grad]
    abar = model.scheduler.alphas_cumprod.to(torch.float64)
    betas = model.scheduler.betas.to(torch.float64)
    x0 = torch.from_numpy(np.asarray(image, dtype=np.float64))[None]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for t in timesteps:
        eps = torch.from_numpy(noise.gaussian(seed, index, t, image.shape).astype(np.float64))[None]
        x_t = torch.sqrt(abar[t]) * x0 + torch.sqrt(1.0 - abar[t]) * eps
        for p in params:
            p.grad = None
        pred = unet(x_t.to(dtype), torch.tensor([t])).sample.to(torch.float64)
        reference_value(name, pred, eps, t, betas, abar).backward()
        for acc, p in zip(total, params):
            acc += p.grad.to(torch.float64)
    for p in params:
        p.grad = None
    return torch.cat([g.reshape(-1) for g in total]) / len(timesteps)


@pytest.fixture(scope="module")
def double_model(make_tiny_model):
    return make_tiny_model(1, torch.float64)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).uniform(-1, 1, size=(2, 1, 8, 8))


def sample_gradient(model, image: np.ndarray, index, function, timesteps, seed):
    """One sample's row of `batch_gradients`."""
    return batch_gradients(model, torch.from_numpy(image[None]), [index], function, timesteps, seed)[0]


def assert_grad_close(got, ref, rtol=1e-5):
    got, ref = got.to(torch.float64), ref.to(torch.float64)
    scale = ref.abs().max().item()
    assert scale > 0, "reference gradient is identically zero: the test would be vacuous"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_batch_gradients_match_per_sample_per_timestep_reference(double_model, images, function):
    got = batch_gradients(double_model, torch.from_numpy(images), [INDEX, INDEX + 5], function, TIMESTEPS,
                          NOISE_SEED)
    assert got.dtype == torch.float32 and got.shape == (2, gradient_dim(double_model))
    for row, (image, index) in enumerate(zip(images, [INDEX, INDEX + 5])):
        assert_grad_close(got[row], reference_gradient(double_model, image, index, function, TIMESTEPS,
                                                       NOISE_SEED))


@pytest.mark.parametrize("max_pass_items", [2, 5, 6])
def test_timestep_chunks_match_the_reference(double_model, images, max_pass_items):
    """A pass of at most `max_pass_items` noised copies: 2 samples -> chunks of 1, 2 and 3 timesteps
    (the last chunk shorter), weighted by their size."""
    got = batch_gradients(double_model, torch.from_numpy(images), [INDEX, INDEX + 5], "square", TIMESTEPS,
                          NOISE_SEED, max_pass_items=max_pass_items)
    for row, (image, index) in enumerate(zip(images, [INDEX, INDEX + 5])):
        assert_grad_close(got[row], reference_gradient(double_model, image, index, "square", TIMESTEPS,
                                                       NOISE_SEED))


def test_sample_gradient_depends_on_index_seed_and_timesteps(double_model, images):
    """The noise really is drawn per (seed, index, t): changing any of them changes the gradient."""
    x = images[0]
    base = sample_gradient(double_model, x, INDEX, "simple", TIMESTEPS, NOISE_SEED)
    for other in (sample_gradient(double_model, x, INDEX + 1, "simple", TIMESTEPS, NOISE_SEED),
                  sample_gradient(double_model, x, INDEX, "simple", TIMESTEPS, NOISE_SEED + 1),
                  sample_gradient(double_model, x, INDEX, "simple", TIMESTEPS[:-1], NOISE_SEED)):
        assert not torch.allclose(base, other, rtol=1e-3, atol=0)


def test_interp_half_is_half_simple(double_model, images):
    x = images[0]
    half = sample_gradient(double_model, x, INDEX, "interp0.5", TIMESTEPS, NOISE_SEED)
    simple = sample_gradient(double_model, x, INDEX, "simple", TIMESTEPS, NOISE_SEED)
    assert_grad_close(half, 0.5 * simple)


def test_interp_zero_is_square(double_model, images):
    x = images[0]
    zero = sample_gradient(double_model, x, INDEX, "interp0.0", TIMESTEPS, NOISE_SEED)
    square = sample_gradient(double_model, x, INDEX, "square", TIMESTEPS, NOISE_SEED)
    assert_grad_close(zero, square)


def test_scheduler_is_the_protocol_ddpm(double_model):
    """Linear betas 1e-4..0.02 over T = 1000, abar = prod(1 - beta): the reference above relies on it."""
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(double_model.scheduler.betas.double().numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(double_model.scheduler.alphas_cumprod.double().numpy(),
                               np.cumprod(1 - betas), rtol=1e-4)


# ---------------------------------------------------------------- projection

PROJ_DIM, PROJ_SEED = 16, 42


def dense_projection(projector, grad_dim: int, block: int = 512) -> torch.Tensor:
    """The projector's (grad_dim, k) matrix, recovered by projecting the identity block by block."""
    rows = []
    for start in range(0, grad_dim, block):
        stop = min(grad_dim, start + block)
        basis = torch.zeros(stop - start, grad_dim)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        rows.append(projector.project(basis, model_id=0).to(torch.float64))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def float_model(make_tiny_model):
    return make_tiny_model(2)


@pytest.fixture(scope="module")
def dense_P(float_model):
    d = gradient_dim(float_model)
    projector, info = make_projector(d, PROJ_DIM, PROJ_SEED, torch.device("cpu"), 3)
    assert info["projector"] == "BasicProjector" and info["grad_dim"] == d
    return dense_projection(projector, d)


def reference_features(model, images, function, timesteps, seed, P):
    """Row i: the per-timestep reference gradient of image i (noise index i), times the dense matrix."""
    grads = torch.stack([reference_gradient(model, images[i], i, function, timesteps, seed)
                         for i in range(len(images))])
    return (grads @ P).numpy()


def assert_features_close(got, ref):
    scale = np.abs(ref).max()
    assert scale > 0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)


def test_projection_matrix_is_unscaled_standard_normal(dense_P, float_model):
    """Protocol: Normal entries, no 1/sqrt(k) scaling; and a fixed seed gives a fixed matrix."""
    assert dense_P.shape == (gradient_dim(float_model), PROJ_DIM)
    assert abs(dense_P.mean().item()) < 0.01
    assert abs(dense_P.std().item() - 1.0) < 0.01
    again, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED, torch.device("cpu"), 1)
    probe = torch.randn(2, gradient_dim(float_model), generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(again.project(probe, model_id=0).double().numpy(),
                               (probe.double() @ dense_P).numpy(), rtol=1e-4, atol=1e-3)
    other, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED + 1, torch.device("cpu"), 1)
    assert not torch.allclose(other.project(probe, model_id=0), again.project(probe, model_id=0))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_features_equal_dense_projection_of_gradients(float_model, dense_P, tiny_images, batch_size):
    images, function, timesteps, seed = tiny_images[:3], "square", [0, 500], 1
    projector, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED, torch.device("cpu"),
                                  batch_size)
    chunks = list(features(float_model, images, function, timesteps, seed, projector, batch_size))
    assert [start for start, _ in chunks] == list(range(0, len(images), batch_size))
    got = np.concatenate([rows for _, rows in chunks])
    assert got.dtype == np.float32 and got.shape == (3, PROJ_DIM)
    assert_features_close(got, reference_features(float_model, images, function, timesteps, seed, dense_P))


def test_features_do_not_depend_on_batch_size(float_model, tiny_images):
    images = tiny_images[:3]
    out = {}
    for batch_size in (1, 2, 3):
        projector, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED, torch.device("cpu"),
                                      batch_size)
        out[batch_size] = np.concatenate(
            [rows for _, rows in features(float_model, images, "simple", [0, 999], 4, projector, batch_size)])
    np.testing.assert_allclose(out[1], out[3], rtol=1e-5, atol=1e-5 * np.abs(out[3]).max())
    np.testing.assert_allclose(out[2], out[3], rtol=1e-5, atol=1e-5 * np.abs(out[3]).max())
    # rows of different images differ (each row really is its own sample's gradient)
    assert not np.allclose(out[3][0], out[3][1])


def test_featurize_split_writes_features_with_provenance(float_model, dense_P, tiny_images, tiny_spec,
                                                        tmp_path):
    model_dir = tmp_path / "model"
    float_model.save(model_dir)
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    assert weights.exists()
    images = tiny_images[:3]
    images_path = tmp_path / "images.zarr"
    write_array(images_path, images, {"split": "val"})
    timesteps = select_timesteps(4, "uniform")
    spec = {"batch_size": 2, "proj_seed": PROJ_SEED, "scheme": "uniform", "noise_seed": 5}
    out = tmp_path / "features" / "val.zarr"
    featurize_split(weights, tiny_spec, images_path, "l2", timesteps, PROJ_DIM, spec, out)

    rows, attrs = read_array(out)
    assert rows.dtype == np.float32 and rows.shape == (3, PROJ_DIM)
    expected_attrs = {
        "model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "function": "l2", "K": 4, "timesteps": [0, 250, 500, 750], "proj_dim": PROJ_DIM,
        "projector": "BasicProjector", "proj_seed": PROJ_SEED, "noise_seed": 5, "dtype": "float32",
    }
    for key, value in expected_attrs.items():
        assert attrs.get(key) == value, key

    projector, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED, torch.device("cpu"), 2)
    direct = np.concatenate([r for _, r in features(float_model, images, "l2", timesteps, 5, projector, 2)])
    np.testing.assert_allclose(rows, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    assert_features_close(rows, reference_features(float_model, images, "l2", timesteps, 5, dense_P))
    # nothing but the store is left beside it (no temporary from the atomic write)
    assert sorted(p.name for p in out.parent.iterdir()) == ["val.zarr"]


# ---------------------------------------------------------------- featurize.dtype (arithmetic)

def test_tf32_features_are_the_fp32_ones_bitwise_on_a_cpu(float_model, tiny_images):
    """featurize.dtype tf32 sets TF32 for matmuls and convolutions, which torch's CPU kernels ignore:
    on a CPU the features are fp32's bit for bit (docs/gpu.md); the switches are restored after."""
    out = {}
    for arithmetic in ("fp32", "tf32"):
        projector, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED, torch.device("cpu"), 2)
        out[arithmetic] = np.concatenate([rows for _, rows in features(float_model, tiny_images[:3], "square",
                                                                        [0, 500], 1, projector, 2,
                                                                        arithmetic=arithmetic)])
    np.testing.assert_array_equal(out["tf32"], out["fp32"])
    assert np.abs(out["fp32"]).max() > 0
    assert not torch.backends.cuda.matmul.allow_tf32


def test_features_refuse_an_arithmetic_for_gradients_they_do_not_offer(float_model, tiny_images):
    projector, _ = make_projector(gradient_dim(float_model), PROJ_DIM, PROJ_SEED, torch.device("cpu"), 2)
    with pytest.raises(ValueError, match=r"^featurize.dtype: got 'bf16'; expected one of fp32, tf32"):
        next(features(float_model, tiny_images[:2], "square", [0], 1, projector, 2, arithmetic="bf16"))


def test_featurize_split_records_its_arithmetic(float_model, tiny_images, tiny_spec, tmp_path):
    """`arithmetic` in the store: fp32 when the spec has no dtype, tf32 when it says so (the array's
    `dtype` stays float32); on a CPU the two stores hold the same rows."""
    float_model.save(tmp_path / "model")
    weights = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    write_array(tmp_path / "images.zarr", tiny_images[:3], {"split": "val"})
    spec = {"batch_size": 2, "proj_seed": PROJ_SEED, "scheme": "uniform", "noise_seed": 5}
    stores = {}
    for name, extra in (("absent", {}), ("fp32", {"dtype": "fp32"}), ("tf32", {"dtype": "tf32"})):
        out = tmp_path / name / "val.zarr"
        featurize_split(weights, tiny_spec, tmp_path / "images.zarr", "l2", [0, 500], PROJ_DIM, {**spec, **extra}, out)
        stores[name] = read_array(out)
    assert [stores[name][1]["arithmetic"] for name in stores] == ["fp32", "fp32", "tf32"]
    assert {stores[name][1]["dtype"] for name in stores} == {"float32"}
    np.testing.assert_array_equal(stores["tf32"][0], stores["absent"][0])
