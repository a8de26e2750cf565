# The report's figures (diffattr.figure_plan: which a preset draws, what each reads, its caption;
# diffattr.figures draws them), each a PNG marked for `snakemake --report` and an SVG beside it.
from diffattr import figure_plan


rule figure:
    input:
        unpack(lambda w: figure_plan.inputs(plan(w), w.figure)),
    output:
        png=report(PATHS["figure"], caption="../workflow/report/figure.rst",
                   category=lambda w: figure_plan.category(w.figure), labels=lambda w: {"figure": w.figure}),
        svg=PATHS["figure"].removesuffix(".png") + ".svg",
    log:
        "logs/{experiment}/figures/{figure}.log",
    benchmark:
        benchmark("logs/{experiment}/figures/{figure}.log")
    wildcard_constraints:
        figure=r"(?!counterfactual\b)[a-z_]+",  # rule counterfactual draws that one
    params:
        spec=lambda w: figure_plan.params(plan(w), w.figure),
    threads: threads("score")  # a gallery scores as a score job does
    run:
        run("figure.py", input, output, params, wildcards, threads, log)
