"""The planner (diffattr.plan) without Snakemake: its plans against counts written out from the
settings, its names and paths. tests/test_presets.py checks that Snakemake's DAG has the same jobs."""
import subprocess
import sys

import pytest
import yaml

from diffattr.plan import PATHS, Plan, path, truth_root
from diffattr.protocol import FeatureSet, ModelName, featurize_params
from diffattr.settings import ConfigError, deep_merge, experiment

from dry_run import REPO

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def jobs(preset: str, change: dict | None = None) -> dict[str, int]:
    config = deep_merge(CONFIG, {"experiments": {preset: change}}) if change else CONFIG
    return {rule: len(outputs) for rule, outputs in Plan(preset, experiment(config, preset)).jobs().items()}


def test_default_plan():
    """default: 24 subsets x 3 seeds; feature sets simple, square, avg, l2 at K 10, k 512, the eta
    ablation's 5 interp sets, square cumulative and square with 2 noises (the scheme and noises
    ablations), and simple at the 3 kept checkpoints: 4 + 5 + 2 + 3 = 14 sets x 3 splits. Every set
    is scored for val and gen; TracInCP / GAS over simple's checkpoints; 4 baselines (pixel, CLIP);
    Journey-TRAK on simple (k 512: one trajectory store), DAS on avg (one residual store). Influence
    functions: one curvature, train gradients once, the 3 measurements' query gradients per split.
    Figures: headline, functions, interpolation, lambda, checkpoints, a gallery per query split,
    losses, samples."""
    models, sets, stores = 24 * 3, 4 + 5 + 2 + 3, 14 + 1 + 4 + 3
    assert jobs("default") == {
        "dataset": 1, "subsets": 1, "train_full": 1, "train_lds": models, "generate": 1,
        "ground_truth": models, "featurize": 3 * sets, "featurize_journey": 1, "residual": 1,
        "score": 2 * sets, "tracin": 2, "baseline": 2 * 4, "embed_clip": 3, "lds": 2 * stores,
        "ablation": 4, "table": 1, "figure": 9,
        "curvature": 1, "influence_features": 1 + 3 * 2, "influence_score": 3 * 2}


def test_tiny_retrain_plan():
    """tiny-retrain: tiny (8 subsets x 2 seeds, simple and square at K 4, k 64, simple's checkpoint
    at step 20, the pixel baselines) plus a pool of max(ensembles 1, 2; n_models 4) = 4 models: the
    ensembles featurize the first 2 pool models on the 2 grid sets x 3 splits, one ensemble store per
    (set, C); Empirical IF and Datamodel on the first 4 models' outputs, one store. Figures: default's
    without interpolation, with ensembles."""
    models, sets = 8 * 2, 2 + 1
    stores = sets + 1 + 2 + 2 * 2 + 1
    assert jobs("tiny-retrain") == {
        "dataset": 1, "subsets": 1, "train_full": 1, "train_lds": models, "generate": 1,
        "ground_truth": models + 4, "featurize": 3 * sets, "featurize_journey": 1,
        "score": 2 * sets, "tracin": 2, "baseline": 2 * 2, "lds": 2 * stores, "ablation": 1, "table": 1,
        "retrain_subsets": 1, "train_retrain": 4, "featurize_retrained": 2 * 2 * 3,
        "score_ensemble": 2 * 2 * 2, "retrain_score": 2, "figure": 9}


def test_switching_methods_off_removes_their_jobs():
    base = jobs("tiny")
    assert "tracin" not in jobs("tiny", {"score": {"trajectory_methods": []}})
    no_journey = jobs("tiny", {"score": {"methods": ["trak", "das"]}})
    assert "featurize_journey" not in no_journey and no_journey["score"] == base["score"]
    # DAS needs avg features: adding avg to the grid adds its residual store and its feature set
    with_avg = jobs("tiny", {"featurize": {"functions": ["simple", "square", "avg"]}})
    assert with_avg["residual"] == 1 and with_avg["featurize"] == base["featurize"] + 3


def test_ground_truth_ablation_plans_its_own_root():
    change = {"ablations": [{"name": "gt", "sweep": {"gt_function": ["simple", "l1"]},
                             "at": {"function": "square", "K": 4, "k": 64, "noises": 2}}]}
    plan = Plan("tiny", experiment(deep_merge(CONFIG, {"experiments": {"tiny": change}}), "tiny"))
    planned = plan.jobs()
    assert planned["lds_other_truth"] == ["results/tiny/truth_l1/lds/square_K4_k64_e2_val.csv",
                                          "results/tiny/truth_l1/lds/square_K4_k64_e2_gen.csv"]
    assert len(planned["ground_truth_other_function"]) == len(plan.lds_models) == 16
    assert planned["ground_truth_other_function"][0] == "results/tiny/truth_l1/ground_truth/s000-r0.zarr"
    assert FeatureSet("square", 4, 64, noises=2) in plan.final_sets


