from diffattr.counterfactual_eval import evaluate
from diffattr.device import resolve_device
from diffattr.figures import draw

evaluate(snakemake.input.original, snakemake.input.regenerated, snakemake.params.model, snakemake.input.weights,
         snakemake.params.clip, snakemake.params.summary, snakemake.wildcards.experiment,
         {key: snakemake.output[key] for key in ("table", "summary", "medians", "tests", "images")},
         resolve_device(snakemake.config["device"]))
draw("counterfactual", {key: snakemake.output[key] for key in ("table", "medians", "images")},
     snakemake.params.figure, snakemake.output.png)
