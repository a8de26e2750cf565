"""Resuming after a kill: training from its last checkpoint, featurization and ground truth from their
finished chunks, each ending bitwise equal (on CPU) to an uninterrupted run.

The unit tests interrupt a job by raising from inside it; the kill tests (marker `resume`, part of
the default run) kill -9 a Snakemake run of the `tiny` experiment at a random point and rerun it.
"""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from diffattr import featurize, ground_truth, storage
from diffattr import train as training
from diffattr.models import build_model
from diffattr.storage import write_array

from conftest import TINY_SPEC

SHAPE = (1, 8, 8)
MODEL_SPEC = {**copy.deepcopy(TINY_SPEC), "unet": {**TINY_SPEC["unet"], "dropout": 0.1}}  # global RNG matters
TRAIN_SPEC = {"steps": 12, "batch_size": 5, "lr": 1e-3, "betas": [0.95, 0.999], "weight_decay": 1e-6,
              "grad_clip": 1.0, "warmup_fraction": 0.2, "hflip": True, "checkpoint_every": 4}


class Crash(Exception):
    """Stands for a kill in the unit tests."""


def crash_after(monkeypatch, owner, name, calls):
    """Make `owner.name` raise Crash right after its `calls`-th call has done its work."""
    real, count = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            raise Crash
        return result

    monkeypatch.setattr(owner, name, wrapper)


def count_calls(monkeypatch, owner, name):
    real, count = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return count


