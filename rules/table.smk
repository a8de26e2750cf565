rule table:
    input:
        tables=lambda w: [f"results/{w.experiment}/lds/{name}_{s}.csv"
                          for name in score_stores(w) for s in QUERY_SPLITS],
        ablations=lambda w: [f"results/{w.experiment}/ablations/{a['name']}.md"
                             for a in settings(w).get("ablations", [])],
    output:
        table="results/lds_{experiment}.csv",
        report="results/lds_{experiment}.md",
    log:
        "logs/{experiment}/table.log",
    threads: 1
    run:
        run("table.py", input, output, params, wildcards, threads, log)
