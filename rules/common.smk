# Shared helpers: config validation, experiment settings, path builders and the warm-worker runner.
import copy
import os
from pathlib import Path
from types import SimpleNamespace

from diffattr.config import ConfigError, select_timesteps, undefined_preset, validate_config
from diffattr.config import FEATURE_SET, FEATURE_SET_ANY, checkpoint_feature_sets, feature_set_name
from diffattr.config import DEFAULT_GT_FUNCTION, FeatureSet, ablation_points
from diffattr.config import feature_sets as config_feature_sets
from diffattr.config import parse_feature_set, retrain_settings, score_methods, trajectories
from diffattr.methods import BASELINES, METHODS
from diffattr.worker import run_script

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
QUERY_SPLITS = ["val", "gen"]

# The config is checked before any job is planned: the top level against the schema
# (workflow/schemas/config.schema.yaml) with snakemake.utils.validate, then every preset merged with
# its `base:` chain. One line per fault: `experiments.<name>.<key>: got <value>; expected <what>`.
EXPERIMENTS = validate_config(config)


wildcard_constraints:
    experiment=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    model=r"s\d{3}-r\d+",
    split=r"train|val|gen",
    qsplit=r"val|gen",
    baseline="|".join(BASELINES),
    function=r"[a-z0-9.]+",
    K=r"\d+",
    k=r"\d+",
    # a feature set: {function}_K{K}_k{k}, with _step{S} for a kept training checkpoint's features
    fset=FEATURE_SET_ANY,
    # a predictions store: the feature set it was scored on (with _ens<C>: by an ensemble of C
    # retrained models), TracInCP / GAS over a feature set's checkpoints (<feature set>_tracin), a
    # pixel baseline, or the retraining pool's first N models (retrain_n<N>)
    scores=f"{FEATURE_SET_ANY}|{FEATURE_SET}_ens\\d+|{FEATURE_SET}_tracin|retrain_n\\d+|" + "|".join(BASELINES),
    # the model-output function of an ablation's ground truth other than the protocol's L_Simple
    gt=r"[a-z0-9.]+",
    ablation=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


def local_gpu_jobs() -> int:
    """The `gpu` resource of a GPU rule's job: 1 when jobs on this machine compute on an NVIDIA GPU,
    so that with the workflow profile's `resources: gpu=1` they take turns on it instead of running
    side by side out of its memory; 0 otherwise (CPU jobs run in parallel). Checked without importing
    torch, since every SLURM job parses this file again; the SLURM profile sets `gpu` itself."""
    if str(config.get("device", "auto")) == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return 0
    gpus = Path("/proc/driver/nvidia/gpus")
    return int(gpus.is_dir() and any(gpus.iterdir()))


GPU_JOB = local_gpu_jobs()


def settings(wildcards):
    """The resolved settings of the target's experiment (a copy: rules may edit it)."""
    if wildcards.experiment not in EXPERIMENTS:
        raise ConfigError(undefined_preset("the target's experiment", wildcards.experiment, EXPERIMENTS))
    return copy.deepcopy(EXPERIMENTS[wildcards.experiment])


def num_train_timesteps(wildcards) -> int:
    """T of the experiment's DDPM scheduler (the protocol's 1000 unless model.scheduler says otherwise)."""
    return int((settings(wildcards)["model"].get("scheduler") or {}).get("num_train_timesteps", 1000))


def lds_models(wildcards):
    """Model names s<subset>-r<training seed>, one per (subset, seed)."""
    spec = settings(wildcards)["subsets"]
    return [f"s{j:03d}-r{int(seed)}" for j in range(int(spec["m"])) for seed in spec["train_seeds"]]


def model_files(directory):
    return {
        "weights": f"{directory}/diffusion_pytorch_model.safetensors",
        "config": f"{directory}/config.json",
        "loss_log": f"{directory}/train_log.csv",
        "training": f"{directory}/training.json",
    }


