def score_spec(wildcards):
    """What a score job is a function of: the lambda grid and the methods on features (the
    schema's default list when the preset names none); the pixel baselines are other jobs."""
    spec = settings(wildcards)["score"]
    return {"lambda_exponents": spec["lambda_exponents"], "methods": score_methods(spec, "methods")}


rule score:
    input:
        train="results/{experiment}/features/{function}_K{K}_k{k}/train.zarr",
        query="results/{experiment}/features/{function}_K{K}_k{k}/{qsplit}.zarr",
        subsets="results/{experiment}/subsets.csv",
    output:
        predictions=directory("results/{experiment}/scores/{function}_K{K}_k{k}/{qsplit}.zarr"),
    log:
        "logs/{experiment}/score/{function}_K{K}_k{k}_{qsplit}.log",
    params:
        spec=score_spec,
    threads: 1
    run:
        run("score.py", input, output, params, wildcards, threads, log)
