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
        spec=lambda w: settings(w)["score"],
    threads: 1
    run:
        run("score.py", input, output, params, wildcards, threads, log)
