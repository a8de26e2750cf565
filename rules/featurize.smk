def featurize_spec(wildcards):
    """What a feature store is a function of besides its model, images and timesteps: the featurize
    settings shared by every set (not the grids, so that adding a set reruns no other) and the set's
    own scheme and noises per timestep, read from its name. `max_pass_items` is left out (passed to
    `run` beside it): it bounds memory and changes values only by float rounding, so changing it must
    not recompute."""
    # `projector` only where set and `dtype` only when not fp32: stores of the default projection and
    # arithmetic keep their params (no rerun)
    shared = featurize_params(settings(wildcards)["featurize"])
    if "fset" not in wildcards.keys():  # journey features: the sampler's timesteps and noise
        return shared
    fset = FeatureSet.parse(wildcards.fset)
    return {**shared, "scheme": fset.scheme, "noises": fset.noises}


def calibration(wildcards):
    """The train split's store, for a factorized projection split by gradient norms: every job of a
    feature set measures the norms on the same train images (diffattr.featurize.gradient_norms)."""
    if factor_split(settings(wildcards)["featurize"]) != "norm":
        return {}
    return {"calibration": plan(wildcards).samples("train")}


def max_pass_items(wildcards):
    """featurize.max_pass_items, for every job that computes gradient features (passed to `run`, not
    a param: see featurize_spec)."""
    return settings(wildcards)["featurize"].get("max_pass_items")


def featurize_timesteps(wildcards):
    return FeatureSet.parse(wildcards.fset).timesteps(plan(wildcards).num_train_timesteps)


def featurize_model(wildcards):
    """The weights a feature set is computed from: the full model's, or for `_step<S>` the folder of
    its kept training checkpoints (a step the experiment does not keep stops the plan here)."""
    step = FeatureSet.parse(wildcards.fset).step
    if step is None:
        return pattern("full_model", experiment=wildcards.experiment) + "/" + ARTIFACTS["weights"]
    train = settings(wildcards)["train"]
    if step not in train.get("keep_checkpoints", []) or step >= train["full_steps"]:
        raise ConfigError(f"{wildcards.fset}: experiments.{wildcards.experiment} keeps no weights of step "
                          f"{step}; expected one of train.keep_checkpoints below train.full_steps "
                          f"({[s for s in train.get('keep_checkpoints', []) if s < train['full_steps']]})")
    return pattern("trajectory", experiment=wildcards.experiment)


rule featurize:
    input:
        unpack(calibration),
        model=featurize_model,
        images=samples(),
    output:
        features=directory(PATHS["features"]),
    log:
        "logs/{experiment}/featurize/{fset}_{split}.log",
    benchmark:
        benchmark("logs/{experiment}/featurize/{fset}_{split}.log")
    params:
        spec=featurize_spec,
        model=lambda w: settings(w)["model"],
        timesteps=featurize_timesteps,
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("featurize.py", input, output, params, wildcards, threads, log,
            max_pass_items=max_pass_items(wildcards))


# Journey-TRAK's query features (diffattr.journey): gradients along each generated image's regenerated
# DDIM trajectory; one store per (function, k), shared by the feature sets of every K.
rule featurize_journey:
    input:
        unpack(calibration),
        weights=pattern("full_model") + "/" + ARTIFACTS["weights"],
        images=samples("gen"),
    output:
        features=directory(PATHS["journey"]),
    log:
        "logs/{experiment}/featurize/{function}_journey_k{k}_gen.log",
    benchmark:
        benchmark("logs/{experiment}/featurize/{function}_journey_k{k}_gen.log")
    params:
        spec=featurize_spec,
        model=lambda w: settings(w)["model"],
        generate=lambda w: settings(w)["generate"],
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("featurize_journey.py", input, output, params, wildcards, threads, log,
            max_pass_items=max_pass_items(wildcards))


# DAS's residual weights of the train split under the full model (diffattr.das), at the feature
# set's timesteps and noises; forward passes only, batched as the ground truth's.
rule residual:
    input:
        weights=pattern("full_model") + "/" + ARTIFACTS["weights"],
        images=samples("train"),
    output:
        residuals=directory(PATHS["residual"]),
    log:
        "logs/{experiment}/featurize/{fset}_train_residual.log",
    benchmark:
        benchmark("logs/{experiment}/featurize/{fset}_train_residual.log")
    wildcard_constraints:
        fset=FEATURE_SET,
    params:
        noise_seed=lambda w: settings(w)["featurize"]["noise_seed"],
        batch_size=lambda w: settings(w)["ground_truth"]["batch_size"],
        model=lambda w: settings(w)["model"],
        timesteps=featurize_timesteps,
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("residual.py", input, output, params, wildcards, threads, log)
