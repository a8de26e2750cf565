"""The counterfactual evaluation: target choice, removal sets, score rows, retraining without the
removed images (bitwise the full model when none are removed, resumable), regeneration and metrics,
and the statistics, each against a slow reference."""
import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from diffattr import counterfactual as cf
from diffattr import counterfactual_eval as cfe
from diffattr import train as training
from diffattr.plan import Plan
from diffattr.protocol import FeatureSet
from diffattr.settings import ConfigError, validate_config
from diffattr.storage import read_array, write_array

from conftest import TINY_SPEC

TRAIN_SPEC = {"steps": 12, "batch_size": 4, "lr": 1e-3, "betas": [0.95, 0.999], "weight_decay": 1e-6,
              "grad_clip": 1.0, "warmup_fraction": 0.2, "hflip": False, "checkpoint_every": 4}
GEN_SPEC = {"steps": 10, "eta": 0.0, "seed": 0}
LOSS_SPEC = {"timesteps": 5, "noise_seeds": [0], "batch_size": 64}
CLIP_SPEC = {"pretrained": None, "seed": 0, "architecture": {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "image_size": 32, "patch_size": 8, "projection_dim": 16}}


# ---------------------------------------------------------------- targets and removal sets

def test_targets_are_the_references():
    """sail-sg/D-TRAK CIFAR2/methods/04_if/get_indices_gen.ipynb prints (index, generated image) for
    its targets 34 to 59; target 0 is the first of the test part of train_test_split."""
    printed = [370, 198, 687, 584, 901, 59, 328, 96, 312, 974, 299, 277, 924, 601, 439, 837, 570, 879, 261,
               578, 23, 30, 617, 10, 221, 820]
    targets = cf.target_indices(1000, 60, 42)
    assert len(targets) == 60 and len(set(targets)) == 60
    assert targets[34:] == printed
    assert cf.target_indices(1000, 60, 43) != targets


def reference_top_k(scores, k):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def test_top_k_is_the_highest_scores_with_ties_by_position():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    for k in (0, 1, 7, 40):
        assert cf.top_k(scores, k).tolist() == reference_top_k(scores, k)
    with pytest.raises(ValueError):
        cf.top_k(scores, 41)


def test_removal_sets_are_each_targets_top_k_and_random_is_reproducible():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 20))
    kept, removed = cf.removal_tables(scores, 5, [11, 4, 9])
    for j in range(3):
        gone = removed[removed["target"] == j].sort_values("rank")
        assert gone["train_position"].tolist() == reference_top_k(scores[j], 5)
        assert gone["gen_index"].unique().tolist() == [[11, 4, 9][j]]
        stay = kept.loc[kept["subset"] == j, "train_position"].tolist()
        assert sorted(stay + gone["train_position"].tolist()) == list(range(20))
    first = cf.random_scores(20, 3, 1)
    assert np.array_equal(first, cf.random_scores(20, 3, 1))
    assert not np.array_equal(first, cf.random_scores(20, 4, 1))
    assert not np.array_equal(first, cf.random_scores(20, 3, 2))


def feature_store(path, rows, function):
    write_array(path, rows, {"model_sha256": "m", "function": function, "K": 4, "timesteps": [0, 250, 500, 750],
                             "projector": "basic", "proj_dim": rows.shape[1], "proj_seed": 0,
                             "query_sha256": str(path)})


