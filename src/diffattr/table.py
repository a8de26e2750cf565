"""The experiment's LDS table: every (method, function, K, k, split, lambda rule) row in one CSV."""
from __future__ import annotations

import pandas as pd

from .storage import atomic_output

COLUMNS = ["experiment", "method", "function", "timesteps", "proj_dim", "split", "lambda_rule",
           "lambda", "lds", "ci_low", "ci_high", "n_queries", "n_subsets"]


def collect(paths, experiment: str, out_path) -> pd.DataFrame:
    table = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    table.insert(0, "experiment", experiment)
    table = table[COLUMNS].sort_values(["split", "lambda_rule", "method", "function", "timesteps",
                                        "proj_dim"], ignore_index=True)
    with atomic_output(out_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return table
