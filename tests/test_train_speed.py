"""train.channels_last and train.compile (diffattr.train's opt-in speed options) on the tiny pixel DDPM:
each follows the ordinary training within float rounding (compile: with dropout 0; with dropout its
randomness is drawn otherwise, but the same for the same seed), saves weights in the ordinary layout,
resumes bitwise after a kill, and is refused when not a boolean. Each test also checks that the option
took effect (the layouts the network saw, the compiled call), so that an option ignored fails it.
The compile tests are marked `slow`: inductor compiles the training's graphs on the CPU (about two
minutes each on two cores, seconds once torch's on-disk cache holds them).
The LoRA kind's are in test_latent_lora.py, the GPU's in test_cuda.py.
"""
import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr import train as training
from diffattr.models import PixelDDPM, build_model, load_model
from diffattr.protocol import ARTIFACTS
from diffattr.storage import write_array

from conftest import TINY_SPEC, assert_close, conv_weights, is_channels_last, watch_training
from test_resume import TRAIN_SPEC, Crash, crash_after, params

# test_resume's model (dropout 0.1) on two channels: one channel's tensors are contiguous in both layouts
TWO = {"in_channels": 2, "out_channels": 2}
MODEL_SPEC = {**copy.deepcopy(TINY_SPEC), "unet": {**TINY_SPEC["unet"], "dropout": 0.1, **TWO}}
NO_DROPOUT = {**copy.deepcopy(TINY_SPEC), "unet": {**TINY_SPEC["unet"], **TWO}}


def watch(monkeypatch):
    return watch_training(monkeypatch, PixelDDPM)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(9).uniform(-1, 1, size=(12, 2, 8, 8)).astype(np.float32)


def all_contiguous(model) -> bool:
    return all(p.is_contiguous() for p in model.network().parameters())


# ---------------------------------------------------------------- channels_last

def test_channels_last_training_follows_the_ordinary_one_and_saves_the_ordinary_layout(images, tmp_path, monkeypatch):
    """Dropout 0 (with dropout, its masks are drawn in memory order: another training, see the next test).
    Losses within float rounding of the ordinary training's, the network and its input in channels_last
    while training, back in the ordinary layout after; the saved weights (final and a kept step's) load
    bitwise as the trained ones, contiguous, and within rounding of the ordinary training's."""
    write_array(tmp_path / "train.zarr", images, {"split": "train"})
    spec = {**TRAIN_SPEC, "model": NO_DROPOUT, "keep_checkpoints": [6]}
    trained, logs = {}, {}
    for name, options in (("plain", {}), ("channels_last", {"channels_last": True})):
        caught = []
        with pytest.MonkeyPatch.context() as patch:
            seen = watch(patch)
            patch.setattr(training, "build_model", lambda s, seed: caught.append(build_model(s, seed)) or caught[0])
            weights = tmp_path / name / "model" / ARTIFACTS["weights"]
            training.train_and_save(tmp_path / "train.zarr", None, None, 3, {**spec, **options}, weights,
                                    trajectory_path=tmp_path / name / "trajectory")
        assert len(seen) == spec["steps"]
        assert all(s["input"] and s["weights"] for s in seen) == bool(options)
        assert not any(s["input"] or s["weights"] or s["compiled"] for s in seen) or options
        trained[name], logs[name] = caught[0], pd.read_csv(weights.parent / ARTIFACTS["loss_log"]).to_numpy(copy=True)
        assert all_contiguous(caught[0])
        loaded = load_model(NO_DROPOUT, weights.parent)
        assert all(torch.equal(p, q) and q.is_contiguous() for p, q in zip(params(caught[0]), params(loaded)))
    assert_close(logs["channels_last"][:, 1:3], logs["plain"][:, 1:3], 1e-5)  # loss, grad_norm
    for p, q in zip(params(trained["channels_last"]), params(trained["plain"])):
        assert_close(p, q, 1e-4)
    kept = {name: load_model(NO_DROPOUT, tmp_path / name / "trajectory" / "step6") for name in trained}
    assert all_contiguous(kept["channels_last"])
    for p, q in zip(params(kept["channels_last"]), params(kept["plain"])):
        assert_close(p, q, 1e-4)


