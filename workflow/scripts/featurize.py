from diffattr.device import resolve_device
from diffattr.featurize import featurize_split

w = snakemake.wildcards
featurize_split(snakemake.input.weights, snakemake.params.model, snakemake.input.images, w.function,
                snakemake.params.timesteps, int(w.k), snakemake.params.spec, snakemake.output.features,
                resolve_device(snakemake.config["device"]), snakemake.config.get("max_pass_items"))
