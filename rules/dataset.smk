CIFAR10_ARCHIVE = "data/downloads/cifar-10-python.tar.gz"


def dataset_spec(wildcards):
    """The experiment's dataset settings. A CIFAR-10 preset with `path: null` reads the top-level
    `cifar10_path` (a local copy for every CIFAR preset), else the downloaded official archive."""
    spec = dict(settings(wildcards)["dataset"])
    if spec["source"] == "cifar10" and spec.get("path") is None:
        spec["path"] = config.get("cifar10_path") or CIFAR10_ARCHIVE
    return spec


def dataset_source(wildcards):
    """The dataset's local copy as an input, so that a changed file reruns the split (the CIFAR-10
    archive to download when `path: null`); nothing for sklearn's digits. A path that does not
    exist stops the workflow here, before any job runs."""
    spec = dataset_spec(wildcards)
    path = spec.get("path")
    if path is None or path == CIFAR10_ARCHIVE:
        return {"source": path} if path else {}
    if not Path(path).exists():
        from diffattr.datasets import celeba_help

        hint = {
            "cifar10": "set it to the official cifar-10-python.tar.gz, an extracted "
            "cifar-10-batches-py folder or an ImageFolder tree or archive, or to null to download "
            "the official archive",
            "celeba": celeba_help(path),
        }.get(spec["source"], "set it to an existing file or folder")
        raise FileNotFoundError(
            f"experiments.{wildcards.experiment}.dataset.path: {path} does not exist; {hint}"
        )
    return {"source": path}


# The official CIFAR-10 python tarball, md5-checked (diffattr.datasets.fetch_cifar10). Runs on the
# submitting machine (localrule): cluster nodes often have no internet access.
rule download_cifar10:
    output:
        CIFAR10_ARCHIVE,
    log:
        "logs/downloads/cifar-10-python.log",
    localrule: True
    threads: 1
    run:
        run("download_cifar10.py", input, output, params, wildcards, threads, log)


rule dataset:
    input:
        unpack(dataset_source),
    output:
        train_images=directory("results/{experiment}/data/train.zarr"),
        val_images=directory("results/{experiment}/data/val.zarr"),
        train_index="results/{experiment}/data/train.csv",
        val_index="results/{experiment}/data/val.csv",
    log:
        "logs/{experiment}/dataset.log",
    params:
        spec=dataset_spec,
    threads: 1
    run:
        run("dataset.py", input, output, params, wildcards, threads, log)
