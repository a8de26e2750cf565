from diffattr.table import collect

collect(list(snakemake.input), snakemake.wildcards.experiment, snakemake.output.table,
        snakemake.output.report)