def test_score_rows_are_the_methods_scores_at_the_lds_lambda(tmp_path):
    """TRAK's rows against the dense S = Xq (X^T X + lambda I)^-1 X^T at the lambda the LDS chose."""
    rng = np.random.default_rng(2)
    train, query = rng.normal(size=(30, 6)), rng.normal(size=(10, 6))
    feature_store(tmp_path / "train.zarr", train, "square")
    feature_store(tmp_path / "gen.zarr", query, "square")
    pd.DataFrame([{"method": "D-TRAK", "lambda_rule": "oracle", "split": "gen", "lambda": 5.0},
                  {"method": "D-TRAK", "lambda_rule": "heldout", "split": "gen", "lambda": 0.01}]).to_csv(
        tmp_path / "lds.csv", index=False)
    targets = [7, 2, 5]
    for rule, lam in (("oracle", 5.0), ("heldout", 0.01)):
        remover = cf.Remover("trak", FeatureSet("square", 4, 6), rule)
        rows = cfe.score_rows(remover, targets, 30, 0, tmp_path / "train.zarr", tmp_path / "gen.zarr", {},
                              tmp_path / "lds.csv", [-2, 1])
        dense = query[targets] @ np.linalg.inv(train.T @ train + lam * np.eye(6)) @ train.T
        np.testing.assert_allclose(rows, dense, rtol=1e-8, atol=1e-10)
    random_rows = cfe.score_rows(cf.Remover(cf.RANDOM), targets, 30, 5)
    assert np.array_equal(random_rows[1], cf.random_scores(30, 5, 1))


# ---------------------------------------------------------------- retraining, regeneration, metrics

def train_on(images_path, scores, removed, tmp_path, name):
    """Train the tiny model on the images left after removing each score row's top `removed`."""
    kept, _ = cf.removal_tables(scores, removed, list(range(len(scores))))
    kept.to_csv(tmp_path / f"{name}.csv", index=False)
    weights = tmp_path / name / "diffusion_pytorch_model.safetensors"
    training.train_and_save(images_path, tmp_path / f"{name}.csv", 0, 0, {**TRAIN_SPEC, "model": TINY_SPEC}, weights)
    return weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cf")
    rng = np.random.default_rng(3)
    write_array(root / "train.zarr", rng.uniform(-1, 1, size=(10, 1, 8, 8)).astype(np.float32), {"split": "train"})
    write_array(root / "gen.zarr", rng.uniform(-1, 1, size=(4, 1, 8, 8)).astype(np.float32), {"split": "gen"})
    return root


def test_removing_nothing_gives_the_full_model_and_the_same_image(data, tmp_path):
    full = tmp_path / "full" / "diffusion_pytorch_model.safetensors"
    training.train_and_save(data / "train.zarr", None, None, 0, {**TRAIN_SPEC, "model": TINY_SPEC}, full)
    none = train_on(data / "train.zarr", np.zeros((1, 10)), 0, tmp_path, "none")
    some = train_on(data / "train.zarr", np.arange(10.0)[None], 3, tmp_path, "some")
    assert full.read_bytes() == none.read_bytes() != some.read_bytes()
    args = (TINY_SPEC, data / "gen.zarr")
    cfe.regenerate(full, *args, [3, 1], GEN_SPEC, LOSS_SPEC, tmp_path / "full.zarr", {"remover": "full"})
    attrs = {"method": "Random", "remover": "random", "features": None, "lambda_rule": None}
    cfe.regenerate(none, *args, [1], GEN_SPEC, LOSS_SPEC, tmp_path / "none.zarr", {**attrs, "removed": 0})
    cfe.regenerate(some, *args, [1], GEN_SPEC, LOSS_SPEC, tmp_path / "some.zarr", {**attrs, "removed": 3})
    assert np.array_equal(read_array(tmp_path / "none.zarr")[0][0], read_array(tmp_path / "full.zarr")[0][1])
    out = {key: tmp_path / f"out.{key}" for key in ("table", "medians", "tests", "summary", "images")}
    cfe.evaluate(tmp_path / "full.zarr", [tmp_path / "none.zarr", tmp_path / "some.zarr"], TINY_SPEC, full,
                 CLIP_SPEC, {"confidence": 0.9, "bootstrap_resamples": 50, "bootstrap_seed": 0}, "test", out)
    table = pd.read_csv(out["table"]).set_index("removed")
    assert table.loc[0, "l2"] == 0 and table.loc[0, "clip_cosine"] == pytest.approx(1, abs=1e-6)
    assert table.loc[0, "loss_change"] == 0 and table.loc[0, "target"] == 1
    regenerated, original = read_array(tmp_path / "some.zarr")[0][0], read_array(tmp_path / "full.zarr")[0][1]
    assert table.loc[3, "l2"] > 0
    assert table.loc[3, "l2"] == pytest.approx(np.linalg.norm((regenerated - original) / 2), rel=1e-5)
    assert table.loc[3, "loss_change"] != 0 and table.loc[3, "clip_weights"] == "random-init"
    assert "random-init" in out["summary"].read_text()


