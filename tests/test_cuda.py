"""The GPU path against the CPU: skipped on machines without CUDA (CI), run where a GPU is.

Each stage computed on the GPU in fp32 must agree with the same computation on the CPU to float32
rounding (different kernels sum in another order): convolutions must not silently run in TF32.
featurize.dtype tf32 is held close to fp32's features, and not equal to them.
Mixed-precision training (train.dtype bf16 and fp16, a GPU's) is held to fp32 training on the tiny
Stable Diffusion stack of test_latent_lora. So are train's speed options (train.channels_last,
train.compile): held to the plain GPU training, resumed bitwise after a kill.
"""
import copy
import functools

import numpy as np
import pytest
import torch

from diffattr import train as training
from diffattr.device import precision
from diffattr.featurize import batch_gradients, featurize_split
from diffattr.generate import sample
from diffattr.ground_truth import query_losses
from diffattr.latent import LatentLoRA
from diffattr.models import PixelDDPM, build_model, load_model
from diffattr.train import train

from conftest import assert_close, watch_training
from test_latent_lora import (SEED, TRAIN, assert_lora_training_resumes_bitwise, bases, latents,  # noqa: F401
                              lora_state, spec_of)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
ATTENTION_SPEC = {
    "kind": "pixel_ddpm",
    "unet": {"sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "add_attention": True},
}
TRAIN_SPEC = {"steps": 6, "batch_size": 8, "lr": 1e-3, "betas": [0.95, 0.999], "weight_decay": 1e-6,
              "grad_clip": 1.0, "warmup_fraction": 0.1, "hflip": True}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (6, 3, 16, 16)).astype(np.float32)


def model_on(device):
    return build_model(copy.deepcopy(ATTENTION_SPEC), seed=0).to(device).train(False)


def test_gradients_on_the_gpu_equal_the_cpu_in_fp32(images):
    grads = {}
    for device in (CPU, CUDA):
        model = model_on(device).for_per_sample_gradients()
        with precision("fp32", device):  # as featurize computes them; torch's default lets cuDNN use TF32
            grads[device.type] = batch_gradients(model, torch.from_numpy(images).to(device), range(6), "square",
                                                 [0, 300, 600, 900], 3).cpu()
    assert rel(grads["cuda"], grads["cpu"]) < 1e-5


def test_ground_truth_on_the_gpu_equals_the_cpu_in_fp32_and_bf16_is_close(images):
    args = (images, [0, 250, 500, 750], [0, 1], 16)
    cpu = query_losses(model_on(CPU), *args, device=CPU)
    assert rel(query_losses(model_on(CUDA), *args, device=CUDA), cpu) < 1e-5
    bf16 = query_losses(model_on(CUDA), *args, device=CUDA, dtype="bf16")
    assert 0 < rel(bf16, cpu) < 5e-2


def test_generation_on_the_gpu_follows_the_cpu(images):
    """Looser than one evaluation: DDIM's x0 estimate divides by sqrt(abar_t), which amplifies
    rounding differences at the first (noisiest) steps."""
    cpu = sample(model_on(CPU), 4, (3, 16, 16), 10, 0.0, 7, 4, CPU)
    assert rel(sample(model_on(CUDA), 4, (3, 16, 16), 10, 0.0, 7, 4, CUDA), cpu) < 1e-3


def test_training_on_the_gpu_follows_the_cpu(images):
    weights = {}
    for device in (CPU, CUDA):
        model = build_model(copy.deepcopy(ATTENTION_SPEC), seed=0)
        log = train(model, torch.from_numpy(images), None, TRAIN_SPEC, seed=1, device=device)
        weights[device.type] = (torch.cat([p.detach().cpu().reshape(-1) for p in model.trainable_parameters()]),
                                log.loss.to_numpy())
    np.testing.assert_allclose(weights["cuda"][1], weights["cpu"][1], rtol=1e-4)
    assert rel(weights["cuda"][0], weights["cpu"][0]) < 1e-4


