from diffattr.score import score_split

score_split(snakemake.input.train, snakemake.input.query, snakemake.input.subsets,
            snakemake.params.spec, snakemake.output.predictions, snakemake.wildcards.qsplit,
            snakemake.input.get("journey"), snakemake.input.get("residual"))
