rule subsets:
    input:
        train_index=pattern("index", split="train"),
    output:
        table=PATHS["subsets"],
    log:
        "logs/{experiment}/subsets.log",
    benchmark:
        benchmark("logs/{experiment}/subsets.log")
    params:
        spec=lambda w: settings(w)["subsets"],
    threads: 1
    run:
        run("subsets.py", input, output, params, wildcards, threads, log)