def test_channels_last_training_resumes_bitwise(images, tmp_path, monkeypatch):
    """Dropout 0.1, as test_resume's: killed after the step-8 checkpoint and rerun, bitwise the
    uninterrupted training in channels_last; the checkpoint holds the weights and AdamW's moments in
    channels_last. Dropout draws its masks in memory order, so with dropout the training is not the
    ordinary one's (its losses differ by more than rounding), but as seeded."""
    data, spec = torch.from_numpy(images), {**TRAIN_SPEC, "channels_last": True}
    reference = build_model(MODEL_SPEC, 0)
    reference_log = training.train(reference, data, None, spec, 0)
    plain_log = training.train(build_model(MODEL_SPEC, 0), data, None, TRAIN_SPEC, 0)
    assert not np.allclose(reference_log["loss"], plain_log["loss"], rtol=1e-3)
    checkpoint = tmp_path / ".model.ckpt"
    crash_after(monkeypatch, training, "_save_checkpoint", 2)
    with pytest.raises(Crash):
        training.train(build_model(MODEL_SPEC, 0), data, None, spec, 0, checkpoint=checkpoint)
    monkeypatch.undo()
    state = torch.load(checkpoint, weights_only=False)
    assert state["step"] == 8
    convs = conv_weights(state["params"])
    moments = conv_weights(s["exp_avg"] for s in state["optimizer"]["state"].values())
    assert convs and all(map(is_channels_last, convs)) and moments and all(map(is_channels_last, moments))
    torch.manual_seed(999)
    resumed = build_model(MODEL_SPEC, 0)
    log = training.train(resumed, data, None, spec, 0, checkpoint=checkpoint)
    assert all(torch.equal(p, q) for p, q in zip(params(resumed), params(reference)))
    pd.testing.assert_frame_equal(log, reference_log, check_exact=True)


def test_a_speed_option_is_part_of_a_trainings_identity_unless_false(images):
    """A checkpoint of the training with an option is not resumed by the training without it; an option
    set to false is the training without it (same identity, so no checkpoint is discarded)."""
    data, model = torch.from_numpy(images), build_model(MODEL_SPEC, 0)
    identity = lambda **options: training._identity(model, data, None, {**TRAIN_SPEC, **options}, 0,
                                                    torch.device("cpu"))
    assert identity(channels_last=True) != identity() != identity(compile=True) != identity(channels_last=True)
    assert identity(channels_last=False, compile=False) == identity()


@pytest.mark.parametrize("key", ["channels_last", "compile"])
@pytest.mark.parametrize("value", [1, "true", None, 0.0])
def test_a_speed_option_must_be_a_boolean(images, key, value):
    with pytest.raises(ValueError, match=rf"train.{key}={value!r}: expected true or false"):
        training.train(build_model(MODEL_SPEC, 0), torch.from_numpy(images), None, {**TRAIN_SPEC, key: value}, 0)


# ---------------------------------------------------------------- compile

def test_compile_with_channels_last_is_refused(images):
    """Together, torch 2.13's inductor computed wrong gradients (diffattr.train's docstring): refused
    before the network is touched (the config check refuses it before any job: test_config.py)."""
    model = build_model(NO_DROPOUT, 0)
    with pytest.raises(ValueError, match=r"^train.compile: got true with train.channels_last true; expected at most"):
        training.train(model, torch.from_numpy(images), None, {**TRAIN_SPEC, "compile": True, "channels_last": True}, 0)
    assert model.network()._compiled_call_impl is None and all_contiguous(model)


