# Shared helpers: config validation, experiment settings, path builders and the warm-worker runner.
import copy
import os
from pathlib import Path
from types import SimpleNamespace

from diffattr.config import ConfigError, select_timesteps, undefined_preset, validate_config
from diffattr.config import feature_sets as config_feature_sets
from diffattr.config import retrain_settings, score_methods
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
    function=r"[a-z0-9.]+",
    K=r"\d+",
    k=r"\d+",
    baseline="|".join(BASELINES),
    # a predictions store: the feature set it was scored on (with _ens<C>: by an ensemble of C
    # retrained models), a pixel baseline, or the retraining pool's first N models (retrain_n<N>)
    scores=r"[a-z0-9.]+_K\d+_k\d+(_ens\d+)?|retrain_n\d+|" + "|".join(BASELINES),


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


def feature_sets(wildcards):
    """(function, K, k) combinations of the experiment's featurization."""
    return config_feature_sets(settings(wildcards)["featurize"])


def baselines(wildcards):
    """The experiment's similarity baselines (score.baselines): raw pixel and CLIP."""
    return score_methods(settings(wildcards)["score"], "baselines")


def embeddings(wildcards):
    """The CLIP embedding stores the experiment's baselines compare, one per split."""
    if not any(METHODS[name].inputs == "embeddings" for name in baselines(wildcards)):
        return []
    return [f"results/{wildcards.experiment}/embeddings/clip/{split}.zarr" for split in ["train", *QUERY_SPLITS]]


def score_stores(wildcards):
    """Names of the experiment's predictions stores (results/<exp>/scores/<name>/<split>.zarr): one
    per feature set, one per baseline, and the retraining-based ones (ensemble.smk, retrain.smk)."""
    return [*(f"{f}_K{K}_k{k}" for f, K, k in feature_sets(wildcards)), *baselines(wildcards),
            *ensemble_stores(wildcards), *retrain_stores(wildcards)]


def products(experiment):
    """Every output of an experiment, intermediate ones included.

    `rule all` asks for all of them: Snakemake regenerates a deleted intermediate file (a model's
    weights, say) only when some target asks for it, and then reruns what depends on it.
    """
    w = SimpleNamespace(experiment=experiment)
    models = ["full", *(f"lds/{m}" for m in lds_models(w))]
    sets = [f"{f}_K{K}_k{k}" for f, K, k in feature_sets(w)]
    return [
        *(f"results/{experiment}/models/{m}/diffusion_pytorch_model.safetensors" for m in models),
        *(f"results/{experiment}/ground_truth/{m}.zarr" for m in lds_models(w)),
        *retrain_products(w),
        *(f"results/{experiment}/features/{s}/{split}.zarr" for s in sets for split in ["train", *QUERY_SPLITS]),
        *embeddings(w),
        *(f"results/{experiment}/scores/{s}/{split}.zarr" for s in score_stores(w) for split in QUERY_SPLITS),
        *(f"results/{experiment}/lds/{s}_{split}.csv" for s in score_stores(w) for split in QUERY_SPLITS),
        f"results/lds_{experiment}.csv",
    ]


def run(script, input, output, params, wildcards, threads, log, **settings_not_params):
    """Run a workflow script in a warm worker. Its `snakemake.config` holds `device` and any
    `settings_not_params`: how a job runs, not what it computes, so changing them (moving a run from a
    CPU to a GPU machine, say) reruns nothing."""
    run_script(SCRIPTS / script, input, output, params, wildcards, threads, log,
               config={"device": config.get("device", "auto"), **settings_not_params})
