def featurize_spec(wildcards):
    """What features are a function of. `max_pass_items` is left out (passed to `run` beside it): it
    bounds memory and changes values only by float rounding, so changing it must not recompute."""
    return {key: value for key, value in settings(wildcards)["featurize"].items() if key != "max_pass_items"}


rule featurize:
    input:
        weights="results/{experiment}/models/full/diffusion_pytorch_model.safetensors",
        images=lambda w: images(w.split).format(experiment=w.experiment),
    output:
        features=directory("results/{experiment}/features/{function}_K{K}_k{k}/{split}.zarr"),
    log:
        "logs/{experiment}/featurize/{function}_K{K}_k{k}_{split}.log",
    params:
        spec=featurize_spec,
        model=lambda w: settings(w)["model"],
        timesteps=lambda w: select_timesteps(int(w.K), settings(w)["featurize"]["scheme"],
                                             num_train_timesteps(w)),
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("featurize.py", input, output, params, wildcards, threads, log,
            max_pass_items=settings(wildcards)["featurize"].get("max_pass_items"))
