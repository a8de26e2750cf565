# Shared by every rule: the config checked at the door, the experiment's plan (diffattr.plan: every
# name, path and product), the GPU resource and the warm-worker runner.
import copy
import os
from pathlib import Path
from types import SimpleNamespace

from diffattr.methods import METHODS, methods_reading
from diffattr.plan import (CIFAR10_ARCHIVE, OTHER_TRUTH_ROOT, PATHS, QUERY_SPLITS, SPLITS, TRUTH_ROOT, Plan,
                           truth_root)
from diffattr.protocol import (ARTIFACTS, DEFAULT_GT_FUNCTION, FEATURE_SET, FEATURE_SET_ANY, INFLUENCE_STORE,
                               MODEL_NAME, FeatureSet, ModelName, factor_split, featurize_params,
                               without_unset_speed_options)
from diffattr.settings import ConfigError, undefined_preset, validate_config
from diffattr.worker import run_script

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"

# The config is checked before any job is planned: the top level against the schema
# (workflow/schemas/config.schema.yaml) with snakemake.utils.validate, then every preset merged with
# its `base:` chain. One line per fault: `experiments.<name>.<key>: got <value>; expected <what>`.
# The model blocks passed to library classes (model.unet -> diffusers' UNet2DModel, ...) are held to
# those classes in the main process only: that imports torch and diffusers (seconds), and each job's
# process (one per job under SLURM) runs on the config the main process checked.
EXPERIMENTS = validate_config(config, libraries=workflow.is_main_process)


wildcard_constraints:
    experiment=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    model=MODEL_NAME,
    split="|".join(SPLITS),
    qsplit="|".join(QUERY_SPLITS),
    baseline="|".join(methods_reading("pixels", "embeddings")),
    function=r"[a-z0-9.]+",
    k=r"\d+",
    # a feature set (diffattr.protocol.FeatureSet), with _step{S} for a kept checkpoint's features
    fset=FEATURE_SET_ANY,
    # a predictions store (diffattr.plan.Plan.score_stores): a feature set's, <set>_ens<C> (an ensemble
    # of C retrained models), <set>_tracin (TracInCP / GAS), a baseline, retrain_n<N>, or an influence store
    scores=f"{FEATURE_SET_ANY}|{FEATURE_SET}_ens\\d+|{FEATURE_SET}_tracin|retrain_n\\d+|{INFLUENCE_STORE}|"
    + "|".join(methods_reading("pixels", "embeddings")),
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
_PLANS = {}


def plan(wildcards) -> Plan:
    """The plan of the target's experiment."""
    name = wildcards.experiment
    if name not in EXPERIMENTS:
        raise ConfigError(undefined_preset("the target's experiment", name, EXPERIMENTS))
    if name not in _PLANS:
        _PLANS[name] = Plan(name, EXPERIMENTS[name], config.get("cifar10_path"))
    return _PLANS[name]


def settings(wildcards):
    """The resolved settings of the target's experiment (a copy: rules may edit it)."""
    return copy.deepcopy(plan(wildcards).settings)


def model_files(directory):
    """A trained model's files (diffattr.models.ARTIFACTS), as a train rule's outputs."""
    return {key: f"{directory}/{name}" for key, name in ARTIFACTS.items()}


def pattern(kind, **fixed):
    """The path template PATHS[kind] (diffattr.plan) with the `fixed` fields filled in and the others
    left as wildcards: a rule's input or output pattern."""
    out = PATHS[kind]
    for name, value in fixed.items():
        out = out.replace("{" + name + "}", str(value))
    return out


def images(split=None):
    """An input function: the image store of `split` (the data's train / val, or the generation set),
    by default of the job's {split}."""
    return lambda w: plan(w).images(split or w.split)


def samples(split=None):
    """An input function: the store of `split` that models read (Plan.samples: its images, or a latent
    kind's latents), by default of the job's {split}."""
    return lambda w: plan(w).samples(split or w.split)


def threads(stage):
    """A rule's `threads`: the experiment's threads.<stage>, which the job's torch and BLAS use
    (diffattr.worker) and the SLURM profile requests as CPUs."""
    return lambda w: plan(w).threads(stage)


def benchmark(log):
    """Where a job's `benchmark:` table goes: its log's path under results/benchmarks/."""
    return "results/benchmarks/" + log.removeprefix("logs/").removesuffix(".log") + ".tsv"


def products(experiment):
    """Every output of an experiment (diffattr.plan.Plan.products)."""
    return plan(SimpleNamespace(experiment=experiment)).products()


def run(script, input, output, params, wildcards, threads, log, **settings_not_params):
    """Run a workflow script in a warm worker. Its `snakemake.config` holds `device`, `compile_cache`
    and any `settings_not_params`: how a job runs, not what it computes, so changing them (moving a
    run from a CPU to a GPU machine, say) reruns nothing."""
    run_script(SCRIPTS / script, input, output, params, wildcards, threads, log,
               config={"device": config.get("device", "auto"), "compile_cache": config.get("compile_cache"),
                       **settings_not_params})
