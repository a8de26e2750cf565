# LDS benchmark of data attribution for diffusion models: dataset -> models -> queries -> ground
# truth -> features -> scores -> LDS table. One file per stage under rules/; the maths in src/diffattr.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/dataset.smk"
include: "rules/subsets.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/latent.smk"
include: "rules/ground_truth.smk"
include: "rules/featurize.smk"
include: "rules/score.smk"
include: "rules/baseline.smk"
include: "rules/retrain.smk"
include: "rules/ensemble.smk"
include: "rules/influence.smk"
include: "rules/lds.smk"
include: "rules/table.smk"
include: "rules/ablation.smk"
include: "rules/figures.smk"
include: "rules/counterfactual.smk"


# `snakemake --report results/report_<experiment>.html`: the figures and the table, with captions.
report: "workflow/report/workflow.rst"


# The default target: the experiment's table and every intermediate output (see `products`).
rule all:
    input:
        products(config["experiment"]),
