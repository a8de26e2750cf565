from diffattr.config import parse_feature_set
from diffattr.device import resolve_device
from diffattr.featurize import featurize_split
from diffattr.train import trajectory_weights

function, _, k, step = parse_feature_set(snakemake.wildcards.fset)
weights = (snakemake.input.model if step is None
           else trajectory_weights(snakemake.input.model, step, snakemake.params.model))
featurize_split(weights, snakemake.params.model, snakemake.input.images, function,
                snakemake.params.timesteps, k, snakemake.params.spec, snakemake.output.features,
                resolve_device(snakemake.config["device"]), snakemake.config.get("max_pass_items"),
                checkpoint=step)
