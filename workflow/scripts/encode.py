from diffattr.device import resolve_device
from diffattr.latent import encode_split

encode_split(snakemake.input.base, snakemake.input.images, snakemake.output.latents, snakemake.params.flipped,
             snakemake.params.batch_size, resolve_device(snakemake.config["device"]))
