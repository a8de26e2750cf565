import pandas as pd

from diffattr.storage import atomic_output
from diffattr.subsets import make_subsets

spec = snakemake.params.spec
labels = pd.read_csv(snakemake.input.train_index)["label"].to_numpy()
table = make_subsets(labels, int(spec["m"]), float(spec["alpha"]), int(spec["seed"]))
with atomic_output(snakemake.output.table) as tmp:
    table.to_csv(tmp, index=False)