def test_features_on_the_gpu_record_their_projector(tmp_path, images):
    """Features made on the GPU: with fast_jl, trak's CudaProjector and the GPU kind in the store;
    without it, the block projector drawn on the GPU. Two runs agree to float32 rounding, not bit
    for bit: cuDNN's weight-gradient kernels may sum in another order each run, and the projection's
    sums over p add up those differences (1.5e-5 seen on an H200 with fast_jl)."""
    import zarr

    from diffattr.storage import write_array

    model = model_on(CPU)
    model.save(tmp_path / "model")
    write_array(tmp_path / "images.zarr", images, {})
    spec = {"batch_size": 4, "proj_seed": 42, "noise_seed": 0, "scheme": "uniform"}
    stores = []
    for run in range(2):
        out = tmp_path / f"features{run}.zarr"
        featurize_split(tmp_path / "model" / "diffusion_pytorch_model.safetensors", ATTENTION_SPEC,
                        tmp_path / "images.zarr", "square", [0, 500], 512, spec, out, CUDA)
        stores.append(zarr.open_array(out, mode="r"))
    attrs = dict(stores[0].attrs)
    assert attrs["device"] == torch.cuda.get_device_name(CUDA)
    try:
        import fast_jl  # noqa: F401
        assert attrs["projector"] == "CudaProjector"
        assert attrs["sm_count"] == torch.cuda.get_device_properties(CUDA).multi_processor_count
    except ImportError:
        assert attrs["projector"] == "BasicProjector"
    assert rel(stores[1][...], stores[0][...]) < 1e-4
    assert np.isfinite(stores[0][...]).all() and np.abs(stores[0][...]).max() > 0


