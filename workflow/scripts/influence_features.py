from diffattr.device import resolve_device
from diffattr.kfac import write_influence_features
from diffattr.protocol import parse_influence_store

function, _, _ = parse_influence_store(snakemake.wildcards.istore)
write_influence_features(snakemake.input.weights, snakemake.params.model, snakemake.input.images,
                         snakemake.input.curvature, function, snakemake.params.timesteps, snakemake.params.spec,
                         snakemake.output.features, resolve_device(snakemake.config["device"]),
                         snakemake.config.get("max_pass_items"))
