from diffattr.das import compute_residuals
from diffattr.device import resolve_device

p = snakemake.params
compute_residuals(snakemake.input.weights, p.model, snakemake.input.images, p.timesteps, p.noise_seed,
                  p.batch_size, snakemake.output.residuals, resolve_device(snakemake.config["device"]))
