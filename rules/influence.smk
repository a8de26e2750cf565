# K-FAC / EK-FAC influence functions (diffattr.kfac): the GGN's per-layer factors of the full model on
# the train split, then each split's preconditioned gradients, then one predictions store per measurement.
from diffattr.protocol import INFLUENCE_STORE, parse_influence_store, select_timesteps


def influence_spec(wildcards):
    """The preset's influence settings (schema defaults filled in), the featurizer's seeds and its
    arithmetic when not fp32 (featurize_params: absent and fp32 keep a finished job's params)."""
    spec = plan(wildcards).influence
    featurize = featurize_params(settings(wildcards)["featurize"])
    return {**spec, **{key: featurize[key] for key in ("proj_seed", "noise_seed", "dtype") if key in featurize}}


rule curvature:
    input:
        weights=pattern("full_model") + "/" + ARTIFACTS["weights"],
        images=samples("train"),
    output:
        curvature=PATHS["curvature"],
    log:
        "logs/{experiment}/influence/curvature.log",
    benchmark:
        benchmark("logs/{experiment}/influence/curvature.log")
    params:
        spec=lambda w: {key: plan(w).influence[key] for key in ("samples", "fisher", "seed", "batch_size")},
        model=lambda w: settings(w)["model"],
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("curvature.py", input, output, params, wildcards, threads, log)


rule influence_features:
    input:
        weights=pattern("full_model") + "/" + ARTIFACTS["weights"],
        images=samples(),
        curvature=PATHS["curvature"],
    output:
        features=directory(PATHS["influence_features"]),
    log:
        "logs/{experiment}/influence/{istore}_{split}.log",
    benchmark:
        benchmark("logs/{experiment}/influence/{istore}_{split}.log")
    wildcard_constraints:
        istore=INFLUENCE_STORE,
    params:
        spec=lambda w: {key: value for key, value in influence_spec(w).items()
                        if key in ("dampings", "proj_dim", "batch_size", "proj_seed", "noise_seed", "dtype")},
        model=lambda w: settings(w)["model"],
        timesteps=lambda w: select_timesteps(parse_influence_store(w.istore)[1], "uniform",
                                             plan(w).num_train_timesteps),
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("influence_features.py", input, output, params, wildcards, threads, log,
            max_pass_items=max_pass_items(wildcards))


rule influence_score:
    input:
        train=lambda w: PATHS["influence_features"].format(experiment=w.experiment, istore=plan(w).influence_train(),
                                                           split="train"),
        query=pattern("influence_features", split="{qsplit}"),
        subsets=PATHS["subsets"],
    output:
        predictions=directory(pattern("scores", scores="{istore}")),
    log:
        "logs/{experiment}/score/{istore}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/score/{istore}_{qsplit}.log")
    wildcard_constraints:
        istore=INFLUENCE_STORE,
    params:
        methods=lambda w: plan(w).methods("influence"),
    threads: threads("score")
    run:
        run("influence_score.py", input, output, params, wildcards, threads, log)
