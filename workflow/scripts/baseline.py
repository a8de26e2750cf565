from diffattr.baseline import baseline_split

baseline_split(snakemake.input.train, snakemake.input.query, snakemake.input.subsets,
               snakemake.wildcards.baseline, snakemake.output.predictions)
