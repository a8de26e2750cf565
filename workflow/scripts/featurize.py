from diffattr.device import resolve_device
from diffattr.featurize import featurize_split
from diffattr.protocol import FeatureSet
from diffattr.train import trajectory_weights

fset = FeatureSet.parse(snakemake.wildcards.fset)
weights = (snakemake.input.model if fset.step is None
           else trajectory_weights(snakemake.input.model, fset.step, snakemake.params.model))
featurize_split(weights, snakemake.params.model, snakemake.input.images, fset.function,
                snakemake.params.timesteps, fset.proj_dim, snakemake.params.spec, snakemake.output.features,
                resolve_device(snakemake.config["device"]), snakemake.config.get("max_pass_items"),
                checkpoint=fset.step, calibration=snakemake.input.get("calibration"))
