from diffattr.device import resolve_device
from diffattr.journey import featurize_journey

w = snakemake.wildcards
featurize_journey(snakemake.input.weights, snakemake.params.model, snakemake.input.images, w.function,
                  snakemake.params.generate, int(w.k), snakemake.params.spec, snakemake.output.features,
                  resolve_device(snakemake.config["device"]), snakemake.config.get("max_pass_items"),
                  snakemake.input.get("calibration"))
