def score_spec(wildcards):
    """What a score job is a function of: the lambda grid and the methods on features (the
    schema's default list when the preset names none); the pixel baselines are other jobs."""
    spec = settings(wildcards)["score"]
    return {"lambda_exponents": spec["lambda_exponents"], "methods": score_methods(spec, "methods")}


def score_inputs(wildcards):
    """The features a score job reads: train and query, plus Journey-TRAK's trajectory query features
    and DAS's residual weights where those methods apply to the feature set and split (feature sets
    of the final weights only: the trajectories and residuals are the full model's)."""
    function, _, k, step = parse_feature_set(wildcards.fset)
    features = f"results/{wildcards.experiment}/features/{wildcards.fset}"
    inputs = {"train": f"{features}/train.zarr", "query": f"{features}/{wildcards.qsplit}.zarr",
              "subsets": f"results/{wildcards.experiment}/subsets.csv"}
    if step is None and applies(wildcards, "journey_trak", function, wildcards.qsplit):
        inputs["journey"] = journey_store(wildcards.experiment, function, k)
    if step is None and applies(wildcards, "das", function, wildcards.qsplit):
        inputs["residual"] = f"{features}/train_residual.zarr"
    return inputs


rule score:
    input:
        unpack(score_inputs),
    output:
        predictions=directory("results/{experiment}/scores/{fset}/{qsplit}.zarr"),
    log:
        "logs/{experiment}/score/{fset}_{qsplit}.log",
    params:
        spec=score_spec,
    threads: 1
    run:
        run("score.py", input, output, params, wildcards, threads, log)


# TracInCP and GAS (score.trajectory_methods) of one feature set of the final weights: its features at
# every kept checkpoint its grids list and at the final weights, summed in one predictions store.
rule tracin:
    input:
        train=lambda w: [f"results/{w.experiment}/features/{s}/train.zarr"
                         for s in trajectory_feature_sets(w, w.fset)],
        query=lambda w: [f"results/{w.experiment}/features/{s}/{w.qsplit}.zarr"
                         for s in trajectory_feature_sets(w, w.fset)],
        subsets="results/{experiment}/subsets.csv",
    output:
        predictions=directory("results/{experiment}/scores/{fset}_tracin/{qsplit}.zarr"),
    log:
        "logs/{experiment}/score/{fset}_tracin_{qsplit}.log",
    wildcard_constraints:
        fset=FEATURE_SET,
    params:
        methods=lambda w: score_methods(settings(w)["score"], "trajectory_methods"),
    threads: 1
    run:
        run("tracin.py", input, output, params, wildcards, threads, log)
