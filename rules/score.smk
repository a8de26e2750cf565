def score_spec(wildcards):
    """What a score job is a function of: the lambda grid and the methods on features (the
    schema's default list when the preset names none); the baselines are other jobs."""
    spec = settings(wildcards)["score"]
    return {"lambda_exponents": spec["lambda_exponents"], "methods": plan(wildcards).methods("features")}


def score_inputs(wildcards):
    """The features a score job reads (train and query), the subsets, and the extra inputs of the
    methods that apply to the feature set and split (diffattr.plan.Plan.extra_inputs)."""
    fset, experiment = FeatureSet.parse(wildcards.fset), plan(wildcards)
    return {"train": experiment.features(fset, "train"), "query": experiment.features(fset, wildcards.qsplit),
            "subsets": pattern("subsets", experiment=wildcards.experiment),
            **experiment.extra_inputs(fset, wildcards.qsplit)}


rule score:
    input:
        unpack(score_inputs),
    output:
        predictions=directory(pattern("scores", scores="{fset}")),
    log:
        "logs/{experiment}/score/{fset}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/score/{fset}_{qsplit}.log")
    params:
        spec=score_spec,
    threads: threads("score")
    run:
        run("score.py", input, output, params, wildcards, threads, log)


def trajectory_features(split=None):
    """An input function: the features of `split` (by default the job's query split) that a TracInCP /
    GAS store of the final weights' set {fset} sums over, at each kept checkpoint, then the final."""
    def paths(w):
        fset = FeatureSet.parse(w.fset)
        steps = [*plan(w).checkpoint_steps(fset), None]
        return [plan(w).features(fset.at_step(step), split or w.qsplit) for step in steps]

    return paths


# TracInCP and GAS (score.trajectory_methods) of one feature set of the final weights: its features at
# every kept checkpoint its grids list and at the final weights, summed in one predictions store.
rule tracin:
    input:
        train=trajectory_features("train"),
        query=trajectory_features(),
        subsets=PATHS["subsets"],
    output:
        predictions=directory(pattern("scores", scores="{fset}_tracin")),
    log:
        "logs/{experiment}/score/{fset}_tracin_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/score/{fset}_tracin_{qsplit}.log")
    wildcard_constraints:
        fset=FEATURE_SET,
    params:
        methods=lambda w: plan(w).methods("trajectory"),
    threads: threads("score")
    run:
        run("tracin.py", input, output, params, wildcards, threads, log)
