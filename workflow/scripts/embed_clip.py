from diffattr.clip import embed_split
from diffattr.device import resolve_device

embed_split(snakemake.input.images, snakemake.params.clip, snakemake.output.embeddings,
            resolve_device(snakemake.config["device"]), snakemake.config["batch_size"])
