from diffattr.figures import draw

draw(snakemake.wildcards.figure, dict(snakemake.input.items()), snakemake.params.spec, snakemake.output.png)