def images(split):
    """Image store of a split: the dataset's train/val, or the generation set."""
    if split == "gen":
        return "results/{experiment}/generated/gen.zarr"
    return f"results/{{experiment}}/data/{split}.zarr"


def feature_set_names(wildcards):
    """Names of the experiment's feature sets: those of the final weights (the featurize grids' and
    those the ablations sweep over, diffattr.config.FeatureSet), then those of kept training
    checkpoints (`_step<S>`, from the featurize grids' `checkpoints`)."""
    spec = settings(wildcards)
    featurize = spec["featurize"]
    return [*(fset.name for fset in config_feature_sets(featurize, spec.get("ablations", []))),
            *(feature_set_name(f, K, k, step) for f, K, k, step in checkpoint_feature_sets(featurize))]


def trajectory_stores(wildcards):
    """Names of the experiment's TracInCP / GAS stores: <feature set>_tracin for the (function, K, k)
    of every grid with `checkpoints`, unless score.trajectory_methods is empty."""
    spec = settings(wildcards)
    if not score_methods(spec["score"], "trajectory_methods"):
        return []
    return [f"{feature_set_name(f, K, k)}_tracin" for f, K, k in trajectories(spec["featurize"])]


def trajectory_feature_sets(wildcards, fset):
    """The feature sets a TracInCP / GAS store of `fset` sums over: its checkpoints, then the final."""
    function, K, k, _ = parse_feature_set(fset)
    steps = trajectories(settings(wildcards)["featurize"]).get((function, K, k))
    if steps is None:
        raise ConfigError(f"experiments.{wildcards.experiment}: no featurize grid lists checkpoints for "
                          f"{fset}, so it has no TracInCP / GAS store")
    return [*(feature_set_name(function, K, k, step) for step in steps), fset]


def baselines(wildcards):
    """The experiment's similarity baselines (score.baselines): raw pixel and CLIP."""
    return score_methods(settings(wildcards)["score"], "baselines")


def embeddings(wildcards):
    """The CLIP embedding stores the experiment's baselines compare, one per split."""
    if not any(METHODS[name].inputs == "embeddings" for name in baselines(wildcards)):
        return []
    return [f"results/{wildcards.experiment}/embeddings/clip/{split}.zarr" for split in ["train", *QUERY_SPLITS]]


def applies(wildcards, method, function, split) -> bool:
    """Whether the experiment's score jobs compute `method` (a method on features) for `function`'s
    features and query `split` (`diffattr.methods.Method.applies`)."""
    return (method in score_methods(settings(wildcards)["score"], "methods")
            and METHODS[method].applies(function, split))


def journey_store(experiment, function, k):
    """Journey-TRAK's query features of the generation set for `function` at projection k."""
    return f"results/{experiment}/features/{function}_journey_k{k}/gen.zarr"


def extra_features(wildcards):
    """The feature stores beside train/val/gen that the experiment's methods read: Journey-TRAK's
    trajectory features (per function and k) and DAS's residual weights (per feature set)."""
    out, spec = [], settings(wildcards)
    for fset in config_feature_sets(spec["featurize"], spec.get("ablations", [])):  # of the final weights
        if applies(wildcards, "journey_trak", fset.function, "gen"):
            out.append(journey_store(wildcards.experiment, fset.function, fset.k))
        if any(applies(wildcards, "das", fset.function, split) for split in QUERY_SPLITS):
            out.append(f"results/{wildcards.experiment}/features/{fset.name}/train_residual.zarr")
    return list(dict.fromkeys(out))


def score_stores(wildcards):
    """Names of the experiment's predictions stores (results/<exp>/scores/<name>/<split>.zarr): one
    per feature set, one per TracInCP / GAS store, one per baseline, and the retraining-based
    ones (ensemble.smk, retrain.smk)."""
    return [*feature_set_names(wildcards), *trajectory_stores(wildcards), *baselines(wildcards),
            *ensemble_stores(wildcards), *retrain_stores(wildcards)]


