"""Every preset's DAG: `snakemake -n results/lds_<preset>.csv` plans the jobs its settings imply."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DModel

from diffattr.plan import Plan, feature_sets, trajectories
from diffattr.protocol import FeatureSet
from diffattr.settings import deep_merge, experiment, retrain_settings, score_methods

from dry_run import REPO, copy_workflow, job_counts

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def planned(preset: str, config: dict = CONFIG, cifar10_path=None) -> dict[str, int]:
    """Job counts per rule of the preset's plan (diffattr.plan.Plan.jobs) that its table needs: all
    but the figures, which read the table."""
    return {rule: len(outputs) for rule, outputs in
            Plan(preset, experiment(config, preset), cifar10_path).jobs().items() if rule != "figure"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The workflow's files without results/, and a stand-in CelebA folder for the celeba preset."""
    root = copy_workflow(tmp_path_factory.mktemp("presets"))
    (root / "data" / "celeba" / "img_align_celeba").mkdir(parents=True)
    return root


def dry_run(workdir, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "-n", *args],
                            cwd=workdir, text=True, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("preset", ["cifar2", "cifar10", "celeba", "cifar2-mini", "default", "tiny", "tiny-retrain"])
def test_dry_run_plans_every_job_of_the_preset(workdir, preset):
    """Snakemake's DAG, built backwards from the table through the rules' input functions, has the
    jobs the planner lists forwards from the settings (with the figures, which read the table, as
    targets too: one dry run)."""
    figures = Plan(preset, experiment(CONFIG, preset)).jobs()["figure"]
    assert job_counts(dry_run(workdir, f"results/lds_{preset}.csv", *figures)) == {**planned(preset),
                                                                                    "figure": len(figures)}


def test_local_cifar10_copy_replaces_the_download(workdir):
    local = workdir / "cifar-copy.tar.gz"
    local.write_bytes(b"stand-in: a dry run reads no data")
    out = dry_run(workdir, "results/lds_cifar2.csv", "--config", f"cifar10_path={local}")
    assert job_counts(out) == planned("cifar2", cifar10_path=str(local))
    assert "download_cifar10" in planned("cifar2") and "download_cifar10" not in planned("cifar2", cifar10_path="x")
    assert str(local) in out  # the local copy is the dataset job's input


def test_cifar2_is_the_papers_setup():
    """The numbers the paper's CIFAR-2 table rests on (protocol): 1 + 64 x 3 models, 27 lambdas."""
    spec = experiment(CONFIG, "cifar2")
    jobs = planned("cifar2")
    assert jobs["train_lds"] == 192
    assert spec["dataset"]["classes"] == ["automobile", "horse"]
    assert (spec["dataset"]["n_train"], spec["dataset"]["n_val"]) == (5000, 1000)
    assert spec["ground_truth"]["timesteps"] == 1000 and len(spec["ground_truth"]["noise_seeds"]) == 3
    assert spec["generate"]["n"] == 1000 and spec["featurize"]["proj_dims"] == [32768]
    assert spec["featurize"]["timesteps"] == [10, 100]
    # Table 1: every model-output function at k = 4096 and K in {10, 100, 1000}, on the same models
    table1 = spec["featurize"]["extra_grids"][0]
    assert set(table1["functions"]) == {"simple", "elbo", "square", "avg", "l1", "l2", "linf"}
    assert (table1["timesteps"], table1["proj_dims"]) == ([10, 100, 1000], [4096])
    # TracInCP / GAS (Table 2): L_Simple features at K = 10, 100 and k = 32768 of four checkpoints, the
    # last the final weights, spread evenly over the 8000 steps
    assert spec["train"]["full_steps"] == 8000 and spec["train"]["keep_checkpoints"] == [2000, 4000, 6000]
    assert trajectories(spec["featurize"]) == {FeatureSet("simple", 10, 32768): [2000, 4000, 6000],
                                               FeatureSet("simple", 100, 32768): [2000, 4000, 6000],
                                               FeatureSet("simple", 10, 4096): [2000, 4000, 6000],
                                               FeatureSet("square", 10, 4096): [2000, 4000, 6000]}
    # the ablations add Fig. 1's eta sweep (11 functions interp<eta>), cumulative timesteps (simple and
    # square at K = 10 and 100) and 2 and 4 noises per timestep (simple and square at K = 10)
    # and the checkpoint choice: simple and square at K = 10, k = 4096 for each kept checkpoint
    assert jobs["featurize"] == 3 * (4 + 2 + 21 + 2 * 3 + 2 * 3 + 11 + 4 + 4)
    assert jobs["tracin"] == 2 * 4
    # avg for DAS at k = 32768 and K in {10, 100}, as the DAS paper's main comparison (an extra grid:
    # the ensembles keep to the main grid's TRAK and D-TRAK)
    assert {"functions": ["avg"], "timesteps": [10, 100], "proj_dims": [32768]} in spec["featurize"]["extra_grids"]
    # Journey-TRAK on the simple feature sets of both k, DAS on the five avg feature sets
    assert jobs["featurize_journey"] == 2
    assert jobs["residual"] == 5
    assert spec["score"]["lambda_exponents"] == [-2, 6]
    # Tables 7-8: ensembles of 1..8 models, Empirical IF and Datamodel on 64..512, all on 50% subsets
    retrain = retrain_settings(spec)
    assert (retrain["ensembles"], retrain["n_models"], retrain["alpha"]) == ([1, 2, 4, 8], [64, 128, 256, 512], 0.5)
    assert jobs["train_retrain"] == 512
    with torch.device("meta"):
        unet = UNet2DModel(**spec["model"]["unet"])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7


