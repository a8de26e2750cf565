from diffattr.generate import generate_set

generate_set(snakemake.input.weights, snakemake.params.model, snakemake.params.spec,
             snakemake.output.images)
