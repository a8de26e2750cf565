import pandas as pd

from diffattr.counterfactual import removers
from diffattr.counterfactual_eval import score_rows, write_removal

remover = removers({"methods": [snakemake.params.remover]})[0]
extras = {name: path for name, path in snakemake.input.items()
          if name not in ("train_index", "train", "query", "lds")}
scores = score_rows(remover, snakemake.params.targets, len(pd.read_csv(snakemake.input.train_index)),
                    snakemake.params.seed, snakemake.input.get("train"), snakemake.input.get("query"), extras,
                    snakemake.input.get("lds"), snakemake.params.lambda_exponents)
write_removal(scores, snakemake.params.removed, snakemake.params.targets, snakemake.output.kept,
              snakemake.output.removed)
