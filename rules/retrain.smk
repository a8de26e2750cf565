# The retraining pool (settings under `retrain:`): model j trained on its own random subset j,
# drawn apart from the LDS subsets (results/<exp>/retrain/subsets.csv); its outputs on the queries
# come from rule ground_truth (model wildcard retrain/<name>). Empirical IF and Datamodel over the
# first N models, for each N of retrain.n_models. The ensembles over the same pool: ensemble.smk.


def pool_subsets_spec(wildcards) -> dict:
    """The pool's subsets as the subsets job draws them: `pool` subsets of retrain.alpha n images."""
    spec = plan(wildcards).retrain
    return {"m": spec["pool"], "alpha": spec["alpha"], "seed": spec["seed"]}


rule retrain_subsets:
    input:
        train_index=pattern("index", split="train"),
    output:
        table=PATHS["pool_subsets"],
    log:
        "logs/{experiment}/retrain/subsets.log",
    benchmark:
        benchmark("logs/{experiment}/retrain/subsets.log")
    params:
        spec=pool_subsets_spec,
    threads: 1
    run:
        run("subsets.py", input, output, params, wildcards, threads, log)


rule train_retrain:
    input:
        unpack(lambda w: plan(w).train_inputs()),
        subsets=PATHS["pool_subsets"],
    output:
        **model_files(pattern("model", family="retrain")),
    log:
        "logs/{experiment}/train/retrain/{model}.log",
    benchmark:
        benchmark("logs/{experiment}/train/retrain/{model}.log")
    params:
        spec=lambda w: train_spec(w, "lds_steps"),
        subset=lambda w: ModelName.parse(w.model).subset,
        seed=lambda w: ModelName.parse(w.model).seed,
    threads: threads("train")
    resources:
        gpu=GPU_JOB,
    run:
        run("train.py", input, output, params, wildcards, threads, log,
            checkpoint_every=checkpoint_every(wildcards))


rule retrain_score:
    input:
        outputs=lambda w: [PATHS["ground_truth"].format(root=truth_root(w.experiment), model=f"retrain/{m}")
                           for m in plan(w).pool_models(w.N)],
        pool_subsets=PATHS["pool_subsets"],
        subsets=PATHS["subsets"],
        train_index=pattern("index", split="train"),
    output:
        predictions=directory(pattern("scores", scores="retrain_n{N}")),
    log:
        "logs/{experiment}/score/retrain_n{N}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/score/retrain_n{N}_{qsplit}.log")
    params:
        spec=lambda w: {key: plan(w).retrain[key] for key in ("methods", "datamodel_alpha_exponents")},
        models=lambda w: plan(w).pool_models(w.N),
    threads: threads("score")
    wildcard_constraints:
        N=r"\d+",
    run:
        run("retrain.py", input, output, params, wildcards, threads, log)
