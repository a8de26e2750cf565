from diffattr.device import resolve_device
from diffattr.ground_truth import compute_and_save

compute_and_save(snakemake.input.weights, snakemake.params.model,
                 {"val": snakemake.input.val, "gen": snakemake.input.gen},
                 snakemake.params.spec, snakemake.output.losses,
                 resolve_device(snakemake.config["device"]))
