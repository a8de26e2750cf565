from diffattr.device import resolve_device
from diffattr.kfac import compute_curvature

compute_curvature(snakemake.input.weights, snakemake.params.model, snakemake.input.images, snakemake.params.spec,
                  snakemake.output.curvature, resolve_device(snakemake.config["device"]))
