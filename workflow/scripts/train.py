from diffattr.train import train_and_save

train_and_save(snakemake.input.images, snakemake.input.get("subsets"), snakemake.params.subset,
               snakemake.params.seed, snakemake.params.spec, snakemake.output.weights)
