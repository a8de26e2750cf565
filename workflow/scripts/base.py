from diffattr.device import resolve_device
from diffattr.latent_base import build_base

build_base(snakemake.params.model, snakemake.params.dataset, snakemake.output.base,
           resolve_device(snakemake.config["device"]))
