from diffattr.ensemble import ensemble_split

ensemble_split(list(snakemake.input.train), list(snakemake.input.query), snakemake.input.subsets,
               snakemake.params.spec, snakemake.output.predictions)