def test_products_are_every_jobs_first_output_once():
    plan = Plan("default", experiment(CONFIG, "default"))
    products = plan.products()
    assert len(products) == len(set(products)) == sum(jobs("default").values())
    assert "results/lds_default.csv" in products
    assert "results/default/models/lds/s023-r2/diffusion_pytorch_model.safetensors" in products
    assert "results/default/features/simple_journey_k512/gen.zarr" in products
    assert "results/default/features/avg_K10_k512/train_residual.zarr" in products


def test_names_and_paths():
    plan = Plan("tiny", experiment(CONFIG, "tiny"))
    assert plan.lds_models[:3] == ["s000-r0", "s000-r1", "s001-r0"]
    assert ModelName.parse("s012-r3") == ModelName(12, 3) and ModelName(1234, 0).name == "s1234-r0"
    for bad in ("s12-r3", "s012r3", "s012-r", "s0012-r3"):
        with pytest.raises(ValueError, match="expected s<subset"):
            ModelName.parse(bad)
    assert truth_root("tiny") == "results/tiny" and truth_root("tiny", "l1") == "results/tiny/truth_l1"
    assert path("scores", experiment="tiny", scores="pixel_dot", qsplit="gen") == "results/tiny/scores/pixel_dot/gen.zarr"
    assert plan.images("gen") == PATHS["generated"].format(experiment="tiny")
    fset = FeatureSet("simple", 4, 64)
    assert plan.checkpoint_steps(fset) == [20]
    with pytest.raises(ConfigError, match="no featurize grid lists checkpoints for square_K4_k64"):
        plan.checkpoint_steps(FeatureSet("square", 4, 64))
    with pytest.raises(ConfigError, match="the pool has 0"):
        plan.pool_models(2)
    with pytest.raises(ConfigError, match="expected one of the ablations of experiments.tiny: lambda"):
        plan.ablation("nope")


def test_threads_per_stage():
    """Each stage's jobs compute on the preset's threads.<stage> (the SLURM profile's CPUs), 1 where
    the preset sets none; cifar2-mini, for a 2-core machine, runs its jobs side by side on one each."""
    cifar2, default = Plan("cifar2", experiment(CONFIG, "cifar2")), Plan("default", experiment(CONFIG, "default"))
    assert [cifar2.threads(s) for s in ("train", "featurize", "ground_truth", "lds")] == [8, 8, 4, 2]
    assert {default.threads(s) for s in ("dataset", "train", "generate", "ground_truth", "featurize", "score",
                                         "lds")} == {1}
    assert Plan("cifar2-mini", experiment(CONFIG, "cifar2-mini")).threads("featurize") == 1


def test_featurize_params_hold_dtype_only_when_not_fp32():
    """The featurize jobs' rule params (rules/featurize.smk, influence.smk: protocol.featurize_params):
    every preset's, without featurize.dtype or with it fp32, are those before the key existed, so no
    finished featurize job reruns; tf32 adds it (those jobs rerun). bf16 is refused. A factorized
    projection adds its split of k (norm when absent); the dense one has none, whatever the key says."""
    before = ("proj_seed", "projector", "noise_seed", "batch_size")  # the params' keys before featurize.dtype
    assert "dtype" not in experiment(CONFIG, "default", libraries=False)["featurize"]  # no schema default
    for preset in CONFIG["experiments"]:
        spec = experiment(CONFIG, preset, libraries=False)["featurize"]
        spec = {key: value for key, value in spec.items() if key != "dtype"}  # cifar2-fast sets tf32
        old = {key: spec[key] for key in before if key in spec}
        if spec.get("projector") == "factorized":
            old["factor_split"] = "norm"
        assert featurize_params(spec) == featurize_params({**spec, "dtype": "fp32"}) == old
        assert featurize_params({**spec, "dtype": "tf32"}) == {**old, "dtype": "tf32"}
    with pytest.raises(ValueError, match=r"^featurize.dtype: got 'bf16'; expected one of fp32, tf32"):
        featurize_params({**spec, "dtype": "bf16"})
    dense = {"proj_seed": 0, "noise_seed": 0, "batch_size": 8}
    assert featurize_params({**dense, "factor_split": "even"}) == dense
    assert featurize_params({**dense, "projector": "factorized", "factor_split": "even"})["factor_split"] == "even"


def test_planning_imports_no_torch():
    """Every Snakemake process (one per job under SLURM) parses the rules, which ask the planner:
    importing torch and diffusers there would cost seconds per job."""
    code = ("import sys, diffattr.plan, diffattr.settings, diffattr.figure_plan, diffattr.cost; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'torch'" not in modules and "'diffusers'" not in modules and "'matplotlib'" not in modules
