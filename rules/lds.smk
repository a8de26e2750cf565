# One job per predictions store (a feature set's methods, or a pixel baseline) and query split.
rule lds:
    input:
        predictions="results/{experiment}/scores/{scores}/{qsplit}.zarr",
        subsets="results/{experiment}/subsets.csv",
        truth=lambda w: expand("results/{experiment}/ground_truth/{model}.zarr",
                               experiment=w.experiment, model=lds_models(w)),
    output:
        table="results/{experiment}/lds/{scores}_{qsplit}.csv",
        # the LDS at every lambda of the grid, none chosen: what the lambda ablations tabulate
        curve="results/{experiment}/lds/{scores}_{qsplit}.lambdas.csv",
    log:
        "logs/{experiment}/lds/{scores}_{qsplit}.log",
    params:
        spec=lambda w: settings(w)["lds"],
        models=lds_models,
    threads: 1
    run:
        run("lds.py", input, output, params, wildcards, threads, log)


# The same against the ground truth of another model-output function (an ablation's gt_function).
use rule lds as lds_other_truth with:
    input:
        predictions="results/{experiment}/scores/{scores}/{qsplit}.zarr",
        subsets="results/{experiment}/subsets.csv",
        truth=lambda w: expand("results/{experiment}/truth_{gt}/ground_truth/{model}.zarr",
                               experiment=w.experiment, gt=w.gt, model=lds_models(w)),
    output:
        table="results/{experiment}/truth_{gt}/lds/{scores}_{qsplit}.csv",
        curve="results/{experiment}/truth_{gt}/lds/{scores}_{qsplit}.lambdas.csv",
    log:
        "logs/{experiment}/truth_{gt}/lds/{scores}_{qsplit}.log",
