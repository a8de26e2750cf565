# Shared helpers: experiment settings, path builders and the warm-worker script runner.
from pathlib import Path

from diffattr.config import experiment, select_timesteps
from diffattr.worker import run_script

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
QUERY_SPLITS = ["val", "gen"]


wildcard_constraints:
    experiment=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    model=r"s\d{3}-r\d+",
    split=r"train|val|gen",
    qsplit=r"val|gen",
    function=r"[a-z0-9.]+",
    K=r"\d+",
    k=r"\d+",


def settings(wildcards):
    return experiment(config, wildcards.experiment)


def lds_models(wildcards):
    """Model names s<subset>-r<training seed>, one per (subset, seed)."""
    spec = settings(wildcards)["subsets"]
    return [f"s{j:03d}-r{seed}" for j in range(spec["m"]) for seed in spec["train_seeds"]]


def model_files(directory):
    return {
        "weights": f"{directory}/diffusion_pytorch_model.safetensors",
        "config": f"{directory}/config.json",
        "loss_log": f"{directory}/train_log.csv",
    }


def images(split):
    """Image store of a split: the dataset's train/val, or the generation set."""
    if split == "gen":
        return "results/{experiment}/generated/gen.zarr"
    return f"results/{{experiment}}/data/{split}.zarr"


def feature_sets(wildcards):
    """(function, K, k) combinations of the experiment's featurization."""
    spec = settings(wildcards)["featurize"]
    return [(f, K, k) for f in spec["functions"] for K in spec["timesteps"] for k in spec["proj_dims"]]


def run(script, input, output, params, wildcards, threads, log):
    run_script(SCRIPTS / script, input, output, params, wildcards, threads, log)
