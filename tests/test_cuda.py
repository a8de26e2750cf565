"""The GPU path against the CPU: skipped on machines without CUDA (CI), run where a GPU is.

Each stage computed on the GPU in fp32 must agree with the same computation on the CPU to float32
rounding (different kernels sum in another order): convolutions must not silently run in TF32.
"""
import copy

import numpy as np
import pytest
import torch

from diffattr.device import precision
from diffattr.featurize import batch_gradients, featurize_split
from diffattr.generate import sample
from diffattr.ground_truth import query_losses
from diffattr.models import build_model
from diffattr.train import train

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
