rule subsets:
    input:
        train_index="results/{experiment}/data/train.csv",
    output:
        table="results/{experiment}/subsets.csv",
    log:
        "logs/{experiment}/subsets.log",
    params:
        spec=lambda w: settings(w)["subsets"],
    threads: 1
    run:
        run("subsets.py", input, output, params, wildcards, threads, log)
