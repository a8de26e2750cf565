from diffattr.device import resolve_device
from diffattr.generate import decode_set

decode_set(snakemake.input.samples, snakemake.input.weights, snakemake.params.model, snakemake.output.images,
           snakemake.params.batch_size, resolve_device(snakemake.config["device"]))
