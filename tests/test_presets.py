"""Every preset's DAG: `snakemake -n results/lds_<preset>.csv` plans the jobs its settings imply."""
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DModel

from diffattr.config import experiment, feature_sets, retrain_settings, score_methods, trajectories

from dry_run import REPO, copy_workflow, job_counts

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def listed(value) -> list:
    return value if isinstance(value, list) else [value]


def ablation_needs(spec: dict) -> tuple[set, set]:
    """The (function, K, k, scheme, noises) feature sets and the (ground-truth function, feature set)
    LDS tables that the preset's ablations sweep over, the ground truth other than L_Simple only."""
    sets, other_truths = set(), set()
    for ablation in spec.get("ablations", []):
        swept = {key: values for key, values in ablation["sweep"].items() if key != "lambda"}
        for values in itertools.product(*swept.values()):
            point = {"scheme": "uniform", "noises": 1, "gt_function": "simple", **ablation.get("at", {}),
                     **dict(zip(swept, values))}
            fset = (point["function"], point["K"], point["k"], point["scheme"], point["noises"])
            sets.add(fset)
            if point["gt_function"] != "simple":
                other_truths.add((point["gt_function"], fset))
    return sets, other_truths


def expected_jobs(spec: dict, downloads: bool) -> dict[str, int]:
    """Job counts written out from the settings: one model per (subset, seed), one feature store per
    (function, K, k, scheme, noises, weights, split of train/val/gen) where the sets are those of the
    grids and the ablations on the final weights and, for a grid with `checkpoints`, its (function,
    K, k) at each of those kept steps, one score per feature set and query split, one TracInCP / GAS
    job per (function, K, k of a grid with checkpoints, query split) (unless
    score.trajectory_methods is empty), one baseline per (baseline, query split) (both pixel
    baselines unless score.baselines says otherwise), one CLIP embedding per split of train/val/gen
    when a CLIP baseline is listed, one LDS per score, TracInCP / GAS or baseline job; per
    ground-truth function other than simple that an ablation sweeps, one ground truth per model and
    an LDS per (feature set it is swept with, query split); one job per ablation. With `retrain`: a
    pool of max(ensembles, n_models) models, outputs of the first max(n_models), features of the
    first max(ensembles) on the featurize grid (extra_grids aside), one ensemble score per (set, C,
    query split), one Empirical IF / Datamodel store per (N, query split), and their LDS.
    Journey-TRAK (on `simple` features, when score.methods has it, as it does by default) adds one
    trajectory featurization of the generated images per projection dimension k of the simple
    feature sets; DAS (on `avg` features) one residual job per avg feature set."""
    models = int(spec["subsets"]["m"]) * len(spec["subsets"]["train_seeds"])
    featurize = spec["featurize"]
    grids = [featurize, *featurize.get("extra_grids", [])]
    sets, other_truths = ablation_needs(spec)
    sets = {(*fset, None) for fset in sets}
    sets |= {(f, int(K), int(k), scheme, noises, None) for g in grids
             for f in g["functions"] for K in g["timesteps"] for k in g["proj_dims"]
             for scheme in listed(g.get("scheme", featurize["scheme"]))
             for noises in listed(g.get("noises", featurize.get("noises", 1)))}
    sets |= {(f, int(K), int(k), "uniform", 1, step) for g in grids  # checkpoints: default scheme, noises
             for f in g["functions"] for K in g["timesteps"] for k in g["proj_dims"]
             for step in g.get("checkpoints", [])}
    tracin = len({(f, int(K), int(k)) for g in grids if g.get("checkpoints")
                  for f in g["functions"] for K in g["timesteps"] for k in g["proj_dims"]})
    if not spec["score"].get("trajectory_methods", ["tracincp", "gas"]):
        tracin = 0
    final_sets = {fset for fset in sets if fset[5] is None}  # of the final weights
    baselines = spec["score"].get("baselines", ["pixel_dot", "pixel_cos"])
    methods = score_methods(spec["score"], "methods")
    journeys = len({fset[2] for fset in final_sets if fset[0] == "simple"}) if "journey_trak" in methods else 0
    residuals = len({s for s in final_sets if s[0] == "avg"}) if "das" in methods else 0
    jobs = {"dataset": 1, "subsets": 1, "train_full": 1, "train_lds": models, "generate": 1,
            "ground_truth": models, "featurize": 3 * len(sets), "score": 2 * len(sets),
            "tracin": 2 * tracin, "baseline": 2 * len(baselines),
            "lds": 2 * (len(sets) + tracin + len(baselines)), "table": 1,
            "embed_clip": 3 * any(name.startswith("clip_") for name in baselines),
            "ground_truth_other_function": models * len({gt for gt, _ in other_truths}),
            "lds_other_truth": 2 * len(other_truths), "ablation": len(spec.get("ablations", [])),
            "featurize_journey": journeys, "residual": residuals}
    retrain = retrain_settings(spec)
    if retrain["pool"]:
        grid_sets = len(featurize["functions"]) * len(featurize["timesteps"]) * len(featurize["proj_dims"])
        ensembles, counts = retrain["ensembles"], retrain["n_models"]
        stores = grid_sets * len(ensembles) + len(counts)
        jobs.update(retrain_subsets=1, train_retrain=retrain["pool"], ground_truth=models + max([0, *counts]),
                    featurize_retrained=3 * grid_sets * max([0, *ensembles]),
                    score_ensemble=2 * grid_sets * len(ensembles), retrain_score=2 * len(counts),
                    lds=jobs["lds"] + 2 * stores)
    jobs = {rule: count for rule, count in jobs.items() if count}
    return {**jobs, "download_cifar10": 1} if downloads else jobs


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
    spec = experiment(CONFIG, preset)
    downloads = spec["dataset"]["source"] == "cifar10" and spec["dataset"].get("path") is None
    assert job_counts(dry_run(workdir, f"results/lds_{preset}.csv")) == expected_jobs(spec, downloads)


