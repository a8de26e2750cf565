rule lds:
    input:
        predictions="results/{experiment}/scores/{function}_K{K}_k{k}/{qsplit}.zarr",
        subsets="results/{experiment}/subsets.csv",
        truth=lambda w: expand("results/{experiment}/ground_truth/{model}.zarr",
                               experiment=w.experiment, model=lds_models(w)),
    output:
        table="results/{experiment}/lds/{function}_K{K}_k{k}_{qsplit}.csv",
    log:
        "logs/{experiment}/lds/{function}_K{K}_k{k}_{qsplit}.log",
    params:
        spec=lambda w: settings(w)["lds"],
        models=lds_models,
    threads: 1
    run:
        run("lds.py", input, output, params, wildcards, threads, log)
