# One table per named sweep of the preset's `ablations:` (diffattr.ablation), from the LDS tables of
# the feature sets and ground truths it sweeps over (rules/common.smk, ablation_tables).
rule ablation:
    input:
        tables=lambda w: [path for _, _, path in ablation_tables(w)],
    output:
        table="results/{experiment}/ablations/{ablation}.csv",
        report="results/{experiment}/ablations/{ablation}.md",
    log:
        "logs/{experiment}/ablations/{ablation}.log",
    params:
        spec=ablation_spec,
        points=lambda w: [[values, split] for values, split, _ in ablation_tables(w)],
    threads: 1
    run:
        run("ablation.py", input, output, params, wildcards, threads, log)
