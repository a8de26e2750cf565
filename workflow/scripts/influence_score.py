from diffattr.kfac import score_influence

score_influence(snakemake.input.train, snakemake.input.query, snakemake.input.subsets, snakemake.params.methods,
                snakemake.output.predictions)