def test_removing_the_image_a_target_copies_moves_it_more_than_removing_a_random_one(tmp_path):
    """Four distinct training images, trained on until generated images copy some of them; the target is
    the generated image closest to a training image. Without that image the model cannot draw it
    again; without a random other one it still can."""
    patterns = np.stack([np.full((1, 8, 8), 0.8), np.full((1, 8, 8), -0.8),
                         np.indices((1, 8, 8))[2] % 2 * 1.6 - 0.8, np.indices((1, 8, 8))[1] % 2 * 1.6 - 0.8])
    write_array(tmp_path / "train.zarr", patterns.astype(np.float32), {"split": "train"})
    spec = {**TRAIN_SPEC, "steps": 800, "lr": 2e-2, "warmup_fraction": 0.1, "checkpoint_every": 0, "model": TINY_SPEC}
    full = tmp_path / "full" / "diffusion_pytorch_model.safetensors"
    training.train_and_save(tmp_path / "train.zarr", None, None, 0, spec, full)
    write_array(tmp_path / "gen.zarr", np.zeros((16, 1, 8, 8), np.float32), {"split": "gen"})
    gen = {"steps": 20, "eta": 0.0, "seed": 0}
    cfe.regenerate(full, TINY_SPEC, tmp_path / "gen.zarr", range(16), gen, LOSS_SPEC, tmp_path / "all.zarr", {})
    images = read_array(tmp_path / "all.zarr")[0]
    distance = np.linalg.norm((images[:, None] - patterns[None]).reshape(16, 4, -1), axis=2)
    target, copied = np.unravel_index(np.argmin(distance), distance.shape)
    assert distance[target, copied] < 0.2 * np.linalg.norm(patterns[0] - patterns[1])  # a copy
    moved = {}
    others = np.arange(4) != copied
    for name, scores in (("copied", np.eye(4)[copied]), ("random", cf.random_scores(4, 0, 0) * others)):
        kept, gone = cf.removal_tables(scores[None], 1, [target])
        assert (gone["train_position"].item() == copied) == (name == "copied")
        kept.to_csv(tmp_path / f"{name}.csv", index=False)
        weights = tmp_path / name / "diffusion_pytorch_model.safetensors"
        training.train_and_save(tmp_path / "train.zarr", tmp_path / f"{name}.csv", 0, 0, spec, weights)
        cfe.regenerate(weights, TINY_SPEC, tmp_path / "gen.zarr", [target], gen, LOSS_SPEC, tmp_path / f"{name}.zarr", {})
        moved[name] = np.linalg.norm(read_array(tmp_path / f"{name}.zarr")[0][0] - images[target])
    assert moved["copied"] > 2 * moved["random"], moved


def test_a_killed_counterfactual_retraining_resumes_to_the_same_weights(data, tmp_path, monkeypatch, capsys):
    scores = np.arange(10.0)[None]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = train_on(data / "train.zarr", scores, 2, tmp_path / "a", "model")
    real = training._save_checkpoint

    def killed(*args):  # killed right after the step-4 checkpoint is written
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_on(data / "train.zarr", scores, 2, tmp_path / "b", "model")
    monkeypatch.undo()
    resumed = train_on(data / "train.zarr", scores, 2, tmp_path / "b", "model")
    assert "resuming from step 4 of 12" in capsys.readouterr().out
    assert resumed.read_bytes() == reference.read_bytes()


# ---------------------------------------------------------------- statistics

def exact_wilcoxon_p(diff):
    """Two-sided p of the signed-rank statistic by enumerating every sign pattern (no ties, no zeros)."""
    ranks = pd.Series(np.abs(diff)).rank().to_numpy()
    observed = min(ranks[diff > 0].sum(), ranks[diff < 0].sum())
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(diff))]
    total = ranks.sum()
    return np.mean([min(s, total - s) <= observed for s in sums])