def test_tf32_features_are_close_to_fp32_but_not_equal(tmp_path):
    """featurize.dtype tf32 on the cifar2-mini model (random weights, its 10 timesteps): TF32 matmuls
    and convolutions give features within about 1e-2 of the norm of the fp32 ones, but not fp32's (on
    a CPU they are bitwise equal: test_featurize); the stores record their arithmetic."""
    import yaml

    from diffattr.settings import experiment
    from diffattr.storage import read_array, write_array

    from dry_run import REPO

    settings = experiment(yaml.safe_load((REPO / "config.yaml").read_text()), "cifar2-mini", libraries=False)
    model = build_model(settings["model"], seed=0)
    model.save(tmp_path / "model")
    unet = settings["model"]["unet"]
    images = np.random.default_rng(1).uniform(-1, 1, (16, unet["in_channels"], unet["sample_size"],
                                                      unet["sample_size"])).astype(np.float32)
    write_array(tmp_path / "images.zarr", images, {})
    spec = {"batch_size": 8, "proj_seed": 42, "noise_seed": 0, "scheme": "uniform"}
    rows = {}
    for dtype in ("fp32", "tf32"):
        out = tmp_path / f"{dtype}.zarr"
        featurize_split(tmp_path / "model" / "diffusion_pytorch_model.safetensors", settings["model"],
                        tmp_path / "images.zarr", "square", list(range(0, 1000, 100)), 512,
                        {**spec, "dtype": dtype}, out, CUDA)
        rows[dtype], attrs = read_array(out)
        assert attrs["arithmetic"] == dtype
    fp32, tf32 = rows["fp32"].astype(np.float64), rows["tf32"].astype(np.float64)
    error = np.linalg.norm(tf32 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    # fp32 runs differ by float32 rounding only (< 1e-4, test_features_on_the_gpu_record_their_projector)
    assert 1e-4 < error.max() < 5e-2 and np.median(error) < 2e-2, error


def test_journey_features_regenerate_a_gpu_generation_set_on_either_device(tmp_path):
    """The generation set made on the GPU: Journey featurization regenerates its trajectories on the
    GPU (bit for bit) and on the CPU (within journey.ENDPOINT_TOLERANCE), and two GPU runs agree."""
    import zarr

    from diffattr.generate import generate_set
    from diffattr.journey import featurize_journey

    model_on(CPU).save(tmp_path / "model")
    weights = tmp_path / "model" / "diffusion_pytorch_model.safetensors"
    generate = {"n": 6, "steps": 10, "eta": 0.0, "seed": 3, "batch_size": 4, "dtype": "fp32"}
    generate_set(weights, ATTENTION_SPEC, generate, tmp_path / "gen.zarr", CUDA)
    spec = {"batch_size": 4, "proj_seed": 42, "noise_seed": 0, "scheme": "uniform"}
    stores = {}
    for name, device in (("cuda0", CUDA), ("cuda1", CUDA), ("cpu", CPU)):
        featurize_journey(weights, ATTENTION_SPEC, tmp_path / "gen.zarr", "simple", generate, 512, spec,
                          tmp_path / f"{name}.zarr", device)
        stores[name] = zarr.open_array(tmp_path / f"{name}.zarr", mode="r")[...]
    assert np.isfinite(stores["cuda0"]).all() and np.abs(stores["cuda0"]).max() > 0
    assert rel(stores["cuda1"], stores["cuda0"]) < 1e-4
    assert np.isfinite(stores["cpu"]).all()


# ---------------------------------------------------------------- mixed-precision LoRA training (train.dtype)

LORA_TRAIN = {**TRAIN, "steps": 8, "hflip": True, "caption_dropout": 0.2}
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
# A loss scale at which the tiny stack's fp16 gradients overflow for a step or two (the default, 2^16, never here)
OVERFLOWING = 2.0 ** 23


def scaler_updates(monkeypatch) -> list:
    """(enabled, scale before, scale after) of each GradScaler.update: a step whose scale drops was skipped."""
    updates, real = [], torch.amp.GradScaler.update

    def update(self, new_scale=None):
        before = self.get_scale()
        real(self, new_scale)
        updates.append((self.is_enabled(), before, self.get_scale()))

    monkeypatch.setattr(torch.amp.GradScaler, "update", update)
    return updates


def lora_training(base, dtype):
    """A LoRA of the tiny stack trained on the GPU in `dtype`, and its loss log."""
    model = LatentLoRA.build(spec_of(base), SEED)
    log = training.train(model, latents(8, 9), LABELS, {**LORA_TRAIN, "dtype": dtype}, SEED, CUDA,
                         flipped=latents(8, 10))
    return model, log


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_lora_training_follows_fp32(bases, monkeypatch, dtype):
    """Each step's loss within the half type's rounding of the fp32 training's, not equal to it; fp16
    through the loss scaler (no step skipped at its initial scale here), bf16 without; the LoRA trained
    and kept in fp32."""
    _, fp32 = lora_training(bases["eps"], "fp32")
    updates = scaler_updates(monkeypatch)
    model, log = lora_training(bases["eps"], dtype)
    assert [(enabled, after < before) for enabled, before, after in updates] == [(dtype == "fp16", False)] * 8
    losses = log["loss"].to_numpy(copy=True)
    assert np.isfinite(losses).all() and not np.array_equal(losses, fp32["loss"].to_numpy())
    assert_close(losses, fp32["loss"].to_numpy(copy=True), 2e-2)
    lora = lora_state(model)
    initial = lora_state(LatentLoRA.build(spec_of(bases["eps"]), SEED))
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in lora.values())
    assert any(not torch.equal(p, initial[name]) for name, p in lora.items())


def test_a_step_fp16_skips_leaves_the_learning_rate_schedule_where_it_was(bases, monkeypatch):
    """Started at a loss scale its gradients overflow at, fp16 training skips steps as the scale halves:
    at each step the learning rate is the schedule's after the steps taken, as accelerate's."""
    _, fp32 = lora_training(bases["eps"], "fp32")
    updates = scaler_updates(monkeypatch)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=OVERFLOWING))
    _, log = lora_training(bases["eps"], "fp16")
    taken = np.cumsum([after >= before for _, before, after in updates])
    assert 0 < taken[-1] < len(taken)  # some steps skipped, some taken
    lr = [TRAIN["lr"] if n == 0 else fp32["lr"][n - 1] for n in taken]
    assert log["lr"].tolist() == lr


@pytest.fixture
def deterministic(monkeypatch):
    """cuDNN's and cuBLAS's deterministic kernels: two GPU trainings agree bit for bit only with them."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def test_killed_fp16_training_resumes_bitwise_with_its_loss_scale(bases, tmp_path, monkeypatch, deterministic):
    """Started at OVERFLOWING, the scale has dropped by the first checkpoint: a resumed training that began
    again from the initial scale would skip other steps. The checkpoint holds the scaler's state."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=OVERFLOWING))
    states = assert_lora_training_resumes_bitwise(bases["eps"], tmp_path / ".model.ckpt", "fp16", CUDA)
    assert 0 < states[0]["scaler"]["scale"] < OVERFLOWING


