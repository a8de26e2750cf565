"""End to end: the whole DAG on the `tiny` experiment, then what a rerun does after a deletion."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from diffattr import figure_plan
from diffattr.plan import Plan
from diffattr.settings import experiment
from diffattr.protocol import lambda_grid

from dry_run import REPO, job_counts

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TARGET = "results/lds_tiny.csv"
EVERYTHING = ("--config", "experiment=tiny")  # rule all: the table and every intermediate output

pytestmark = pytest.mark.workflow


def snakemake(workdir, *args, check=True):
    result = subprocess.run([*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, text=True,
                            capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def flat(values) -> list[str]:
    return [p for value in values for p in ([value] if isinstance(value, str) else value)]


def planned_jobs(workdir, *args) -> dict[str, int]:
    """Rule -> job count of a dry run's 'Job stats' table."""
    return job_counts(snakemake(workdir, "-n", *args).stdout)


@pytest.fixture(scope="module")
def workdir(tiny_run):
    """A copy of the workflow (not of results/) with the tiny experiment built once (conftest.tiny_run):
    the deletion test below restores what it deletes."""
    return tiny_run


@pytest.fixture(scope="module")
def tiny():
    return experiment(yaml.safe_load((REPO / "config.yaml").read_text()), "tiny")


def test_table_has_one_finite_row_per_combination(workdir, tiny):
    table = pd.read_csv(workdir / TARGET, dtype={"checkpoint": str})
    spec = tiny["featurize"]
    splits, rules = ("val", "gen"), tiny["lds"]["lambda_rules"]
    # every method of the score jobs on each feature set (TRAK on simple, D-TRAK on the others), of the
    # final weights and of the kept checkpoints; TracInCP and GAS over the checkpoints and the final
    # weights; and the pixel baselines, which have no function, K, k or checkpoint
    methods = ["Gradient (dot)", "Gradient (cos)", "Relative IF", "Renormalized IF"]
    plan = Plan("tiny", tiny)
    sets = [(s.function, s.n_timesteps, s.proj_dim, "" if s.step is None else str(s.step)) for s in plan.feature_sets]
    expected = {(name, f, K, k, checkpoint, split, rule) for f, K, k, checkpoint in sets
                for name in [("TRAK" if f == "simple" else "D-TRAK"), *methods]
                for split in splits for rule in rules}
    expected |= {(name, s.function, s.n_timesteps, s.proj_dim, "+".join(map(str, steps)) + "+final", split, rule)
                 for s, steps in plan.trajectories.items() for name in ("TracInCP", "GAS")
                 for split in splits for rule in rules}
    assert any(name == "TracInCP" for name, *_ in expected)
    expected |= {(name, "", -1, -1, "", split, rule) for name in ("Raw pixel (dot)", "Raw pixel (cos)")
                 for split in splits for rule in rules}
    # Journey-TRAK: on the simple feature sets of the final weights, for the generated queries only
    # (tiny has no avg features, hence no DAS rows)
    assert "avg" not in spec["functions"]
    expected |= {("Journey-TRAK", s.function, s.n_timesteps, s.proj_dim, "", "gen", rule) for s in plan.final_sets
                 if s.function == "simple" for rule in rules}
    keys = table[["function", "timesteps", "proj_dim", "checkpoint"]].fillna(
        {"function": "", "timesteps": -1, "proj_dim": -1, "checkpoint": ""})
    got = list(zip(table.method, keys.function, keys.timesteps, keys.proj_dim, keys.checkpoint, table.split,
                   table.lambda_rule))
    assert len(got) == len(set(got)) and set(got) == expected
    assert set(table.experiment) == {"tiny"}
    assert table.lds.between(-1, 1).all()
    grid = lambda_grid(tiny["score"]["lambda_exponents"])
    with_lambda = table.method.isin(["TRAK", "D-TRAK", "Relative IF", "Renormalized IF", "Journey-TRAK"])
    assert all(any(math.isclose(value, g) for g in grid) for value in table["lambda"][with_lambda])
    assert table["lambda"][~with_lambda].isna().all()
    m = tiny["subsets"]["m"]
    assert (table.n_subsets[table.lambda_rule == "oracle"] == m).all()
    assert (table.n_subsets[table.lambda_rule == "heldout"] == m - m // 2).all()
    queries = {"val": tiny["dataset"]["n_val"], "gen": tiny["generate"]["n"]}
    assert all(0 < n <= queries[s] for n, s in zip(table.n_queries, table.split))
    report = (workdir / "results/lds_tiny.md").read_text().partition("## All rows")[2].splitlines()
    rows = [line for line in report if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len({key[:5] for key in expected})  # one line per (method, function, K, k, checkpoint)
    bounded = table.dropna(subset=["ci_low", "ci_high"])
    assert len(bounded) >= len(table) // 2
    assert ((bounded.ci_low <= bounded.lds + 1e-9) & (bounded.lds <= bounded.ci_high + 1e-9)).all()


def test_the_lambda_ablation_holds_the_lds_at_every_lambda(workdir, tiny):
    """tiny's one ablation: D-TRAK's LDS at each lambda of the grid on its feature set, per query split,
    as the lds job's per-lambda table has it; the report links the ablation's table."""
    (ablation,) = tiny["ablations"]
    at = ablation["at"]
    table = pd.read_csv(workdir / f"results/tiny/ablations/{ablation['name']}.csv")
    for split in ("val", "gen"):
        curve = pd.read_csv(workdir / f"results/tiny/lds/{at['function']}_K{at['K']}_k{at['k']}_{split}.lambdas.csv")
        curve = curve[curve.method == "D-TRAK"]
        rows = table[table.split == split]
        assert list(rows["lambda"]) == pytest.approx(lambda_grid(tiny["score"]["lambda_exponents"]), rel=1e-5)
        assert list(rows.lds) == pytest.approx(list(curve.lds), rel=1e-5, abs=1e-6)
        assert rows.lds.between(-1, 1).all() and rows.lds.nunique() > 1
    assert f"](tiny/ablations/{ablation['name']}.md)" in (workdir / "results/lds_tiny.md").read_text()


def test_finished_run_has_nothing_to_do(workdir):
    assert planned_jobs(workdir, *EVERYTHING) == {}
    assert planned_jobs(workdir, TARGET) == {}


def test_counterfactual_target_runs_its_planned_jobs_on_the_built_models(workdir, tiny):
    """results/counterfactual_tiny.csv on the experiment's models: only the planned jobs, then one
    finite row per target, remover and removed count."""
    plan, target = Plan("tiny", tiny), "results/counterfactual_tiny.csv"
    assert planned_jobs(workdir, target) == {rule: len(outputs) for rule, outputs in plan.counterfactual_jobs().items()}
    snakemake(workdir, target)
    table = pd.read_csv(workdir / target)
    assert len(table) == len(plan.removals) * tiny["counterfactual"]["targets"]
    assert table[["l2", "clip_cosine", "loss_change"]].notna().all().all() and (table["l2"] > 0).all()
    assert set(table["gen_index"]) == set(plan.counterfactual_targets)
    assert "Paired Wilcoxon" in (workdir / "results/counterfactual_tiny.md").read_text()
    assert planned_jobs(workdir, target) == {}


def test_deleting_one_model_reruns_only_it_and_its_dependents(workdir, tiny):
    before = pd.read_csv(workdir / TARGET)
    weights = workdir / "results/tiny/models/lds/s001-r1/diffusion_pytorch_model.safetensors"
    weights.unlink()
    # every LDS job reads every model's ground truth: one per (feature set or pixel baseline, query split)
    n_lds = len(Plan("tiny", tiny).score_stores()) * 2
    # the figures that read the table, or the loss log of that model
    plan = Plan("tiny", tiny)
    n_figures = sum(any(TARGET in p or "s001-r1" in p for p in flat(figure_plan.inputs(plan, name).values()))
                    for name in figure_plan.figures(plan))
    assert 0 < n_figures < len(figure_plan.figures(plan))  # the samples figure does not rerun
    assert planned_jobs(workdir, *EVERYTHING) == {"train_lds": 1, "ground_truth": 1, "lds": n_lds,
                                                   "ablation": len(tiny["ablations"]), "table": 1,
                                                   "figure": n_figures, "all": 1}
    snakemake(workdir, *EVERYTHING)
    assert weights.exists()
    pd.testing.assert_frame_equal(pd.read_csv(workdir / TARGET), before)  # training is deterministic
