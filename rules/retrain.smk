# The retraining pool (settings under `retrain:`): model j trained on its own random subset j,
# drawn apart from the LDS subsets (results/<exp>/retrain/subsets.csv); its outputs on the queries
# come from rule ground_truth (model wildcard retrain/<name>). Empirical IF and Datamodel over the
# first N models, for each N of retrain.n_models. The ensembles over the same pool: ensemble.smk.


def pool_models(wildcards, count=None) -> list[str]:
    """The first `count` (default all) pool models' names, s<subset>-r<retrain.train_seed>."""
    spec = retrain_settings(settings(wildcards))
    count = spec["pool"] if count is None else int(count)
    if count > spec["pool"]:
        raise ConfigError(f"experiments.{wildcards.experiment}.retrain: a target needs {count} retrained "
                          f"models, but the pool has {spec['pool']} (the largest of retrain.n_models "
                          f"{spec['n_models']} and retrain.ensembles {spec['ensembles']})")
    return [f"s{j:03d}-r{int(spec['train_seed'])}" for j in range(count)]


def retrain_stores(wildcards) -> list[str]:
    """Predictions stores of Empirical IF and Datamodel: retrain_n<N> for each N of retrain.n_models."""
    return [f"retrain_n{n}" for n in retrain_settings(settings(wildcards))["n_models"]]


def retrain_products(wildcards) -> list[str]:
    """The pool's models, the outputs Empirical IF and Datamodel need, the ensembles' features."""
    spec = retrain_settings(settings(wildcards))
    root = f"results/{wildcards.experiment}"
    return [*(f"{root}/models/retrain/{m}/diffusion_pytorch_model.safetensors" for m in pool_models(wildcards)),
            *(f"{root}/ground_truth/retrain/{m}.zarr" for m in pool_models(wildcards, max([0, *spec["n_models"]]))),
            *ensemble_features(wildcards)]


def pool_subsets_spec(wildcards) -> dict:
    """The pool's subsets as the subsets job draws them: `pool` subsets of retrain.alpha n images."""
    spec = retrain_settings(settings(wildcards))
    return {"m": spec["pool"], "alpha": spec["alpha"], "seed": spec["seed"]}


rule retrain_subsets:
    input:
        train_index="results/{experiment}/data/train.csv",
    output:
        table="results/{experiment}/retrain/subsets.csv",
    log:
        "logs/{experiment}/retrain/subsets.log",
    params:
        spec=pool_subsets_spec,
    threads: 1
    run:
        run("subsets.py", input, output, params, wildcards, threads, log)


rule train_retrain:
    input:
        images="results/{experiment}/data/train.zarr",
        subsets="results/{experiment}/retrain/subsets.csv",
    output:
        **model_files("results/{experiment}/models/retrain/{model}"),
    log:
        "logs/{experiment}/train/retrain/{model}.log",
    params:
        spec=lambda w: train_spec(w, "lds_steps"),
        subset=lambda w: int(w.model[1:4]),
        seed=lambda w: int(w.model.split("-r")[1]),
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("train.py", input, output, params, wildcards, threads, log,
            checkpoint_every=checkpoint_every(wildcards))


rule retrain_score:
    input:
        outputs=lambda w: [f"results/{w.experiment}/ground_truth/retrain/{m}.zarr" for m in pool_models(w, w.N)],
        pool_subsets="results/{experiment}/retrain/subsets.csv",
        subsets="results/{experiment}/subsets.csv",
        train_index="results/{experiment}/data/train.csv",
    output:
        predictions=directory("results/{experiment}/scores/retrain_n{N}/{qsplit}.zarr"),
    log:
        "logs/{experiment}/score/retrain_n{N}_{qsplit}.log",
    params:
        spec=lambda w: {key: retrain_settings(settings(w))[key] for key in ("methods", "datamodel_alpha_exponents")},
        models=lambda w: pool_models(w, w.N),
    threads: 1
    wildcard_constraints:
        N=r"\d+",
    run:
        run("retrain.py", input, output, params, wildcards, threads, log)
