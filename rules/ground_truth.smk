rule ground_truth:
    input:
        weights="results/{experiment}/models/lds/{model}/diffusion_pytorch_model.safetensors",
        training="results/{experiment}/models/lds/{model}/training.json",
        val=images("val"),
        gen=images("gen"),
    output:
        losses=directory("results/{experiment}/ground_truth/{model}.zarr"),
    log:
        "logs/{experiment}/ground_truth/{model}.log",
    params:
        spec=lambda w: settings(w)["ground_truth"],
        model=lambda w: settings(w)["model"],
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("ground_truth.py", input, output, params, wildcards, threads, log)
