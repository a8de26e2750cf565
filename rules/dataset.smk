rule dataset:
    output:
        train_images=directory("results/{experiment}/data/train.zarr"),
        val_images=directory("results/{experiment}/data/val.zarr"),
        train_index="results/{experiment}/data/train.csv",
        val_index="results/{experiment}/data/val.csv",
    log:
        "logs/{experiment}/dataset.log",
    params:
        spec=lambda w: settings(w)["dataset"],
    threads: 1
    run:
        run("dataset.py", input, output, params, wildcards, threads, log)
