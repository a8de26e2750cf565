# TRAK / D-TRAK ensembles over C models of the retraining pool (rules/retrain.smk), for each C of
# retrain.ensembles: each model featurizes every train image and the queries for each feature set of
# the featurize grid (extra_grids aside), and the ensemble averages the C kernel score matrices.


def ensemble_sets(wildcards) -> list:
    """The feature sets (diffattr.config.FeatureSet) of the featurize grid itself: the ensembles'."""
    return config_feature_sets({key: value for key, value in settings(wildcards)["featurize"].items()
                                if key != "extra_grids"})


def ensemble_stores(wildcards) -> list[str]:
    """Predictions stores <feature set>_ens<C>, one per feature set and C."""
    sizes = retrain_settings(settings(wildcards))["ensembles"]
    return [f"{fset.name}_ens{c}" for fset in ensemble_sets(wildcards) for c in sizes]


def ensemble_features(wildcards) -> list[str]:
    """Every feature store of the ensembles' models: the largest ensemble's models x sets x splits."""
    largest = max([0, *retrain_settings(settings(wildcards))["ensembles"]])
    return [f"results/{wildcards.experiment}/features/retrain/{m}/{fset.name}/{split}.zarr"
            for m in pool_models(wildcards, largest) for fset in ensemble_sets(wildcards)
            for split in ["train", *QUERY_SPLITS]]


def member_features(wildcards, split) -> list[str]:
    """The features of the ensemble's C models on one split, model by model."""
    return [f"results/{wildcards.experiment}/features/retrain/{m}/{wildcards.fset}/{split}.zarr"
            for m in pool_models(wildcards, wildcards.C)]


# The featurize rule's job (same params and script) on a pool model instead of the full model.
rule featurize_retrained:
    input:
        model="results/{experiment}/models/retrain/{model}/diffusion_pytorch_model.safetensors",
        images=lambda w: images(w.split).format(experiment=w.experiment),
    output:
        features=directory("results/{experiment}/features/retrain/{model}/{fset}/{split}.zarr"),
    log:
        "logs/{experiment}/featurize/retrain/{model}/{fset}_{split}.log",
    params:
        **rules.featurize.params,
    wildcard_constraints:
        fset=FEATURE_SET,  # final weights only: a pool model keeps no training checkpoints
    threads: 1
    resources:
        gpu=GPU_JOB,
    run:
        run("featurize.py", input, output, params, wildcards, threads, log,
            max_pass_items=max_pass_items(wildcards))


rule score_ensemble:
    input:
        train=lambda w: member_features(w, "train"),
        query=lambda w: member_features(w, w.qsplit),
        subsets="results/{experiment}/subsets.csv",
    output:
        predictions=directory("results/{experiment}/scores/{fset}_ens{C}/{qsplit}.zarr"),
    log:
        "logs/{experiment}/score/{fset}_ens{C}_{qsplit}.log",
    params:
        spec=lambda w: {"lambda_exponents": settings(w)["score"]["lambda_exponents"]},
    threads: 1
    wildcard_constraints:
        C=r"\d+",
    run:
        run("ensemble.py", input, output, params, wildcards, threads, log)
