from diffattr.tracin import score_trajectory

score_trajectory(snakemake.input.train, snakemake.input.query, snakemake.input.subsets,
                 snakemake.params.methods, snakemake.output.predictions)
