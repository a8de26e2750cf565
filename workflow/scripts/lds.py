from diffattr.lds import lds_table

lds_table(snakemake.input.predictions, snakemake.input.subsets,
          dict(zip(snakemake.params.models, snakemake.input.truth)), snakemake.wildcards.qsplit,
          snakemake.params.spec, snakemake.output.table, snakemake.output.curve)
