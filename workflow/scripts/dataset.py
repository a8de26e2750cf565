from diffattr.data import build_splits

build_splits(snakemake.params.spec, dict(snakemake.output))
