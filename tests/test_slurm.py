"""The workflow through a real SLURM controller: the `slurm/` profile on a single-node cluster.

tests/slurm_cluster.sh installs and starts SLURM on this machine (root, Debian packages), with
accounting, so sacct reports what each job asked for. A trimmed tiny experiment then runs through
`--profile slurm --profile slurm/local` with one LDS model made to fail (DIFFATTR_FAIL_MODEL), and
again without it; a local run of the same config, beside it, gives the reference table.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffattr import figure_plan
from diffattr.plan import Plan
from diffattr.settings import deep_merge, experiment

from dry_run import job_counts

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
PROFILES = ("--profile", "slurm", "--profile", "slurm/local")
# The tiny experiment, trimmed to 6 LDS models (6 subsets, one training seed), one model-output
# function, no checkpoint features (so no TracInCP) and no ablations: every SLURM job costs ~15 s of CPU here (two
# Snakemake start-ups and the worker's torch import), and the whole test must stay within a few
# minutes on 2 cores.
TRIM = {"subsets": {"m": 6, "train_seeds": [0]}, "featurize": {"functions": ["square"], "extra_grids": []}, "ablations": []}
EVERYTHING = ("--config", "experiment=tiny", f"experiments={json.dumps({'tiny': TRIM})}")
TARGET = "results/lds_tiny.csv"
FAIL_MODEL = "s001-r0"
GPU_RULES = {"train_full", "train_lds", "generate", "ground_truth", "featurize"}
CPU_RULES = {"dataset", "subsets", "score", "baseline", "lds", "table", "figure"}
# What tests/slurm_cluster.sh creates, handed to the profile the way a user would.
SLURM_ENV = {"DIFFATTR_SLURM_ACCOUNT": "diffattr", "DIFFATTR_SLURM_PARTITION": "gpu"}

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]


def environment(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIFFATTR_", "SNAKEMAKE_PROFILE", "SLURM_", "SBATCH_"))}
    return {**env, **SLURM_ENV, "PYTHONUNBUFFERED": "1", **extra}


def snakemake(workdir, *args, env=None, check=True):
    result = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, text=True, capture_output=True,
                            env=env or environment())
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir, *args) -> dict[str, int]:
    """Rule -> job count of a dry run's 'Job stats' table."""
    return job_counts(snakemake(workdir, "-n", *args).stdout)


def submissions(log: str) -> list[tuple[str, str, str]]:
    """(SLURM job id, 'rule' or 'group', rule or group name) of each job the plugin submitted."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/(rule|group)_([a-z_]+?)/",
                       log)
    assert found, "no job was submitted through sbatch"
    return found


def sacct(job_ids) -> dict[str, dict]:
    """SLURM job id -> its accounting record (the allocation, not its steps); `tres` as a dict."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--units=M", "-j", ",".join(job_ids),
                          "-o", "JobID,JobName,State,Partition,Account,ReqTRES,Comment"],
                         text=True, capture_output=True, check=True).stdout
    keys = ("id", "name", "state", "partition", "account", "tres", "comment")
    records = [dict(zip(keys, line.split("|"))) for line in out.splitlines()]
    for record in records:
        record["tres"] = dict(item.split("=", 1) for item in record["tres"].split(","))
    return {record["id"]: record for record in records}