def test_feature_sets_are_the_union_of_the_grids_in_config_order():
    featurize = {"functions": ["square", "simple"], "timesteps": [10], "proj_dims": [64],
                 "extra_grids": [{"functions": ["simple", "avg"], "timesteps": [10, 100], "proj_dims": [64]}]}
    assert [s.name for s in feature_sets(featurize)] == ["square_K10_k64", "simple_K10_k64", "simple_K100_k64",
                                                         "avg_K10_k64", "avg_K100_k64"]


def test_cifar2_ablations_are_the_papers_sweeps():
    ablations = {a["name"]: a for a in experiment(CONFIG, "cifar2")["ablations"]}
    assert ablations["eta"]["sweep"] == {"function": [f"interp{eta:g}" for eta in np.linspace(0, 1, 11)]}
    assert ablations["eta"]["at"] == {"K": 10, "k": 4096}
    assert ablations["table1"]["sweep"]["K"] == [10, 100, 1000]
    assert set(ablations["table1"]["sweep"]["function"]) == {"simple", "elbo", "square", "avg", "l1", "l2", "linf"}
    assert ablations["lambda"]["sweep"]["lambda"] == "grid"
    assert set(ablations["lambda"]["methods"]) == {"trak", "relative_if", "renormalized_if"}
    assert {"scheme", "noises", "gt_function", "proj_dim"} <= set(ablations)


def test_an_ablation_plans_its_own_table_and_the_report_links_it(workdir):
    out = dry_run(workdir, "results/lds_tiny.csv", "-p")
    assert "results/tiny/ablations/lambda.md" in out and "results/tiny/lds/square_K4_k64_val.lambdas.csv" in out
    out = dry_run(workdir, "results/tiny/ablations/gt.csv", "--config", 'experiments={"tiny": {"ablations": '
                  '[{"name": "gt", "sweep": {"gt_function": ["simple", "l1"]}, "at": {"function": "square", '
                  '"K": 4, "k": 64, "noises": 2}}]}}')
    spec = experiment(CONFIG, "tiny")
    models = spec["subsets"]["m"] * len(spec["subsets"]["train_seeds"])
    counts = job_counts(out)
    assert counts["ground_truth_other_function"] == models and counts["lds_other_truth"] == 2
    assert counts["featurize"] == 3 and counts["lds"] == 2 and counts["ablation"] == 1
    assert "results/tiny/truth_l1/lds/square_K4_k64_e2_gen.csv" in out
    assert "results/tiny/features/square_K4_k64_e2/train.zarr" in out


def test_default_and_tiny_keep_their_tracin_small():
    """TracInCP / GAS in the default table: one function, three kept checkpoints and the final; in
    tiny, the end-to-end test's, one kept checkpoint."""
    default, tiny = experiment(CONFIG, "default"), experiment(CONFIG, "tiny")
    assert trajectories(default["featurize"]) == {FeatureSet("simple", 10, 512): [150, 300, 450]}
    assert trajectories(tiny["featurize"]) == {FeatureSet("simple", 4, 64): [20]}
    assert (planned("default")["tracin"], planned("tiny")["tracin"]) == (2, 2)


def test_tracin_can_be_turned_off(workdir):
    out = dry_run(workdir, "results/lds_tiny.csv", "--config",
                  'experiments={"tiny": {"score": {"trajectory_methods": []}}}')
    jobs = planned("tiny", deep_merge(CONFIG, {"experiments": {"tiny": {"score": {"trajectory_methods": []}}}}))
    assert "tracin" not in job_counts(out) and job_counts(out) == jobs
    assert jobs["lds"] == planned("tiny")["lds"] - 2


def test_score_baselines_can_be_turned_off(workdir):
    out = dry_run(workdir, "results/lds_tiny.csv", "--config",
                  'experiments={"tiny": {"score": {"baselines": []}}}')
    counts = job_counts(out)
    jobs = planned("tiny", deep_merge(CONFIG, {"experiments": {"tiny": {"score": {"baselines": []}}}}))
    assert "baseline" not in counts and counts == jobs and jobs["lds"] == planned("tiny")["lds"] - 4


def test_new_methods_are_in_the_default_and_cifar2_plans():
    """Journey-TRAK (gen) and DAS are scored in the default experiment and in cifar2 (the schema's
    default method list), on the feature sets they apply to."""
    for preset in ("default", "cifar2"):
        spec = experiment(CONFIG, preset)
        assert {"journey_trak", "das"} <= set(score_methods(spec["score"], "methods"))
        jobs = planned(preset)
        assert jobs["featurize_journey"] >= 1 and jobs["residual"] >= 1


def test_norm_split_makes_the_train_images_an_input_of_every_feature_job(workdir):
    """featurize.factor_split norm (when absent): the val and Journey-TRAK feature jobs read the train
    split, on which they measure the split of k as the train job does."""
    override = {"default": {"featurize": {"projector": "factorized"}}}
    out = dry_run(workdir, "results/default/features/square_K10_k512/val.zarr",
                  "results/default/features/simple_journey_k512/gen.zarr", "--config", f"experiments={override}")
    lines = out.splitlines()
    inputs = {line.removeprefix("rule ").rstrip(":"): lines[i + 1].split("input: ")[1].split(", ")
              for i, line in enumerate(lines) if line.startswith("rule featurize")}
    assert set(inputs) == {"featurize", "featurize_journey"}
    for rule, files in inputs.items():
        assert "results/default/data/train.zarr" in files, (rule, files)
