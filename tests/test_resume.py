"""Resuming after a kill: training from its last checkpoint, featurization and ground truth from their
finished chunks, each ending bitwise equal (on CPU) to an uninterrupted run.

The unit tests interrupt a job by raising from inside it; the kill tests (marker `resume`, part of
the default run) kill -9 a Snakemake run of the `tiny` experiment at a random point and rerun it.
"""
import contextlib
import copy
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from diffattr import featurize, ground_truth, storage
from diffattr import train as training
from diffattr.models import build_model
from diffattr.storage import write_array

from conftest import TINY_SPEC
from dry_run import copy_workflow, job_counts

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
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(9).uniform(-1, 1, size=(12, *SHAPE)).astype(np.float32)


# ---------------------------------------------------------------- training

def params(model):
    return [p.detach().clone() for p in model.unet.parameters()]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: mixed precision (autocast) on the CPU
def test_training_resumed_from_a_checkpoint_is_bitwise_an_uninterrupted_one(images, tmp_path, monkeypatch,
                                                                           capsys, dtype):
    data, spec = torch.from_numpy(images), {**TRAIN_SPEC, "dtype": dtype}
    reference = build_model(MODEL_SPEC, 0)
    reference_log = training.train(reference, data, None, spec, 0)

    checkpoint = tmp_path / ".model.ckpt"
    crash_after(monkeypatch, training, "_save_checkpoint", 2)  # killed just after the step-8 checkpoint
    with pytest.raises(Crash):
        training.train(build_model(MODEL_SPEC, 0), data, None, spec, 0, checkpoint=checkpoint)
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=False)["step"] == 8

    torch.manual_seed(999)  # whatever the global RNG holds, the checkpoint's state is restored
    resumed = build_model(MODEL_SPEC, 0)
    capsys.readouterr()
    log = training.train(resumed, data, None, spec, 0, checkpoint=checkpoint)
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
    losses = count_calls(monkeypatch, ground_truth, "query_losses")
    run_ground_truth(stored, out)
    assert "resuming, 9 of 12 chunks already done" in capsys.readouterr().out
    assert losses[0] == 3
    assert tree(out) == tree(tmp_path / "reference.zarr")
    model = build_model(TINY_SPEC, 4)
    timesteps = [0, 250, 500, 750]
    for split, rows in {"val": images[:7], "gen": images[7:]}.items():
        got, attrs = storage.read_member(out, split)
        expected = ground_truth.query_losses(model, rows, timesteps, [0, 1], 1000)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert attrs["query_sha256"] == storage.array_sha256(rows) and attrs["timesteps"] == timesteps


def test_atomic_output_removes_what_a_killed_writer_left(tmp_path, images):
    leftover = tmp_path / ".val.zarr.tmp-4000000"  # a writer killed with kill -9 leaves this
    (leftover / "c").mkdir(parents=True)
    other = tmp_path / ".val.zarr2.tmp-4000000"  # another output's: kept
    other.mkdir()
    write_array(tmp_path / "val.zarr", images, {})
    assert not leftover.exists() and other.exists()
    np.testing.assert_array_equal(storage.read_array(tmp_path / "val.zarr")[0], images)


# ---------------------------------------------------------------- kill tests: kill -9 a Snakemake run

KILLTEST = {  # the tiny experiment with jobs long enough to be killed mid-way
    "base": "tiny",
    "train": {"lds_steps": 250, "checkpoint_every": 10},
    "featurize": {"functions": ["simple"], "timesteps": [100], "batch_size": 2},
    "ground_truth": {"timesteps": 1000, "noise_seeds": [0, 1], "batch_size": 500},
}
E = "results/killtest"
TRAINED = f"{E}/models/lds/s001-r1"
FEATURES = f"{E}/features/simple_K100_k64/train.zarr"
TRUTH = f"{E}/ground_truth/s000-r0.zarr"  # its model, s000-r0, is not the one the training test kills


def snakemake(workdir, *args):
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir,
                            text=True, capture_output=True)
    assert result.returncode == 0, f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def output_tree(path):
    """An output's files: a folder's (less Snakemake's timestamp file), or a model folder's."""
    return {name: data for name, data in tree(path).items() if name != ".snakemake_timestamp"}


