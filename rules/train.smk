def train_spec(wildcards, steps_key):
    """What a model is a function of. `checkpoint_every` is left out (passed to `run` beside it): a
    param change reruns the job, and changing how often checkpoints are saved must not retrain.
    `keep_checkpoints` concerns the full model only. A speed option (train.channels_last, train.compile)
    is a param only when set to true: without it, or false, the params are those of a training without
    the option, so adding it to the schema or a config reruns no finished training."""
    spec = settings(wildcards)
    unused = ("checkpoint_every",) if steps_key == "full_steps" else ("checkpoint_every", "keep_checkpoints")
    train = {key: value for key, value in without_unset_speed_options(spec["train"]).items() if key not in unused}
    return {**train, "steps": spec["train"][steps_key], "model": spec["model"]}


def checkpoint_every(wildcards) -> int:
    return settings(wildcards)["train"].get("checkpoint_every", 0)


rule train_full:
    input:
        unpack(lambda w: plan(w).train_inputs()),
    output:
        **model_files(pattern("full_model")),
        # the weights after each step of train.keep_checkpoints: trajectory/step<S>/ (diffattr.train)
        trajectory=directory(PATHS["trajectory"]),
    log:
        "logs/{experiment}/train/full.log",
    benchmark:
        benchmark("logs/{experiment}/train/full.log")
    params:
        spec=lambda w: train_spec(w, "full_steps"),
        subset=None,
        seed=0,
    threads: threads("train")
    resources:
        gpu=GPU_JOB,
    run:
        run("train.py", input, output, params, wildcards, threads, log,
            checkpoint_every=checkpoint_every(wildcards))


rule train_lds:
    input:
        unpack(lambda w: plan(w).train_inputs()),
        subsets=PATHS["subsets"],
    output:
        **model_files(pattern("model", family="lds")),
    log:
        "logs/{experiment}/train/{model}.log",
    benchmark:
        benchmark("logs/{experiment}/train/{model}.log")
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
