"""TracInCP and GAS over kept training checkpoints: the kept weights are the training trajectory's own
states (also after a resume), checkpoint feature sets are named `_step<S>`, and the predictions are
the per-checkpoint dot products (cosines) summed, checked against explicit loops."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from diffattr import train as training
from diffattr.lds import checkpoint_label
from diffattr.methods import label, methods_reading, read_predictions
from diffattr.models import load_model
from diffattr.protocol import FeatureSet
from diffattr.provenance import ProvenanceError
from diffattr.subsets import make_subsets
from diffattr.storage import file_sha256, write_array
from diffattr.tracin import score_trajectory, trajectory_predictions

from conftest import TINY_SPEC
from test_resume import Crash, crash_after

MODEL_SPEC = {**copy.deepcopy(TINY_SPEC), "unet": {**TINY_SPEC["unet"], "dropout": 0.1}}
TRAIN_SPEC = {"steps": 12, "batch_size": 5, "lr": 1e-3, "betas": [0.95, 0.999], "weight_decay": 1e-6,
              "grad_clip": 1.0, "warmup_fraction": 0.2, "hflip": True, "checkpoint_every": 4,
              "keep_checkpoints": [3, 7, 12], "model": MODEL_SPEC}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Whether each trajectory method sums cosines (GAS) or plain products (TracInCP).
COSINE_OF = {"tracincp": False, "gas": True}


# ---------------------------------------------------------------- kept checkpoints of training

class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records every parameter after each of its steps: the trajectory, seen from outside
    the training loop (steps counted from 1)."""
    states: dict[int, list[torch.Tensor]] = {}

    def step(self, closure=None):
        out = super().step(closure)
        self.count = getattr(self, "count", 0) + 1
        RecordingAdamW.states[self.count] = [p.detach().clone() for group in self.param_groups
                                             for p in group["params"]]
        return out


def tree(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def params(directory):
    return [p.detach() for p in load_model(MODEL_SPEC, directory).unet.parameters()]


@pytest.fixture(scope="module")
def images_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "train.zarr"
    write_array(path, np.random.default_rng(9).uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32),
                {"split": "train"})
    return path


def train_full(images_path, root, spec=TRAIN_SPEC):
    weights = root / "full" / WEIGHTS
    training.train_and_save(images_path, None, None, 0, spec, weights, trajectory_path=root / "full" / "trajectory")
    return weights.parent