@pytest.fixture(scope="module")
def killtest(tmp_path_factory):
    """A copy of the workflow with the `killtest` preset, its three outputs built uninterrupted on
    the CPU (where resuming is bitwise)."""
    root = copy_workflow(tmp_path_factory.mktemp("killtest"))
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["experiments"]["killtest"] = KILLTEST
    config["device"] = "cpu"
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(root, f"{TRAINED}/diffusion_pytorch_model.safetensors", FEATURES, TRUTH)
    return root, {path: output_tree(root / path) for path in (TRAINED, FEATURES, TRUTH)}


def kill_at_random_point(workdir, target, progress, most):
    """Run Snakemake on `target`, wait until `progress()` (checkpoints or chunks written so far)
    reaches a random count in [1, most], wait a random fraction of a second more, then kill -9 the
    whole process group: Snakemake, its forkserver and the job's worker. Returns the count."""
    rng = random.Random()
    count, delay = rng.randint(1, most), rng.uniform(0, 0.2)
    print(f"killing {target} after {count} checkpoints/chunks and {delay:.3f} s")
    log = open(workdir / "killed.out", "w")
    process = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", target], cwd=workdir,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while progress() < count:
            assert process.poll() is None, \
                f"{target} ended before it was killed:\n{(workdir / 'killed.out').read_text()}"
            assert time.monotonic() < deadline, f"no progress on {target}"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    return count


def resume_and_compare(workdir, reference, output, target, job_log, pattern, at_least):
    """After the kill: unlock, rerun, check that the log says it resumed from N >= `at_least` (what
    was on disk at the kill), and that the output is bitwise the uninterrupted run's."""
    snakemake(workdir, "--unlock")
    snakemake(workdir, target)
    text = (workdir / job_log).read_text()
    said = re.findall(pattern, text)
    assert said and int(said[-1]) >= at_least > 0, f"{job_log} does not say it resumed:\n{text}"
    assert output_tree(workdir / output) == reference[output]
    return int(said[-1])


@pytest.mark.resume
def test_killed_training_resumes_to_the_same_weights(killtest):
    workdir, reference = killtest
    shutil.rmtree(workdir / TRAINED)
    checkpoint = workdir / f"{E}/models/lds/.s001-r1.ckpt"
    seen = set()

    def checkpoints():
        with contextlib.suppress(FileNotFoundError):
            stat = checkpoint.stat()
            seen.add((stat.st_ino, stat.st_mtime_ns))
        return len(seen)

    weights = f"{TRAINED}/diffusion_pytorch_model.safetensors"
    saved = kill_at_random_point(workdir, weights, checkpoints, 5)
    assert not (workdir / weights).exists()
    assert checkpoint.exists()
    step = resume_and_compare(workdir, reference, TRAINED, weights, "logs/killtest/train/s001-r1.log",
                              r"resuming from step (\d+) of 250", 10 * saved)
    assert step % 10 == 0
    assert not checkpoint.exists()
    # how often checkpoints are saved is not a setting the model depends on: changing it retrains nothing
    config = workdir / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["experiments"]["killtest"]["train"]["checkpoint_every"] = 7
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert job_counts(snakemake(workdir, "-n", weights).stdout) == {}


def chunks_done(partial):
    def count():
        with contextlib.suppress(FileNotFoundError):
            return len(os.listdir(partial / "_resume" / "done"))
        return 0

    return count


@pytest.mark.resume
@pytest.mark.parametrize("output, most, job_log, pattern", [
    (FEATURES, 10, "logs/killtest/featurize/simple_K100_k64_train.log", r"resuming, (\d+) of 30 chunks already done"),
    (TRUTH, 8, "logs/killtest/ground_truth/s000-r0.log", r"resuming, (\d+) of 20 chunks already done"),
], ids=["featurization", "ground_truth"])
def test_killed_chunked_job_resumes_to_the_same_store(killtest, output, most, job_log, pattern):
    workdir, reference = killtest
    shutil.rmtree(workdir / output)
    store = workdir / output
    partial = store.with_name(f".{store.name}.partial")
    written = kill_at_random_point(workdir, output, chunks_done(partial), most)
    assert not store.exists() and partial.is_dir()
    resume_and_compare(workdir, reference, output, output, job_log, pattern, written)
    assert not partial.exists()
