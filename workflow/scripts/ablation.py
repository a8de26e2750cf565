from diffattr.ablation import collect

collect(snakemake.params.spec, [(values, split, path) for (values, split), path
                                in zip(snakemake.params.points, snakemake.input.tables)],
        snakemake.output.table, snakemake.output.report, snakemake.wildcards.experiment)