def tree(root):
    """Every file under `root` (relative path -> bytes): two equal trees are bitwise equal stores."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(9).uniform(-1, 1, size=(12, *SHAPE)).astype(np.float32)


# ---------------------------------------------------------------- training

def params(model):
    return [p.detach().clone() for p in model.unet.parameters()]


def test_training_resumed_from_a_checkpoint_is_bitwise_an_uninterrupted_one(images, tmp_path, monkeypatch,
                                                                           capsys):
    data = torch.from_numpy(images)
    reference = build_model(MODEL_SPEC, 0)
    reference_log = training.train(reference, data, None, TRAIN_SPEC, 0)

    checkpoint = tmp_path / ".model.ckpt"
    crash_after(monkeypatch, training, "_save_checkpoint", 2)  # killed just after the step-8 checkpoint
    with pytest.raises(Crash):
        training.train(build_model(MODEL_SPEC, 0), data, None, TRAIN_SPEC, 0, checkpoint=checkpoint)
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=False)["step"] == 8

    torch.manual_seed(999)  # whatever the global RNG holds, the checkpoint's state is restored
    resumed = build_model(MODEL_SPEC, 0)
    capsys.readouterr()
    log = training.train(resumed, data, None, TRAIN_SPEC, 0, checkpoint=checkpoint)
    assert f"{checkpoint}: resuming from step 8 of 12" in capsys.readouterr().out
    assert all(torch.equal(p, q) for p, q in zip(params(resumed), params(reference)))
    pd.testing.assert_frame_equal(log, reference_log, check_exact=True)
    assert not all(torch.equal(p, q) for p, q in zip(params(resumed), params(build_model(MODEL_SPEC, 0))))


def test_a_checkpoint_of_another_training_is_discarded(images, tmp_path, monkeypatch, capsys):
    data = torch.from_numpy(images)
    checkpoint = tmp_path / ".model.ckpt"
    crash_after(monkeypatch, training, "_save_checkpoint", 1)
    with pytest.raises(Crash):
        training.train(build_model(MODEL_SPEC, 1), data, None, TRAIN_SPEC, 1, checkpoint=checkpoint)  # seed 1
    monkeypatch.undo()
    model = build_model(MODEL_SPEC, 0)
    log = training.train(model, data, None, TRAIN_SPEC, 0, checkpoint=checkpoint)
    out = capsys.readouterr().out
    assert "discarding the checkpoint" in out and "resuming" not in out
    reference = build_model(MODEL_SPEC, 0)
    pd.testing.assert_frame_equal(log, training.train(reference, data, None, TRAIN_SPEC, 0), check_exact=True)
    assert all(torch.equal(p, q) for p, q in zip(params(model), params(reference)))


def test_train_and_save_resumes_and_removes_its_checkpoint(images, tmp_path, monkeypatch, capsys):
    images_path = tmp_path / "train.zarr"
    write_array(images_path, images, {"split": "train"})
    spec = {**TRAIN_SPEC, "model": MODEL_SPEC}
    first = tmp_path / "a" / "model" / "diffusion_pytorch_model.safetensors"
    training.train_and_save(images_path, None, None, 3, spec, first)
    assert first.exists() and not training.checkpoint_path(first).exists()

    second = tmp_path / "b" / "model" / "diffusion_pytorch_model.safetensors"
    crash_after(monkeypatch, training, "_save_checkpoint", 1)
    with pytest.raises(Crash):
        training.train_and_save(images_path, None, None, 3, spec, second)
    monkeypatch.undo()
    assert training.checkpoint_path(second) == tmp_path / "b" / ".model.ckpt"
    assert training.checkpoint_path(second).exists() and not second.exists()
    training.train_and_save(images_path, None, None, 3, spec, second)
    assert "resuming from step 4 of 12" in capsys.readouterr().out
    assert not training.checkpoint_path(second).exists()
    assert tree(second.parent) == tree(first.parent)


@pytest.mark.parametrize("value", [-1, 2.5, "10", True])
def test_checkpoint_every_must_be_a_non_negative_integer(value, images):
    with pytest.raises(ValueError, match=r"train.checkpoint_every=.*expected an integer >= 0"):
        training.train(build_model(MODEL_SPEC, 0), torch.from_numpy(images), None,
                       {**TRAIN_SPEC, "checkpoint_every": value}, 0)


# ---------------------------------------------------------------- featurization and ground truth

@pytest.fixture(scope="module")
def stored(tmp_path_factory, images):
    """A saved tiny model and an image store: the inputs of featurization and ground truth."""
    root = tmp_path_factory.mktemp("inputs")
    model = build_model(TINY_SPEC, 4)
    model.save(root / "model")
    write_array(root / "val.zarr", images[:7], {"split": "val"})
    write_array(root / "gen.zarr", images[7:], {"split": "gen"})
    return root / "model" / model.weights_file, root / "val.zarr", root / "gen.zarr"


FEATURIZE_SPEC = {"batch_size": 2, "proj_seed": 0, "scheme": "uniform", "noise_seed": 0}


def run_featurize(stored, out, spec=FEATURIZE_SPEC):
    weights, val, _ = stored
    featurize.featurize_split(weights, TINY_SPEC, val, "square", [0, 500], 16, spec, out)


def test_featurization_resumes_from_its_finished_chunks(stored, tmp_path, monkeypatch, capsys):
    run_featurize(stored, tmp_path / "reference.zarr")
    out = tmp_path / "features.zarr"
    crash_after(monkeypatch, storage.ResumableOutput, "mark_done", 2)  # 2 of the 4 chunks are written
    with pytest.raises(Crash):
        run_featurize(stored, out)
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".features.zarr.partial").is_dir()

    capsys.readouterr()
    batches = count_calls(monkeypatch, featurize, "batch_gradients")
    run_featurize(stored, out)
    assert "resuming, 2 of 4 chunks already done" in capsys.readouterr().out
    assert batches[0] == 2  # only the missing chunks were computed
    assert not (tmp_path / ".features.zarr.partial").exists()
    assert tree(out) == tree(tmp_path / "reference.zarr")
    rows, attrs = storage.read_array(out)
    assert rows.shape == (7, 16) and np.all(np.abs(rows).sum(1) > 0) and attrs["function"] == "square"


def test_a_partial_store_of_other_settings_is_discarded(stored, tmp_path, monkeypatch, capsys):
    out = tmp_path / "features.zarr"
    crash_after(monkeypatch, storage.ResumableOutput, "mark_done", 3)
    with pytest.raises(Crash):
        run_featurize(stored, out, {**FEATURIZE_SPEC, "noise_seed": 1})
    monkeypatch.undo()
    run_featurize(stored, out)
    log = capsys.readouterr().out
    assert "discarding the partial output" in log and "resuming" not in log
    run_featurize(stored, tmp_path / "reference.zarr")
    assert tree(out) == tree(tmp_path / "reference.zarr")


GROUND_TRUTH_SPEC = {"timesteps": 4, "noise_seeds": [0, 1], "batch_size": 3}


def run_ground_truth(stored, out):
    weights, val, gen = stored
    ground_truth.compute_and_save(weights, TINY_SPEC, {"val": val, "gen": gen}, GROUND_TRUTH_SPEC, out)


def test_ground_truth_resumes_from_its_finished_chunks(stored, tmp_path, monkeypatch, capsys, images):
    run_ground_truth(stored, tmp_path / "reference.zarr")
    out = tmp_path / "truth.zarr"
    crash_after(monkeypatch, storage.ResumableOutput, "mark_done", 9)  # all of val (7 rows), 2 of gen
    with pytest.raises(Crash):
        run_ground_truth(stored, out)
    monkeypatch.undo()
    assert not out.exists()

    capsys.readouterr()
    losses = count_calls(monkeypatch, ground_truth, "loss_simple")
    run_ground_truth(stored, out)
    assert "resuming, 9 of 12 chunks already done" in capsys.readouterr().out
    assert losses[0] == 3
    assert tree(out) == tree(tmp_path / "reference.zarr")
    model = build_model(TINY_SPEC, 4)
    timesteps = [0, 250, 500, 750]
    for split, rows in {"val": images[:7], "gen": images[7:]}.items():
        got, attrs = storage.read_member(out, split)
        expected = ground_truth.loss_simple(model, rows, timesteps, [0, 1], 1000)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert attrs["query_sha256"] == storage.array_sha256(rows) and attrs["timesteps"] == timesteps