def copy_workflow(root: Path) -> Path:
    for name in ("Snakefile", "config.yaml", "rules", "workflow", "profiles", "slurm"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)
    return root


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root: tests/slurm_cluster.sh installs and starts SLURM daemons")
    was_up = subprocess.run(["bash", CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run(["bash", CLUSTER, "start"], text=True, capture_output=True)
    if start.returncode == 3:
        pytest.skip(f"SLURM cannot be installed here (apt-get): {start.stderr.strip()[-800:]}")
    assert start.returncode == 0, f"tests/slurm_cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", CLUSTER, "stop"], capture_output=True)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The SLURM runs, each step's output kept for the tests below.

    1. SLURM, with DIFFATTR_FAIL_MODEL: everything but that model's training and what needs it.
    2. a dry run without it: what is left to do.
    3. SLURM again without it: finishes the table.
    Beside them, a local run of the same config (it fills the two cores while SLURM polls).
    """
    local = copy_workflow(tmp_path_factory.mktemp("local"))
    slurm = copy_workflow(tmp_path_factory.mktemp("slurm"))
    with open(local / "snakemake.log", "w") as log:
        reference = subprocess.Popen([*SNAKEMAKE, "--cores", "2", *EVERYTHING], cwd=local, text=True,
                                     stdout=log, stderr=subprocess.STDOUT, env=environment())
    try:
        failed = snakemake(slurm, *PROFILES, *EVERYTHING, env=environment(DIFFATTR_FAIL_MODEL=FAIL_MODEL),
                           check=False)
        left = planned_jobs(slurm, *PROFILES, *EVERYTHING)
        rerun = snakemake(slurm, *PROFILES, *EVERYTHING)
    finally:
        reference.wait()
    assert reference.returncode == 0, (local / "snakemake.log").read_text()
    return {"local": local, "slurm": slurm, "failed": failed, "left": left, "rerun": rerun}


@pytest.fixture(scope="module")
def profile():
    """The real profile's settings, with the test variant's on top (top-level keys replace)."""
    return {**yaml.safe_load((REPO / "slurm/config.yaml").read_text()),
            **yaml.safe_load((REPO / "slurm/local/config.yaml").read_text())}


@pytest.fixture(scope="module")
def tiny():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    return experiment(deep_merge(config, {"experiments": {"tiny": TRIM}}), "tiny")


def test_every_job_went_through_sbatch(runs):
    for run in ("failed", "rerun"):
        log = runs[run].stderr
        jobs = submissions(log)
        run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
        records = sacct([job_id for job_id, _, _ in jobs])
        assert set(records) == {job_id for job_id, _, _ in jobs}
        assert {r["name"] for r in records.values()} == {run_id}  # the plugin names jobs by run
        assert {r["partition"] for r in records.values()} == {SLURM_ENV["DIFFATTR_SLURM_PARTITION"]}
        assert {r["account"] for r in records.values()} == {SLURM_ENV["DIFFATTR_SLURM_ACCOUNT"]}
        for job_id, kind, name in jobs:  # each job's SLURM log, kept where the plugin says
            assert list((runs["slurm"] / ".snakemake/slurm_logs").glob(f"{kind}_{name}/**/{job_id}.log"))
    rules = {name for _, kind, name in submissions(runs["failed"].stderr) if kind == "rule"}
    # The LDS needs every model's ground truth, so it and the table wait for the failed model.
    assert rules == (GPU_RULES | CPU_RULES) - {"ground_truth", "lds", "table"}


def test_gpu_rules_ask_for_one_gpu_and_cpu_rules_for_none(runs, tiny):
    jobs = submissions(runs["failed"].stderr) + submissions(runs["rerun"].stderr)
    records = sacct([job_id for job_id, _, _ in jobs])
    for job_id, kind, name in jobs:
        tres = records[job_id]["tres"]
        if kind == "group" or name in GPU_RULES:  # one GPU of the profile's type, groups included
            assert tres.get("gres/gpu:a100") == "1" and tres.get("gres/gpu") == "1", (name, tres)
        else:
            assert name in CPU_RULES and not any(key.startswith("gres/") for key in tres), (name, tres)
    groups = [records[job_id]["tres"] for job_id, kind, _ in jobs if kind == "group"]
    assert groups, "the ground truth jobs were not grouped"
    # Members run one after another: the group asks for one member's CPUs and memory, not the sum.
    # CPUs are the rule's threads (tiny's threads.ground_truth: 1), not a profile setting.
    threads = Plan("tiny", tiny).threads("ground_truth")
    assert all(tres["cpu"] == str(threads) and tres["mem"] == "16000M" for tres in groups), groups


def test_failed_job_is_retried_with_more_memory_and_its_logs_kept(runs, profile):
    log = runs["failed"].stderr
    assert runs["failed"].returncode != 0
    failed = sorted(sacct(re.findall(r"SLURM-job '(\d+)' failed", log)).values(), key=lambda r: int(r["id"]))
    assert len(failed) == 1 + profile["retries"] and {r["state"] for r in failed} == {"FAILED"}
    assert all(r["comment"] == f"rule_train_lds_wildcards_tiny_{FAIL_MODEL}" for r in failed)
    memory = profile["set-resources"]["train_lds"]["mem_mb"]  # an expression of `attempt`
    attempts = range(1, len(failed) + 1)
    assert [r["tres"]["mem"] for r in failed] == [f"{eval(memory, {'attempt': a})}M" for a in attempts]
    # The job's own log, printed at the end (show-failed-logs), and SLURM's log of each attempt, kept.
    message = f"DIFFATTR_FAIL_MODEL={FAIL_MODEL}: this model's training fails on purpose"
    assert message in log.partition(f"Logfile logs/tiny/train/{FAIL_MODEL}.log:")[2]
    for r in failed:
        slurm_log = runs["slurm"] / f".snakemake/slurm_logs/rule_train_lds/tiny_{FAIL_MODEL}/{r['id']}.log"
        assert "Error in rule train_lds" in slurm_log.read_text()


def test_rerun_does_only_the_failed_job_and_what_depends_on_it(runs, tiny, profile):
    spec = tiny["featurize"]
    baselines = tiny["score"].get("baselines", ["pixel_dot", "pixel_cos"])  # one LDS per baseline too
    n_lds = (len(spec["functions"]) * len(spec["timesteps"]) * len(spec["proj_dims"]) + len(baselines)) * 2
    # The failed model's ground truth shares its allocation with others that waited for it.
    group = profile["group-components"]["ground_truth"]
    # the figures that read the table or the failed model's loss log (diffattr.figure_plan)
    plan = Plan("tiny", tiny)
    n_figures = sum(any(TARGET in p or FAIL_MODEL in p for value in figure_plan.inputs(plan, name).values()
                        for p in ([value] if isinstance(value, str) else value))
                    for name in figure_plan.figures(plan))
    assert runs["left"] == {"train_lds": 1, "ground_truth": group, "lds": n_lds, "table": 1, "figure": n_figures,
                            "all": 1}
    rerun = submissions(runs["rerun"].stderr)
    assert sorted(name for _, kind, name in rerun if kind == "rule") == \
        ["figure"] * n_figures + ["lds"] * n_lds + ["table", "train_lds"]
    assert len([1 for _, kind, _ in rerun if kind == "group"]) == 1
    assert planned_jobs(runs["slurm"], *PROFILES, *EVERYTHING) == {}


def test_table_equals_a_local_run(runs):
    pd.testing.assert_frame_equal(pd.read_csv(runs["slurm"] / TARGET), pd.read_csv(runs["local"] / TARGET))
