from diffattr.counterfactual_eval import regenerate
from diffattr.device import resolve_device

spec = snakemake.params.spec
regenerate(snakemake.input.weights, spec["model"], snakemake.input.gen, snakemake.params.targets, spec["generate"],
           spec["loss"], snakemake.output.images, snakemake.params.attrs, resolve_device(snakemake.config["device"]))
