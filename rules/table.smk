rule table:
    input:
        tables=lambda w: plan(w).jobs()["lds"],
        ablations=lambda w: [PATHS["ablation"].format(experiment=w.experiment, ablation=a["name"], ext="md")
                             for a in settings(w).get("ablations", [])],
    output:
        table=report(PATHS["table"], category="Tables", caption="../workflow/report/table.rst"),
        report=pattern("table").removesuffix(".csv") + ".md",
    log:
        "logs/{experiment}/table.log",
    benchmark:
        benchmark("logs/{experiment}/table.log")
    params:
        main=lambda w: plan(w).main,
    threads: 1
    run:
        run("table.py", input, output, params, wildcards, threads, log)
