# Raw-pixel baselines (score.baselines): the flattened train images against one query split's, in a
# predictions store of the same layout as a score job's (diffattr.methods).
rule baseline:
    input:
        train=images("train"),
        query=lambda w: images(w.qsplit).format(experiment=w.experiment),
        subsets="results/{experiment}/subsets.csv",
    output:
        predictions=directory("results/{experiment}/scores/{baseline}/{qsplit}.zarr"),
    log:
        "logs/{experiment}/baseline/{baseline}_{qsplit}.log",
    threads: 1
    run:
        run("baseline.py", input, output, params, wildcards, threads, log)