def ablation_spec(wildcards):
    """The settings of the ablation named by the target."""
    ablations = {a["name"]: a for a in settings(wildcards).get("ablations", [])}
    if wildcards.ablation not in ablations:
        raise ConfigError(f"the target's ablation: got {wildcards.ablation!r}; expected one of the ablations "
                          f"of experiments.{wildcards.experiment}: {', '.join(ablations) or 'none'}")
    return ablations[wildcards.ablation]


def truth_root(experiment, gt_function):
    """Where the ground truth of a model-output function and the LDS against it go: the protocol's
    L_Simple in results/<exp>/ as always, any other under results/<exp>/truth_<function>/."""
    base = f"results/{experiment}"
    return base if gt_function == DEFAULT_GT_FUNCTION else f"{base}/truth_{gt_function}"


def ablation_tables(wildcards):
    """[(swept values, query split, LDS table)] of every point of the target's ablation: the
    per-lambda tables for a lambda sweep, the LDS tables otherwise."""
    spec = ablation_spec(wildcards)
    suffix = ".lambdas.csv" if "lambda" in spec["sweep"] else ".csv"
    root = lambda point: truth_root(wildcards.experiment, point.gt_function)
    return [(dict(point.values), split, f"{root(point)}/lds/{point.features.name}_{split}{suffix}")
            for point in ablation_points(spec) for split in QUERY_SPLITS]


def other_truths(wildcards):
    """The model-output functions other than L_Simple that the experiment's ablations take as ground
    truth."""
    return list(dict.fromkeys(point.gt_function for ablation in settings(wildcards).get("ablations", [])
                              for point in ablation_points(ablation)
                              if point.gt_function != DEFAULT_GT_FUNCTION))


def products(experiment):
    """Every output of an experiment, intermediate ones included.

    `rule all` asks for all of them: Snakemake regenerates a deleted intermediate file (a model's
    weights, say) only when some target asks for it, and then reruns what depends on it.
    """
    w = SimpleNamespace(experiment=experiment)
    models = ["full", *(f"lds/{m}" for m in lds_models(w))]
    sets = feature_set_names(w)
    ablations = [a["name"] for a in settings(w).get("ablations", [])]
    return [
        *(f"results/{experiment}/models/{m}/diffusion_pytorch_model.safetensors" for m in models),
        *(f"results/{experiment}/ground_truth/{m}.zarr" for m in lds_models(w)),
        *retrain_products(w),
        *(f"results/{experiment}/features/{s}/{split}.zarr" for s in sets for split in ["train", *QUERY_SPLITS]),
        *embeddings(w),
        *extra_features(w),
        *(f"results/{experiment}/scores/{s}/{split}.zarr" for s in score_stores(w) for split in QUERY_SPLITS),
        *(f"results/{experiment}/lds/{s}_{split}.csv" for s in score_stores(w) for split in QUERY_SPLITS),
        *(f"{truth_root(experiment, gt)}/ground_truth/{m}.zarr"
          for gt in other_truths(w) for m in lds_models(w)),
        *(path for name in ablations
          for _, _, path in ablation_tables(SimpleNamespace(**vars(w), ablation=name))),
        *(f"results/{experiment}/ablations/{name}.{ext}" for name in ablations for ext in ("csv", "md")),
        f"results/lds_{experiment}.csv",
    ]


def run(script, input, output, params, wildcards, threads, log, **settings_not_params):
    """Run a workflow script in a warm worker. Its `snakemake.config` holds `device` and any
    `settings_not_params`: how a job runs, not what it computes, so changing them (moving a run from a
    CPU to a GPU machine, say) reruns nothing."""
    run_script(SCRIPTS / script, input, output, params, wildcards, threads, log,
               config={"device": config.get("device", "auto"), **settings_not_params})
