from diffattr.score import score_split

score_split(snakemake.input.train, snakemake.input.query, snakemake.input.subsets,
            snakemake.params.spec, snakemake.output.predictions, snakemake.wildcards.qsplit,
            {name: path for name, path in snakemake.input.items() if name not in ("train", "query", "subsets")})
