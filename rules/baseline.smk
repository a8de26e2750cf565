# Similarity baselines (score.baselines): the train split against one query split, as flattened
# images (Method.reads 'pixels') or CLIP image embeddings ('embeddings'), in a predictions store of
# the same layout as a score job's (diffattr.methods).
def baseline_input(split=None):
    """An input function: what a baseline compares for `split` (by default the job's query split), the
    images or their CLIP embeddings."""
    def paths(w):
        if METHODS[w.baseline].reads == "embeddings":
            return PATHS["embeddings"].format(experiment=w.experiment, split=split or w.qsplit)
        return plan(w).images(split or w.qsplit)

    return paths


rule baseline:
    input:
        train=baseline_input("train"),
        query=baseline_input(),
        subsets=PATHS["subsets"],
        # the store the models read for these queries, when it is not the images (a latent kind's
        # latents): the predictions carry its hash, as the ground truth does (diffattr.baseline)
        samples=lambda w: [s] if (s := plan(w).samples(w.qsplit)) != plan(w).images(w.qsplit) else [],
    output:
        predictions=directory(pattern("scores", scores="{baseline}")),
    log:
        "logs/{experiment}/baseline/{baseline}_{qsplit}.log",
    benchmark:
        benchmark("logs/{experiment}/baseline/{baseline}_{qsplit}.log")
    threads: threads("score")
    run:
        run("baseline.py", input, output, params, wildcards, threads, log)


def clip_spec(wildcards):
    """What the embeddings are a function of (score.clip without its batch size)."""
    spec = settings(wildcards)["score"].get("clip")
    if spec is None:
        raise ConfigError(f"experiments.{wildcards.experiment}.score.clip: got no value; expected a mapping "
                          "{pretrained, architecture} for the CLIP embeddings")
    return {key: value for key, value in spec.items() if key != "batch_size"}


# One job per split: the CLIP image embeddings that clip_dot and clip_cos compare (diffattr.clip).
rule embed_clip:
    input:
        images=images(),
        pretrained=lambda w: [p] if (p := clip_spec(w).get("pretrained")) else [],  # a model directory
    output:
        embeddings=directory(PATHS["embeddings"]),
    log:
        "logs/{experiment}/embed_clip/{split}.log",
    benchmark:
        benchmark("logs/{experiment}/embed_clip/{split}.log")
    params:
        clip=clip_spec,
    threads: threads("featurize")
    resources:
        gpu=GPU_JOB,
    run:
        run("embed_clip.py", input, output, params, wildcards, threads, log,
            batch_size=int(settings(wildcards)["score"]["clip"].get("batch_size", 64)))