def test_summary_medians_and_paired_tests():
    rng = np.random.default_rng(4)
    rows = []
    for remover, method, shift in (("random", "Random", 0.0), ("trak_a", "TRAK", 0.5), ("trak_b", "D-TRAK", 1.0)):
        values = rng.normal(size=(8, 3)) + shift
        rows += [{"target": j, "remover": remover, "method": method, "removed": 5, "l2": v[0], "clip_cosine": v[1],
                  "loss_change": v[2]} for j, v in enumerate(values)]
    table = pd.DataFrame(rows)
    medians, tests = cf.summarize(table, 0.9, 200, 0)
    for r in medians.itertuples():
        values = table.loc[table["remover"] == r.remover, r.metric]
        assert r.median == np.median(values) and r.ci_low <= r.median <= r.ci_high and r.n_targets == 8
    assert {(r.remover, r.against_remover) for r in tests.itertuples()} == {
        ("trak_a", "random"), ("trak_b", "random"), ("trak_b", "trak_a")}
    for r in tests.itertuples():
        a = table[table["remover"] == r.remover].set_index("target")[r.metric]
        b = table[table["remover"] == r.against_remover].set_index("target")[r.metric]
        assert r.p_value == pytest.approx(exact_wilcoxon_p((a - b).to_numpy()), rel=1e-9)
        assert r.median_difference == pytest.approx(np.median(a - b))


# ---------------------------------------------------------------- settings and plan

def config(counterfactual):
    raw = yaml.safe_load(open("config.yaml"))
    raw["experiments"]["tiny"]["counterfactual"] = {"targets": 2, "removed": [10], **counterfactual}
    return raw


@pytest.mark.parametrize("section, fault", [
    ({"targets": 8, "methods": [{"method": "random"}]}, r"counterfactual\.targets: got 8; expected fewer than the 8"),
    ({"removed": [61], "methods": [{"method": "random"}]}, r"counterfactual\.removed\[0\]: got 61"),
    ({"methods": [{"method": "tark", "features": "square_K4_k64"}]}, r'counterfactual\.methods\[0\]\.method: got "tark"'),
    ({"methods": [{"method": "trak"}]}, r"counterfactual\.methods\[0\]\.features: got no value"),
    ({"methods": [{"method": "trak", "features": "square-K4"}]}, r'counterfactual\.methods\[0\]\.features: got "square-K4"'),
    ({"methods": [{"method": "journey_trak", "features": "square_K4_k64"}]}, r"counterfactual\.methods\[0\]\.features: .*generated"),
    ({"methods": [{"method": "random", "features": "square_K4_k64"}]}, r"counterfactual\.methods\[0\]\.features: .*none for random"),
])
def test_counterfactual_settings_are_checked_with_one_line_naming_the_key(section, fault):
    with pytest.raises(ConfigError, match=rf"experiments\.tiny\.{fault}"):
        validate_config(config(section), libraries=False)


def test_the_plan_refuses_a_feature_set_the_experiment_lacks_and_lists_every_job():
    section = {"targets": 2, "removed": [3, 5], "methods": [{"method": "random"},
                                                           {"method": "trak", "features": "simple_K4_k64"}]}
    settings = validate_config(config(section), libraries=False)["tiny"]
    jobs = Plan("tiny", settings).counterfactual_jobs()
    assert len(jobs["counterfactual_removal"]) == 4 and len(jobs["train_counterfactual"]) == 8
    assert "results/tiny/models/counterfactual/trak_simple_K4_k64_oracle_n5/t1/diffusion_pytorch_model.safetensors" \
        in jobs["train_counterfactual"]
    inputs = Plan("tiny", settings).removal_inputs("trak_simple_K4_k64_oracle_n3")
    assert set(inputs) == {"train_index", "train", "query", "lds"}  # not journey_trak's trajectory features
    assert inputs["lds"] == "results/tiny/lds/simple_K4_k64_gen.csv"
    bad = copy.deepcopy(settings)
    bad["counterfactual"]["methods"][1]["features"] = "simple_K4_k128"
    with pytest.raises(ConfigError, match=r"counterfactual\.methods\[1\]\.features: got 'simple_K4_k128'"):
        Plan("tiny", bad).counterfactual_jobs()
