from diffattr.retrain import retrain_split

retrain_split(dict(zip(snakemake.params.models, snakemake.input.outputs)), snakemake.wildcards.qsplit,
              snakemake.input.pool_subsets, snakemake.input.subsets, snakemake.input.train_index,
              snakemake.params.spec, snakemake.output.predictions)
