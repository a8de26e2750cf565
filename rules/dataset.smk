def dataset_spec(wildcards):
    """The experiment's dataset settings, its local copy resolved (diffattr.plan.Plan.dataset_path)."""
    spec = dict(settings(wildcards)["dataset"])
    if spec["source"] == "cifar10":
        spec["path"] = plan(wildcards).dataset_path()
    return spec


def dataset_source(wildcards):
    """The dataset's local copy as an input, so that a changed file reruns the split (the CIFAR-10
    archive to download when `path: null`); nothing for sklearn's digits. A path that does not
    exist, or none for a source that needs one, stops the workflow here, before any job runs."""
    spec = dataset_spec(wildcards)
    path = spec.get("path")
    if spec["source"] == "sklearn_digits" or path == CIFAR10_ARCHIVE:
        return {"source": path} if path else {}
    if path is None or not Path(path).exists():
        from diffattr.datasets import artbench_help, celeba_help

        hint = {
            "cifar10": "set it to the official cifar-10-python.tar.gz, an extracted "
            "cifar-10-batches-py folder or an ImageFolder tree or archive, or to null to download "
            "the official archive",
            "celeba": celeba_help(path),
            "artbench": artbench_help(path),
        }.get(spec["source"], "set it to an existing file or folder")
        raise FileNotFoundError(
            f"experiments.{wildcards.experiment}.dataset.path: "
            f"{'got null' if path is None else f'{path} does not exist'}; {hint}"
        )
    return {"source": path}


# The official CIFAR-10 python tarball, md5-checked (diffattr.datasets.fetch_cifar10). Runs on the
# submitting machine (localrule): cluster nodes often have no internet access.
rule download_cifar10:
    output:
        CIFAR10_ARCHIVE,
    log:
        "logs/downloads/cifar-10-python.log",
    benchmark:
        benchmark("logs/downloads/cifar-10-python.log")
    localrule: True
    threads: 1
    run:
        run("download_cifar10.py", input, output, params, wildcards, threads, log)


rule dataset:
    input:
        unpack(dataset_source),
    output:
        train_images=directory(pattern("images", split="train")),
        val_images=directory(pattern("images", split="val")),
        train_index=pattern("index", split="train"),
        val_index=pattern("index", split="val"),
    log:
        "logs/{experiment}/dataset.log",
    benchmark:
        benchmark("logs/{experiment}/dataset.log")
    params:
        spec=dataset_spec,
    threads: threads("dataset")
    run:
        run("dataset.py", input, output, params, wildcards, threads, log)
