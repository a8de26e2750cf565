def evaluated_model(wildcards) -> str:
    """The folder of the model a ground truth job evaluates: models/lds/<model> for an LDS model, and
    models/retrain/<name> for a model of the retraining pool (model wildcard `retrain/<name>`)."""
    family, _, name = wildcards.model.rpartition("/")
    return PATHS["model"].format(experiment=wildcards.experiment, family=family or "lds", model=name)


def ground_truth_spec(wildcards) -> dict:
    """ground_truth's settings; a pool model's outputs use retrain.timesteps and retrain.noise_seeds."""
    spec = settings(wildcards)["ground_truth"]
    if wildcards.model.startswith("retrain/"):
        retrain = plan(wildcards).retrain
        spec.update(timesteps=retrain["timesteps"], noise_seeds=retrain["noise_seeds"])
    return spec


# Each query's L_Simple under a model trained on a subset: the LDS ground truth, and the outputs of
# the retraining pool's models that Empirical IF and Datamodel fit (rules/retrain.smk).
rule ground_truth:
    input:
        weights=lambda w: f"{evaluated_model(w)}/{ARTIFACTS['weights']}",
        training=lambda w: f"{evaluated_model(w)}/{ARTIFACTS['training']}",
        val=samples("val"),
        gen=samples("gen"),
    output:
        losses=directory(pattern("ground_truth", root=TRUTH_ROOT)),
    log:
        "logs/{experiment}/ground_truth/{model}.log",
    benchmark:
        benchmark("logs/{experiment}/ground_truth/{model}.log")
    params:
        spec=ground_truth_spec,
        model=lambda w: settings(w)["model"],
    threads: threads("ground_truth")
    resources:
        gpu=GPU_JOB,
    wildcard_constraints:
        model=f"(retrain/)?{MODEL_NAME}",
    run:
        run("ground_truth.py", input, output, params, wildcards, threads, log)


# The ground-truth ablation: another model-output function's value in place of L_Simple, averaged
# the same way, in stores of its own (results/<exp>/truth_<function>/).
use rule ground_truth as ground_truth_other_function with:
    output:
        losses=directory(pattern("ground_truth", root=OTHER_TRUTH_ROOT)),
    log:
        "logs/{experiment}/truth_{gt}/ground_truth/{model}.log",
    benchmark:
        benchmark("logs/{experiment}/truth_{gt}/ground_truth/{model}.log")
    params:
        spec=lambda w: {**settings(w)["ground_truth"], "function": w.gt},
        model=lambda w: settings(w)["model"],
