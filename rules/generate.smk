rule generate:
    input:
        **model_files("results/{experiment}/models/full"),
    output:
        images=directory("results/{experiment}/generated/gen.zarr"),
    log:
        "logs/{experiment}/generate.log",
    params:
        spec=lambda w: settings(w)["generate"],
        model=lambda w: settings(w)["model"],
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("generate.py", input, output, params, wildcards, threads, log)
