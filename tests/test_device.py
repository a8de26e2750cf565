"""Device and precision policy, and per-sample gradients of a UNet with attention (the cifar2 model's kind)."""
import warnings

import numpy as np
import pytest
import torch

from diffattr.device import precision, resolve_device
from diffattr.featurize import batch_gradients
from diffattr.functions import model_output
from diffattr.ground_truth import query_losses
from diffattr.models import build_model
from diffattr.noise import noise_batch

ATTENTION_SPEC = {
    "kind": "pixel_ddpm",
    "unet": {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
             "attention_head_dim": None},
}


def test_auto_is_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match=r"device: 'cuda:1' asked for, but torch sees no CUDA GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ValueError, match=rf"device: '{name}'"):
        resolve_device(name)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision: 'fp8' is not one of fp32, tf32, bf16, fp16"):
        with precision("fp8", torch.device("cpu")):
            pass


def test_fp16_is_refused_off_a_gpu():
    with pytest.raises(ValueError, match=r"precision: fp16 needs a CUDA device, not cpu"):
        with precision("fp16", torch.device("cpu")):
            pass


def test_precision_changes_the_ground_truth_only_as_asked(make_tiny_model, tiny_images):
    """fp32 and tf32 (a no-op off Ampere GPUs) agree bit for bit on the CPU; bf16 is close, not equal."""
    model = make_tiny_model(0)
    args = (model, tiny_images, [0, 300, 600, 900], [0, 1], 7, torch.device("cpu"))
    fp32 = query_losses(*args)
    assert np.array_equal(query_losses(*args, dtype="tf32"), fp32)
    assert not torch.backends.cuda.matmul.allow_tf32  # the tf32 switch is restored afterwards
    bf16 = query_losses(*args, dtype="bf16")
    assert not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, rtol=5e-2)


def test_attention_unet_gradients_equal_a_per_sample_loop():
    """The cifar2 UNet has attention: its vmapped gradients (plain attention processor) must equal
    one backward() per sample with the default fused attention, without torch's warning that vmap
    fell back to a per-sample loop (fused attention has no batching rule)."""
    model = build_model(ATTENTION_SPEC, seed=0).train(False)
    images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32))
    timesteps = [0, 500, 999]
    expected = []
    for b in range(len(images)):
        model.unet.zero_grad()
        t = torch.tensor(timesteps)
        eps = noise_batch([(5, b, s) for s in timesteps], images.shape[1:])
        x_t = model.scheduler.add_noise(images[b:b + 1].expand(len(t), -1, -1, -1), eps, t)
        model_output("square", model.predict(x_t, t), eps, t, model.scheduler).mean().backward()
        expected.append(torch.cat([p.grad.reshape(-1) for _, p in model.featurized_parameters()]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = batch_gradients(model.for_per_sample_gradients(), images, range(3), "square", timesteps, 5)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-6)