def test_local_cifar10_copy_replaces_the_download(workdir):
    local = workdir / "cifar-copy.tar.gz"
    local.write_bytes(b"stand-in: a dry run reads no data")
    out = dry_run(workdir, "results/lds_cifar2.csv", "--config", f"cifar10_path={local}")
    assert job_counts(out) == expected_jobs(experiment(CONFIG, "cifar2"), downloads=False)
    assert str(local) in out  # the local copy is the dataset job's input


def test_cifar2_is_the_papers_setup():
    """The numbers the paper's CIFAR-2 table rests on (protocol): 1 + 64 x 3 models, 27 lambdas."""
    spec = experiment(CONFIG, "cifar2")
    assert expected_jobs(spec, False)["train_lds"] == 192
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
    assert trajectories(spec["featurize"]) == {("simple", 10, 32768): [2000, 4000, 6000],
                                               ("simple", 100, 32768): [2000, 4000, 6000],
                                               ("simple", 10, 4096): [2000, 4000, 6000],
                                               ("square", 10, 4096): [2000, 4000, 6000]}
    # the ablations add Fig. 1's eta sweep (11 functions interp<eta>), cumulative timesteps (simple and
    # square at K = 10 and 100) and 2 and 4 noises per timestep (simple and square at K = 10)
    # and the checkpoint choice: simple and square at K = 10, k = 4096 for each kept checkpoint
    assert expected_jobs(spec, False)["featurize"] == 3 * (4 + 2 + 21 + 2 * 3 + 2 * 3 + 11 + 4 + 4)
    assert expected_jobs(spec, False)["tracin"] == 2 * 4
    # avg for DAS at k = 32768 and K in {10, 100}, as the DAS paper's main comparison (an extra grid:
    # the ensembles keep to the main grid's TRAK and D-TRAK)
    assert {"functions": ["avg"], "timesteps": [10, 100], "proj_dims": [32768]} in spec["featurize"]["extra_grids"]
    # Journey-TRAK on the simple feature sets of both k, DAS on the five avg feature sets
    assert expected_jobs(spec, False)["featurize_journey"] == 2
    assert expected_jobs(spec, False)["residual"] == 5
    assert spec["score"]["lambda_exponents"] == [-2, 6]
    # Tables 7-8: ensembles of 1..8 models, Empirical IF and Datamodel on 64..512, all on 50% subsets
    retrain = retrain_settings(spec)
    assert (retrain["ensembles"], retrain["n_models"], retrain["alpha"]) == ([1, 2, 4, 8], [64, 128, 256, 512], 0.5)
    assert expected_jobs(spec, False)["train_retrain"] == 512
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
    assert trajectories(default["featurize"]) == {("simple", 10, 512): [150, 300, 450]}
    assert trajectories(tiny["featurize"]) == {("simple", 4, 64): [20]}
    assert (expected_jobs(default, False)["tracin"], expected_jobs(tiny, False)["tracin"]) == (2, 2)


def test_tracin_can_be_turned_off(workdir):
    out = dry_run(workdir, "results/lds_tiny.csv", "--config",
                  'experiments={"tiny": {"score": {"trajectory_methods": []}}}')
    spec = experiment(CONFIG, "tiny")
    spec["score"]["trajectory_methods"] = []
    assert "tracin" not in job_counts(out) and job_counts(out) == expected_jobs(spec, False)


def test_score_baselines_can_be_turned_off(workdir):
    out = dry_run(workdir, "results/lds_tiny.csv", "--config",
                  'experiments={"tiny": {"score": {"baselines": []}}}')
    spec = experiment(CONFIG, "tiny")
    spec["score"]["baselines"] = []
    counts = job_counts(out)
    assert "baseline" not in counts and counts == expected_jobs(spec, False)


def test_new_methods_are_in_the_default_and_cifar2_plans():
    """Journey-TRAK (gen) and DAS are scored in the default experiment and in cifar2 (the schema's
    default method list), on the feature sets they apply to."""
    for preset in ("default", "cifar2"):
        spec = experiment(CONFIG, preset)
        assert {"journey_trak", "das"} <= set(score_methods(spec["score"], "methods"))
        jobs = expected_jobs(spec, False)
        assert jobs["featurize_journey"] >= 1 and jobs["residual"] >= 1
