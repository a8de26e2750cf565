from diffattr.baseline import baseline_split

samples = snakemake.input.get("samples")  # [] or [path]: the store the models read for these queries
baseline_split(snakemake.input.train, snakemake.input.query, snakemake.input.subsets,
               snakemake.wildcards.baseline, snakemake.output.predictions, samples[0] if samples else None)
