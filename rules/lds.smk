# One job per predictions store (a feature set's methods, or a pixel baseline) and query split.
rule lds:
    input:
        predictions="results/{experiment}/scores/{scores}/{qsplit}.zarr",
        subsets="results/{experiment}/subsets.csv",
        truth=lambda w: expand("results/{experiment}/ground_truth/{model}.zarr",
                               experiment=w.experiment, model=lds_models(w)),
    output:
        table="results/{experiment}/lds/{scores}_{qsplit}.csv",
    log:
        "logs/{experiment}/lds/{scores}_{qsplit}.log",
    params:
        spec=lambda w: settings(w)["lds"],
        models=lds_models,
    threads: 1
    run:
        run("lds.py", input, output, params, wildcards, threads, log)
