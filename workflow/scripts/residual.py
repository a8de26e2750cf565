from diffattr.das import compute_residuals
from diffattr.device import resolve_device

compute_residuals(snakemake.input.weights, snakemake.params.model, snakemake.input.images,
                  snakemake.params.timesteps, snakemake.params.spec, snakemake.output.residuals,
                  resolve_device(snakemake.config["device"]))
