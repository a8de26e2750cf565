"""Shared fixtures: a tiny pixel DDPM (a few tens of thousands of parameters) and its spec."""
import copy

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

TINY_SPEC = {
    "kind": "pixel_ddpm",
    "unet": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "add_attention": False,
    },
}


# ---------------------------------------------------------------- references shared by the model-kind tests

def abar(model, t):
    """alpha-bar of the model's scheduler at timestep t, float64."""
    return model.scheduler.alphas_cumprod.to(torch.float64)[t]


def velocity(model, x0, eps, t):
    """The v-prediction target sqrt(abar_t) eps - sqrt(1 - abar_t) x0, by hand."""
    a = abar(model, t)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def assert_close(got, ref, rtol):
    got, ref = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (got, ref))
    scale = ref.abs().max().item()
    assert scale > 0, "the reference is identically zero: the check would be vacuous"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)


def assert_far(got, ref, rtol):
    """`got` is not within `assert_close`'s tolerance of `ref`: the check can tell them apart."""
    with pytest.raises(AssertionError):
        assert_close(got, ref, rtol)


# ---------------------------------------------------------------- train's speed options took effect

def is_channels_last(x: torch.Tensor) -> bool:
    """In channels_last layout and not also contiguous (as a tensor with one channel, or 1 x 1 images, is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv_weights(tensors) -> list[torch.Tensor]:
    """The 4-d tensors whose layouts differ: more than one input channel, kernels larger than 1 x 1."""
    return [p for p in tensors if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]


def watch_training(monkeypatch, kind) -> list[dict]:
    """What each forward pass of a `kind` model (a models.DiffusionModel class) saw while this patch
    holds: its input's and its network's convolution weights' layouts, and whether the network was compiled."""
    seen, real = [], kind.predict

    def predict(self, x_t, t, cond=None):
        convs = conv_weights(self.network().parameters())
        assert convs
        seen.append({"input": is_channels_last(x_t), "weights": all(map(is_channels_last, convs)),
                     "compiled": self.network()._compiled_call_impl is not None})
        return real(self, x_t, t, cond)

    monkeypatch.setattr(kind, "predict", predict)
    return seen


@pytest.fixture
def tiny_spec():
    """A fresh copy of the tiny model spec (tests may edit it)."""
    return copy.deepcopy(TINY_SPEC)


@pytest.fixture(scope="session")
def make_tiny_model():
    """Builder of tiny randomly initialised PixelDDPMs in eval mode: make_tiny_model(seed, dtype)."""
    from diffattr.models import build_model

    def make(seed=0, dtype=torch.float32):
        model = build_model(copy.deepcopy(TINY_SPEC), seed=seed)
        model.unet.to(dtype)
        model.train(False)
        return model

    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    """A tiny randomly initialised float32 PixelDDPM in eval mode."""
    return make_tiny_model(0)


@pytest.fixture
def tiny_images():
    """Five 1x8x8 float32 images in [-1, 1]."""
    rng = np.random.default_rng(123)
    return rng.uniform(-1, 1, size=(5, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A copy of the workflow (not of results/) with the tiny experiment built once (rule all: the table,
    every intermediate output and the figures), shared by the end-to-end tests that only read it or
    restore what they change."""
    import os
    import subprocess
    import sys

    from dry_run import copy_workflow

    root = copy_workflow(tmp_path_factory.mktemp("workflow"))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--config", "experiment=tiny"],
                            cwd=root, text=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise AssertionError(f"the tiny run failed:\n{result.stdout}\n{result.stderr}")
    return root
