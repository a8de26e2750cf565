from diffattr.table import collect

collect(list(snakemake.input.tables), snakemake.wildcards.experiment, snakemake.output.table,
        snakemake.output.report, snakemake.input.ablations, snakemake.params.main)