def test_kept_checkpoints_are_the_trajectorys_states(images_path, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.states.clear()
    full = train_full(images_path, tmp_path / "kept")
    monkeypatch.undo()
    states = RecordingAdamW.states
    assert sorted(states) == list(range(1, 13))
    # step 12 is the final model itself: only the earlier steps get folders of their own
    assert sorted(os.listdir(full / "trajectory")) == ["step3", "step7"]
    for step in (3, 7):
        kept = full / "trajectory" / f"step{step}"
        assert all(torch.equal(p, q) for p, q in zip(params(kept), states[step], strict=True))
        record = json.loads((kept / training.TRAINING_RECORD).read_text())
        assert (record["step"], record["steps"], record["train_seed"]) == (step, 12, 0)
    assert all(torch.equal(p, q) for p, q in zip(params(full), states[12], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(states[3], states[7]))
    assert not training.kept_path(full / WEIGHTS).exists() and not training.checkpoint_path(full / WEIGHTS).exists()
    # keeping weights does not disturb the training: the final model is that of a run keeping none
    plain = tmp_path / "plain" / "model" / WEIGHTS
    training.train_and_save(images_path, None, None, 0, {**TRAIN_SPEC, "keep_checkpoints": []}, plain)
    assert plain.read_bytes() == (full / WEIGHTS).read_bytes()


def test_a_resumed_training_writes_every_kept_checkpoint(images_path, tmp_path, monkeypatch, capsys):
    reference = tree(train_full(images_path, tmp_path / "reference"))
    root = tmp_path / "resumed"
    crash_after(monkeypatch, training, "_save_checkpoint", 2)  # killed after the step-8 checkpoint: 3 and 7 kept before
    with pytest.raises(Crash):
        train_full(images_path, root)
    monkeypatch.undo()
    kept = training.kept_path(root / "full" / WEIGHTS)
    assert sorted(p.name for p in kept.iterdir()) == ["identity.json", "step3", "step7"]
    assert not (root / "full" / "trajectory").exists()
    capsys.readouterr()
    assert tree(train_full(images_path, root)) == reference
    assert "resuming from step 8 of 12" in capsys.readouterr().out
    assert not kept.exists()


def test_a_checkpoint_past_a_lost_kept_step_is_not_resumed(images_path, tmp_path, monkeypatch, capsys):
    reference = tree(train_full(images_path, tmp_path / "reference"))
    root = tmp_path / "lost"
    crash_after(monkeypatch, training, "_save_checkpoint", 2)
    with pytest.raises(Crash):
        train_full(images_path, root)
    monkeypatch.undo()
    kept = training.kept_path(root / "full" / WEIGHTS)
    for name in os.listdir(kept / "step7"):
        os.remove(kept / "step7" / name)
    os.rmdir(kept / "step7")
    capsys.readouterr()
    assert tree(train_full(images_path, root)) == reference
    out = capsys.readouterr().out
    assert "the kept weights of step(s) [7] are missing" in out and "resuming" not in out


def test_kept_weights_of_another_training_are_discarded(images_path, tmp_path, monkeypatch, capsys):
    reference = tree(train_full(images_path, tmp_path / "reference"))
    root = tmp_path / "other"
    crash_after(monkeypatch, training, "_save_checkpoint", 1)
    with pytest.raises(Crash):
        train_full(images_path, root, {**TRAIN_SPEC, "lr": 2e-3})
    monkeypatch.undo()
    capsys.readouterr()
    assert tree(train_full(images_path, root)) == reference
    out = capsys.readouterr().out
    assert "discarding the kept weights of another training" in out and "resuming" not in out


@pytest.mark.parametrize("value", [[7, 3], [3, 3], [0, 3], [3, 13], [2.0], "3", [True]])
def test_keep_checkpoints_must_be_ascending_steps_of_the_training(value):
    with pytest.raises(ValueError, match=r"train.keep_checkpoints=.*expected distinct integer steps in "
                                         r"ascending order, each in \[1, 12\]"):
        training.kept_steps({**TRAIN_SPEC, "keep_checkpoints": value})


# ---------------------------------------------------------------- TracInCP and GAS

def loop_predictions(trains, queries, masks, cosine):
    """Reference: pred[z, j] = -sum over members i of subset j of sum over checkpoints c of
    <xq_c[z], x_c[i]> (or their cosine), one number at a time."""
    m, n = len(queries[0]), len(trains[0])
    out = np.zeros((1, m, len(masks)))
    for z in range(m):
        for j in range(len(masks)):
            for i in range(n):
                if not masks[j, i]:
                    continue
                for x, xq in zip(trains, queries):
                    a, b = xq[z].astype(np.float64), x[i].astype(np.float64)
                    dot = sum(float(u) * float(v) for u, v in zip(a, b))
                    if cosine:
                        na, nb = np.sqrt(sum(u * u for u in a)), np.sqrt(sum(v * v for v in b))
                        dot = dot / (na * nb) if na > 0 and nb > 0 else 0.0
                    out[0, z, j] -= dot
    return out


@pytest.mark.parametrize("method", ["tracincp", "gas"])
def test_predictions_equal_an_explicit_loop_over_checkpoints(method):
    rng = np.random.default_rng(3)
    trains = [rng.normal(size=(7, 5)) for _ in range(3)]
    queries = [rng.normal(size=(4, 5)) for _ in range(3)]
    trains[1][2] = 0.0  # a zero gradient: cosine 0, not NaN
    masks = rng.random((6, 7)) < 0.5
    got = trajectory_predictions(trains, queries, masks, COSINE_OF[method])
    np.testing.assert_allclose(got, loop_predictions(trains, queries, masks, COSINE_OF[method]), rtol=1e-12,
                               atol=1e-12)


def test_ranking_known_by_construction():
    """One query along e0 at two checkpoints; train row i's scores there are a_i and b_i. Alone, the
    first checkpoint ranks row 0 first; the sum over both ranks row 2 first (a + b = 1, 2, 3); GAS,
    on cosines, ranks by angle to e0 (rows 1 and 2 have a component along e1)."""
    e0, e1 = np.eye(2)
    query = [e0[None], e0[None]]
    first = np.stack([3 * e0, 1 * e0, 0.5 * e0 + 2 * e1])
    second = np.stack([-2 * e0, 1 * e0, 2.5 * e0 + 0.5 * e1])
    singletons = np.eye(3, dtype=bool)  # subset j = {row j}: pred[0, 0, j] = -score(query, row j)
    tracin = -trajectory_predictions([first, second], query, singletons)[0, 0]
    np.testing.assert_allclose(tracin, [1.0, 2.0, 3.0])
    assert list(np.argsort(-(-trajectory_predictions([first], query[:1], singletons)[0, 0]))) == [0, 1, 2]
    gas = -trajectory_predictions([first, second], query, singletons, cosine=True)[0, 0]
    cos_first, cos_second = [1, 1, 0.5 / np.hypot(0.5, 2)], [-1, 1, 2.5 / np.hypot(2.5, 0.5)]
    np.testing.assert_allclose(gas, np.add(cos_first, cos_second))
    assert list(np.argsort(-gas)) == [1, 2, 0]


def test_trajectory_methods_are_table_methods():
    assert methods_reading("trajectory") == tuple(COSINE_OF)
    assert (label("tracincp", "simple"), label("gas", "square")) == ("TracInCP", "GAS")


# ---------------------------------------------------------------- the score job and its provenance

FEATURES = {"function": "simple", "K": 2, "timesteps": [0, 500], "scheme": "uniform", "noise_seed": 0,
            "dtype": "float32", "device": "cpu", "projector": "BasicProjector", "proj_dim": 4, "proj_seed": 42,
            "proj_type": "normal", "grad_dim": 100, "block_size": 128, "gpu": None, "sm_count": None}


@pytest.fixture
def subsets_csv(tmp_path):
    path = tmp_path / "subsets.csv"
    make_subsets(np.arange(10) % 2, 4, 0.5, 42).to_csv(path, index=False)
    return path


def checkpoint_stores(tmp_path, steps=(3, 7, None), change=None):
    """Train and val feature stores of each checkpoint, as featurize writes them; `change` edits the
    attributes of one store: {(step, split): {key: value}}."""
    rng = np.random.default_rng(5)
    paths = {"train": [], "val": []}
    for step in steps:
        for split, rows in (("train", 10), ("val", 3)):
            path = tmp_path / "features" / FeatureSet("simple", 2, 4, step=step).name / f"{split}.zarr"
            attrs = {**FEATURES, "model_sha256": f"{step}" * 64, "checkpoint": step,
                     "query_sha256": ("t" if split == "train" else "v") * 64,
                     **(change or {}).get((step, split), {})}
            write_array(path, rng.normal(size=(rows, attrs["proj_dim"])).astype(np.float32), attrs)
            paths[split].append(path)
    return paths["train"], paths["val"]


def test_score_job_writes_the_sums_with_their_checkpoints(subsets_csv, tmp_path):
    trains, queries = checkpoint_stores(tmp_path)
    out = tmp_path / "scores" / "simple_K2_k4_tracin" / "val.zarr"
    score_trajectory(trains, queries, subsets_csv, ["tracincp", "gas"], out)
    predictions, attrs = read_predictions(out)
    from diffattr.score import read_features, read_masks
    x = [read_features(path)[0] for path in trains]
    xq = [read_features(path)[0] for path in queries]
    masks = read_masks(subsets_csv, 10, trains[0])
    for method in ("tracincp", "gas"):
        preds, lambdas = predictions[method]
        np.testing.assert_allclose(preds, loop_predictions(x, xq, masks, COSINE_OF[method]), rtol=1e-9)
        assert np.isnan(lambdas).all() and len(lambdas) == 1
    assert attrs["checkpoints"] == [3, 7, None] and checkpoint_label(attrs) == "3+7+final"
    assert (attrs["function"], attrs["K"], attrs["proj_dim"]) == ("simple", 2, 4)
    assert attrs["query_sha256"] == "v" * 64 and attrs["subsets_sha256"] == file_sha256(subsets_csv)
    assert checkpoint_label({"checkpoint": 7}) == "7" and checkpoint_label({"checkpoint": None}) == ""
    assert checkpoint_label({}) == ""  # a pixel baseline


@pytest.mark.parametrize("change, message", [
    ({(7, "train"): {"function": "square"}, (7, "val"): {"function": "square"}}, "function: 'simple' vs 'square'"),
    ({(7, "train"): {"K": 3}, (7, "val"): {"K": 3}}, "K: 2 vs 3"),
    ({(None, "train"): {"proj_seed": 0}, (None, "val"): {"proj_seed": 0}}, "proj_seed: 42 vs 0"),
    ({(None, "val"): {"query_sha256": "w" * 64}}, "query_sha256"),  # another query set
    ({(3, "train"): {"query_sha256": "u" * 64}}, "query_sha256"),  # other train images
    ({(7, "val"): {"model_sha256": "3" * 64, "checkpoint": 3}}, "model_sha256"),  # val of another checkpoint
    ({(7, "train"): {"model_sha256": "3" * 64, "checkpoint": 3}, (7, "val"): {"model_sha256": "3" * 64,
                                                                              "checkpoint": 3}},
     "are features of the same weights"),
])
def test_features_that_do_not_belong_together_are_refused(change, message, subsets_csv, tmp_path):
    trains, queries = checkpoint_stores(tmp_path, change=change)
    out = tmp_path / "scores" / "val.zarr"
    with pytest.raises(ProvenanceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        score_trajectory(trains, queries, subsets_csv, ["tracincp"], out)
    assert not out.exists()


def test_unknown_trajectory_method_is_named(subsets_csv, tmp_path):
    trains, queries = checkpoint_stores(tmp_path)
    with pytest.raises(ValueError, match=r"\['tracin'\]: expected a non-empty list of tracincp, gas"):
        score_trajectory(trains, queries, subsets_csv, ["tracin"], tmp_path / "out.zarr")
