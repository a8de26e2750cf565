# One table per named sweep of the preset's `ablations:` (diffattr.ablation), from the LDS tables of
# the feature sets and ground truths it sweeps over (diffattr.plan.Plan.ablation_tables).
rule ablation:
    input:
        tables=lambda w: [table for _, _, table in plan(w).ablation_tables(w.ablation)],
    output:
        table=pattern("ablation", ext="csv"),
        report=pattern("ablation", ext="md"),
    log:
        "logs/{experiment}/ablations/{ablation}.log",
    benchmark:
        benchmark("logs/{experiment}/ablations/{ablation}.log")
    params:
        spec=lambda w: plan(w).ablation(w.ablation),
        points=lambda w: [[values, split] for values, split, _ in plan(w).ablation_tables(w.ablation)],
    threads: 1
    run:
        run("ablation.py", input, output, params, wildcards, threads, log)