def test_features_of_an_fp16_trained_lora_are_those_of_its_saved_fp32_weights(bases, tmp_path, monkeypatch):
    """The LoRA is saved in fp32 and featurization computes in fp32 whatever training's dtype: the trained
    model in memory and the one loaded from its folder give the same gradients."""
    from safetensors.torch import load_file

    from diffattr.storage import write_array

    write_array(tmp_path / "train.zarr", latents(8, 9).numpy(), {"labels": LABELS.tolist()})
    spec, caught = {**LORA_TRAIN, "dtype": "fp16", "model": spec_of(bases["eps"])}, []
    monkeypatch.setattr(training, "build_model", lambda s, seed: caught.append(LatentLoRA.build(s, seed)) or caught[0])
    weights = tmp_path / "model" / LatentLoRA.weights_file
    training.train_and_save(tmp_path / "train.zarr", None, None, SEED, spec, weights, CUDA)
    assert {value.dtype for value in load_file(weights).values()} == {torch.float32}
    grads = []
    for model in (caught[0], load_model(spec["model"], weights.parent)):
        model = model.to(CUDA).train(False).for_per_sample_gradients()
        with precision("fp32", CUDA):
            grads.append(batch_gradients(model, latents(4, 11).to(CUDA), range(4), "simple", [10, 500], 3,
                                         np.array([0, 1, 2, 0])).cpu())
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert rel(grads[1], grads[0]) < 1e-5


# ---------------------------------------------------------------- train.channels_last, train.compile

# both together are refused (settings.COMPILE_WITH_CHANNELS_LAST): wrong gradients on the CPU; to lift the
# refusal on a GPU, add {"channels_last": True, "compile": True} here and see these pass
SPEED_OPTIONS = [{"channels_last": True}, {"compile": True}]
SPEED_IDS = ["channels_last", "compile"]


@pytest.mark.parametrize("options", SPEED_OPTIONS, ids=SPEED_IDS)
def test_training_with_a_speed_option_on_the_gpu_follows_the_plain_one(images, options):
    """The attention UNet (dropout 0) on three channels, fp32 (no TF32): losses and weights within float
    rounding of the plain GPU training's, each option seen in effect, the weights contiguous after."""
    trained = {}
    for name, extra in (("plain", {}), ("option", options)):
        model = build_model(copy.deepcopy(ATTENTION_SPEC), seed=0)
        with pytest.MonkeyPatch.context() as patch:
            seen = watch_training(patch, PixelDDPM)
            log = train(model, torch.from_numpy(images), None, {**TRAIN_SPEC, **extra}, seed=1, device=CUDA)
        assert len(seen) == TRAIN_SPEC["steps"]
        assert all(s["input"] == s["weights"] == extra.get("channels_last", False) for s in seen)
        assert all(s["compiled"] == extra.get("compile", False) for s in seen)
        assert all(p.is_contiguous() for p in model.trainable_parameters())
        trained[name] = (torch.cat([p.detach().cpu().reshape(-1) for p in model.trainable_parameters()]),
                         log.loss.to_numpy())
    np.testing.assert_allclose(trained["option"][1], trained["plain"][1], rtol=1e-4)
    assert rel(trained["option"][0], trained["plain"][0]) < 1e-3


@pytest.mark.parametrize("options", SPEED_OPTIONS, ids=SPEED_IDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_killed_lora_training_with_a_speed_option_resumes_bitwise_on_the_gpu(bases, tmp_path, deterministic, dtype,
                                                                             options, monkeypatch):
    """Attention dropout 0.5 (compiled: inductor's seeds, drawn from the CUDA generator the checkpoint holds)."""
    seen = watch_training(monkeypatch, LatentLoRA)
    assert_lora_training_resumes_bitwise(bases["eps"], tmp_path / ".model.ckpt", dtype, CUDA, **options)
    assert seen and all(s["input"] == s["weights"] == options.get("channels_last", False) for s in seen)
    assert all(s["compiled"] == options.get("compile", False) for s in seen)
