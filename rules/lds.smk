def truth_stores(wildcards):
    """The ground truth of every LDS model, for the L_Simple root or the {gt} of the target."""
    root = truth_root(wildcards.experiment, wildcards.get("gt", DEFAULT_GT_FUNCTION))
    return [PATHS["ground_truth"].format(root=root, model=m) for m in plan(wildcards).lds_models]


# One job per predictions store (a feature set's methods, or a baseline) and query split.
rule lds:
    input:
        predictions=PATHS["scores"],
        subsets=PATHS["subsets"],
        truth=truth_stores,
    output:
        table=pattern("lds", root=TRUTH_ROOT),
        # the LDS at every lambda of the grid, none chosen: what the lambda ablations tabulate
        curve=pattern("lds_curve", root=TRUTH_ROOT),
    log:
        "logs/{experiment}/lds/{scores}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/lds/{scores}_{qsplit}.log")
    params:
        spec=lambda w: settings(w)["lds"],
        models=lambda w: plan(w).lds_models,
    threads: threads("lds")
    run:
        run("lds.py", input, output, params, wildcards, threads, log)


# The same against the ground truth of another model-output function (an ablation's gt_function).
use rule lds as lds_other_truth with:
    output:
        table=pattern("lds", root=OTHER_TRUTH_ROOT),
        curve=pattern("lds_curve", root=OTHER_TRUTH_ROOT),
    log:
        "logs/{experiment}/truth_{gt}/lds/{scores}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/truth_{gt}/lds/{scores}_{qsplit}.log")
