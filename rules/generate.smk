rule generate:
    input:
        **model_files(pattern("full_model")),
    output:
        images=directory(PATHS["generated"]),
    log:
        "logs/{experiment}/generate.log",
    benchmark:
        benchmark("logs/{experiment}/generate.log")
    params:
        spec=lambda w: settings(w)["generate"],
        model=lambda w: settings(w)["model"],
    threads: threads("generate")
    resources:
        gpu=GPU_JOB,
    run:
        run("generate.py", input, output, params, wildcards, threads, log)