def test_compiled_trainings_use_the_configured_compile_cache(tmp_path, monkeypatch):
    """config.yaml's compile_cache becomes the folder inductor's cache lookup returns for a compiled
    training, even once importing torch._inductor (the warm worker's preload) has set torch's own; an
    eager training, or compile_cache null, leaves it alone."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch_default = cache_dir()  # as the preload leaves it: TORCHINDUCTOR_CACHE_DIR set to torch's folder
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == torch_default
    compiled = {**TRAIN_SPEC, "compile": True}
    for spec, folder in (({**TRAIN_SPEC, "compile": False}, "shared"), (TRAIN_SPEC, "shared"), (compiled, None)):
        training.use_compile_cache(spec, folder)
        assert cache_dir() == torch_default
    monkeypatch.chdir(tmp_path)
    training.use_compile_cache(compiled, "results/inductor-cache")  # relative to the job's folder
    assert cache_dir() == str(tmp_path / "results" / "inductor-cache") and (tmp_path / "results" / "inductor-cache").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"compile": True}], ids=["compile"])
def test_compiled_training_without_dropout_follows_eager(images, options):
    """Dropout 0: a compiled training's losses and weights are the eager one's within float rounding
    (inductor fuses and reorders), the network compiled while it trains and uncompiled after. This is
    what caught inductor's layout optimization computing wrong gradients (diffattr.train's docstring)."""
    data, spec = torch.from_numpy(images), {**TRAIN_SPEC, "steps": 6}
    logs, trained = {}, {}
    for name, extra in (("eager", {}), ("compiled", options)):
        model = build_model(NO_DROPOUT, 0)
        with pytest.MonkeyPatch.context() as patch:
            seen = watch(patch)
            logs[name] = training.train(model, data, None, {**spec, **extra}, 0)
        assert [s["compiled"] for s in seen] == [bool(extra)] * spec["steps"]
        assert [s["input"] for s in seen] == [extra.get("channels_last", False)] * spec["steps"]
        assert model.network()._compiled_call_impl is None and all_contiguous(model)
        trained[name] = model
    columns = ["loss", "grad_norm"]
    assert_close(logs["compiled"][columns].to_numpy(), logs["eager"][columns].to_numpy(), 1e-5)
    for p, q in zip(params(trained["compiled"]), params(trained["eager"])):
        assert_close(p, q, 1e-4)
    assert list(trained["compiled"].unet.state_dict()) == list(trained["eager"].unet.state_dict())


@pytest.mark.slow
def test_compiled_training_with_dropout_is_seeded_and_resumes_bitwise(images, tmp_path, monkeypatch):
    """Dropout 0.1: compiled dropout draws other numbers than eager's (the losses differ), the same for
    the same seed (two runs equal), and a compiled training killed after its step-8 checkpoint and
    rerun is bitwise the uninterrupted one."""
    data, spec = torch.from_numpy(images), {**TRAIN_SPEC, "compile": True}
    eager_log = training.train(build_model(MODEL_SPEC, 0), data, None, TRAIN_SPEC, 0)
    reference = build_model(MODEL_SPEC, 0)
    seen = watch(monkeypatch)
    reference_log = training.train(reference, data, None, spec, 0)
    assert all(s["compiled"] for s in seen)
    assert not np.allclose(reference_log["loss"], eager_log["loss"], rtol=1e-3)  # compiled: other dropout
    again = build_model(MODEL_SPEC, 0)
    torch.manual_seed(5)
    pd.testing.assert_frame_equal(training.train(again, data, None, spec, 0), reference_log, check_exact=True)
    assert all(torch.equal(p, q) for p, q in zip(params(again), params(reference)))

    checkpoint = tmp_path / ".model.ckpt"
    crash_after(monkeypatch, training, "_save_checkpoint", 2)
    with pytest.raises(Crash):
        training.train(build_model(MODEL_SPEC, 0), data, None, spec, 0, checkpoint=checkpoint)
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=False)["step"] == 8
    torch.manual_seed(999)
    resumed = build_model(MODEL_SPEC, 0)
    log = training.train(resumed, data, None, spec, 0, checkpoint=checkpoint)
    assert all(torch.equal(p, q) for p, q in zip(params(resumed), params(reference)))
    pd.testing.assert_frame_equal(log, reference_log, check_exact=True)
