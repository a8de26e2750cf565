def train_spec(wildcards, steps_key):
    spec = settings(wildcards)
    return {**spec["train"], "steps": spec["train"][steps_key], "model": spec["model"]}


rule train_full:
    input:
        images="results/{experiment}/data/train.zarr",
    output:
        **model_files("results/{experiment}/models/full"),
    log:
        "logs/{experiment}/train/full.log",
    params:
        spec=lambda w: train_spec(w, "full_steps"),
        subset=None,
        seed=0,
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("train.py", input, output, params, wildcards, threads, log)


rule train_lds:
    input:
        images="results/{experiment}/data/train.zarr",
        subsets="results/{experiment}/subsets.csv",
    output:
        **model_files("results/{experiment}/models/lds/{model}"),
    log:
        "logs/{experiment}/train/{model}.log",
    params:
        spec=lambda w: train_spec(w, "lds_steps"),
        subset=lambda w: int(w.model[1:4]),
        seed=lambda w: int(w.model.split("-r")[1]),
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("train.py", input, output, params, wildcards, threads, log)
