# TRAK / D-TRAK ensembles over C models of the retraining pool (rules/retrain.smk), for each C of
# retrain.ensembles: each model featurizes every train image and the queries for each feature set of
# the featurize grid (extra_grids aside), and the ensemble averages the C kernel score matrices.


def member_features(split=None):
    """An input function: the features of the ensemble's C models on `split` (by default the job's
    query split), model by model."""
    return lambda w: [PATHS["pool_features"].format(experiment=w.experiment, model=m, fset=w.fset,
                                                    split=split or w.qsplit)
                      for m in plan(w).pool_models(w.C)]


# The featurize rule's job (same params and script) on a pool model instead of the full model.
rule featurize_retrained:
    input:
        unpack(calibration),
        model=pattern("model", family="retrain") + "/" + ARTIFACTS["weights"],
        images=samples(),
    output:
        features=directory(PATHS["pool_features"]),
    log:
        "logs/{experiment}/featurize/retrain/{model}/{fset}_{split}.log",
    benchmark:
        benchmark("logs/{experiment}/featurize/retrain/{model}/{fset}_{split}.log")
    params:
        **rules.featurize.params,
    wildcard_constraints:
        fset=FEATURE_SET,  # final weights only: a pool model keeps no training checkpoints
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("featurize.py", input, output, params, wildcards, threads, log,
            max_pass_items=max_pass_items(wildcards))


rule score_ensemble:
    input:
        train=member_features("train"),
        query=member_features(),
        subsets=PATHS["subsets"],
    output:
        predictions=directory(pattern("scores", scores="{fset}_ens{C}")),
    log:
        "logs/{experiment}/score/{fset}_ens{C}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/score/{fset}_ens{C}_{qsplit}.log")
    params:
        spec=lambda w: {"lambda_exponents": settings(w)["score"]["lambda_exponents"]},
    threads: threads("score")
    wildcard_constraints:
        C=r"\d+",
    run:
        run("ensemble.py", input, output, params, wildcards, threads, log)
