"""The benchmark harnesses at tiny size: ours and the reference must give the same outputs (speed is
not checked here; benchmarks/README.md records it)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_featurize  # noqa: E402
import bench_project  # noqa: E402
import bench_score  # noqa: E402
import run  # noqa: E402
import stage_throughput  # noqa: E402
from presets import preset_settings  # noqa: E402


@pytest.mark.parametrize("bench", [bench_featurize, bench_project, bench_score])
def test_harness_outputs_agree_with_reference(bench):
    rows = bench.run(full=False)
    assert rows
    for r in rows:
        assert r["ok"], f"{r['engine']} {r['case']}: max rel. diff {r['max_rel_diff']:.2e} > {r['tol']:.0e}"
        assert r["ours_s"] > 0 and r["ref_s"] > 0


def test_harness_diff_is_sensitive():
    """A harness's comparison would catch a wrong output: perturb one value of a reference."""
    x, xq, masks, truth = bench_score.problem(30, 20, 5, 6)
    lambdas = [0.1, 1.0]
    preds, _ = bench_score.ours(x, xq, masks, truth, lambdas)
    ref, _ = bench_score.reference(x, xq, masks, truth, lambdas)
    assert bench_score.max_rel_diff(preds, ref) <= bench_score.TOL_PRED
    ref[1, 2, 3] *= 1.001
    assert bench_score.max_rel_diff(preds, ref) > bench_score.TOL_PRED


def test_run_prints_the_table_and_fails_on_a_difference(capsys, monkeypatch):
    assert run.main(["score"]) == 0
    out = capsys.readouterr().out
    assert "| engine | case | ours (s)" in out and "score: LDS per lambda" in out
    monkeypatch.setattr(bench_score, "TOL_LDS", -1.0)  # no difference can pass a negative tolerance
    assert run.main(["score"]) == 1


def test_stacked_training_comparison_runs_the_same_gradients():
    """stage_throughput's comparison checks (without dropout) that the stacked models' gradients are
    the models' own, then times both ways; here at the tiny preset's size."""
    import numpy as np
    import torch

    images = np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    line = stage_throughput.stacked_against_sequential(preset_settings("tiny"), images, torch.device("cpu"),
                                                       repeats=1)
    assert line.startswith("batch 16 each, fp32: one after another ") and " s per step (" in line


def test_training_option_rates_are_named_by_their_options():
    """stage_throughput's training speed options at the tiny preset's size, without the compiled variants
    (minutes of compilation on a CPU): the plain rate and channels_last's, named as printed."""
    import math

    import torch

    rates = stage_throughput.option_throughputs(preset_settings("tiny"), torch.device("cpu"), steps=2,
                                                variants=["", "_cl"])
    assert list(rates) == ["train_step_fp32", "train_step_fp32_cl"]
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
