rule featurize:
    input:
        weights="results/{experiment}/models/full/diffusion_pytorch_model.safetensors",
        images=lambda w: images(w.split).format(experiment=w.experiment),
    output:
        features=directory("results/{experiment}/features/{function}_K{K}_k{k}/{split}.zarr"),
    log:
        "logs/{experiment}/featurize/{function}_K{K}_k{k}_{split}.log",
    params:
        spec=lambda w: settings(w)["featurize"],
        model=lambda w: settings(w)["model"],
        timesteps=lambda w: select_timesteps(int(w.K), settings(w)["featurize"]["scheme"],
                                             num_train_timesteps(w)),
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("featurize.py", input, output, params, wildcards, threads, log)
