from diffattr.device import resolve_device
from diffattr.generate import generate_set

generate_set(snakemake.input.weights, snakemake.params.model, snakemake.params.spec,
             snakemake.output.images, resolve_device(snakemake.config["device"]))
