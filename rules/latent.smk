# A latent kind's own jobs (diffattr.latent): the embedded base it trains when model.pretrained is null,
# the VAE latents of the data's splits (encoded once, read by every training, ground truth and feature
# job), and the images of the generation set (read by the pixel / CLIP baselines and the galleries).


def base_model(wildcards):
    """The base's folder, as the encode jobs' input. A model.pretrained that is not a Stable Diffusion
    directory stops the workflow here, before any job runs, with one line naming the key, what the
    folder must hold and the command that fetches miniSD (diffattr.sd_stack.check_pretrained)."""
    from diffattr.sd_stack import check_pretrained

    experiment = plan(wildcards)
    if not experiment.builds_base() and (fault := check_pretrained(experiment.base())):
        raise FileNotFoundError(f"experiments.{wildcards.experiment}.{fault}")
    return experiment.base()


rule base:
    output:
        base=directory(PATHS["base"]),
    log:
        "logs/{experiment}/base.log",
    benchmark:
        benchmark("logs/{experiment}/base.log")
    params:
        model=lambda w: {key: value for key, value in settings(w)["model"].items() if key != "pretrained"},
        dataset=lambda w: settings(w)["dataset"],
    threads: threads("base")
    resources:
        gpu=GPU_JOB,
    run:
        run("base.py", input, output, params, wildcards, threads, log)


rule encode:
    input:
        base=base_model,
        images=pattern("images"),
    output:
        latents=directory(PATHS["latents"]),
    log:
        "logs/{experiment}/encode_{split}.log",
    benchmark:
        benchmark("logs/{experiment}/encode_{split}.log")
    params:
        flipped=False,
        batch_size=lambda w: settings(w)["generate"]["batch_size"],
    threads: threads("generate")
    resources:
        gpu=GPU_JOB,
    run:
        run("encode.py", input, output, params, wildcards, threads, log)


# The latents of the train split's mirrored images, which training draws from when it flips (train.hflip).
use rule encode as encode_flipped with:
    output:
        latents=directory(PATHS["latents_flipped"]),
    log:
        "logs/{experiment}/encode_{split}_flipped.log",
    benchmark:
        benchmark("logs/{experiment}/encode_{split}_flipped.log")
    params:
        flipped=True,
        batch_size=lambda w: settings(w)["generate"]["batch_size"],


rule decode_generated:
    input:
        **model_files(pattern("full_model")),
        samples=PATHS["generated"],
    output:
        images=directory(PATHS["decoded"]),
    log:
        "logs/{experiment}/decode_generated.log",
    benchmark:
        benchmark("logs/{experiment}/decode_generated.log")
    params:
        model=lambda w: settings(w)["model"],
        batch_size=lambda w: settings(w)["generate"]["batch_size"],
    threads: threads("generate")
    resources:
        gpu=GPU_JOB,
    run:
        run("decode.py", input, output, params, wildcards, threads, log)
