"""The headline table at the top of results/lds_<exp>.md: its numbers are the full table's rows at the
preset's main setting, picked here by an explicit loop over the rows."""
import re

import numpy as np
import pandas as pd

from diffattr.table import collect

MAIN = {"timesteps": 10, "proj_dim": 64, "lambda_rule": "oracle"}


def lds_rows(method, function, K, k, lam, checkpoint=None, tags=None, splits=("val", "gen"), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for split in splits:
        for rule in ("oracle", "heldout"):
            lds = float(rng.uniform(-0.2, 0.6))
            out.append({"method": method, "function": function, "timesteps": K, "proj_dim": k,
                        "checkpoint": checkpoint, "tags": tags, "split": split, "lambda_rule": rule, "lambda": lam,
                        "lds": lds, "ci_low": lds - rng.uniform(0.01, 0.1), "ci_high": lds + rng.uniform(0.01, 0.1),
                        "n_queries": 5, "n_subsets": 8})
    return out


def expected_cell(table, method, split):
    """The row the headline must show, chosen by hand: main K and k (or none), final weights or a
    checkpoint sum, no tags, the main rule, and simple before square before anything else."""
    candidates = []
    for row in table.itertuples():
        if row.method != method or row.split != split or row.lambda_rule != MAIN["lambda_rule"]:
            continue
        if not (pd.isna(row.timesteps) or (row.timesteps == MAIN["timesteps"] and row.proj_dim == MAIN["proj_dim"])):
            continue
        checkpoint = "" if pd.isna(row.checkpoint) else str(row.checkpoint)
        if (checkpoint and "+" not in checkpoint) or not pd.isna(row.tags):
            continue
        candidates.append(row)
    if not candidates:
        return ""
    order = {"simple": 0, "square": 1}
    best = min(candidates, key=lambda r: order.get(r.function, 2))
    return f"{100 * best.lds:.2f} [{100 * best.ci_low:.2f}, {100 * best.ci_high:.2f}]"


def test_headline_numbers_are_the_full_tables_rows(tmp_path):
    parts = {
        "simple_K10_k64": lds_rows("TRAK", "simple", 10, 64, 20.0, seed=1) + lds_rows("Gradient (dot)", "simple", 10,
                                                                                        64, None, seed=2),
        "square_K10_k64": lds_rows("D-TRAK", "square", 10, 64, 50.0, seed=3) + lds_rows("Gradient (dot)", "square",
                                                                                          10, 64, None, seed=4),
        "l2_K10_k64": lds_rows("D-TRAK", "l2", 10, 64, 5.0, seed=5),
        "avg_K10_k64": lds_rows("DAS", "avg", 10, 64, 1.0, seed=6),
        "square_K100_k64": lds_rows("D-TRAK", "square", 100, 64, 5.0, seed=7),      # another K
        "square_K10_k128": lds_rows("D-TRAK", "square", 10, 128, 5.0, seed=8),      # another k
        "simple_K10_k64_step20": lds_rows("TRAK", "simple", 10, 64, 2.0, checkpoint=20, seed=9),
        "simple_K10_k64_tracin": lds_rows("TracInCP", "simple", 10, 64, None, checkpoint="20+final", seed=10),
        "square_K10_k64_cumulative": lds_rows("D-TRAK", "square", 10, 64, 2.0, tags="cumulative", seed=11),
        "pixel_cos": lds_rows("Raw pixel (cos)", None, None, None, None, seed=12),
        "journey": lds_rows("Journey-TRAK", "simple", 10, 64, 3.0, splits=("gen",), seed=13),
    }
    paths = []
    for name, part in parts.items():
        paths.append(tmp_path / f"{name}.csv")
        pd.DataFrame(part).to_csv(paths[-1], index=False)
    collect(paths, "demo", tmp_path / "lds.csv", tmp_path / "lds.md", main=MAIN)
    table = pd.read_csv(tmp_path / "lds.csv", dtype={"checkpoint": str, "tags": str})
    text = (tmp_path / "lds.md").read_text()
    head, _, rest = text.partition("## All rows")
    assert rest and text.index("## Headline") < text.index("## All rows")
    lines = [line for line in head.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    shown = {}
    for line in lines:
        method, function, val, gen = [cell.strip() for cell in line.strip("|").split(" | ")]
        shown[method] = (function, val, gen)
    assert set(shown) == set(table.method)  # every method has its headline line, once
    for method, (function, val, gen) in shown.items():
        assert val == expected_cell(table, method, "val"), method
        assert gen == expected_cell(table, method, "gen"), method
    assert shown["D-TRAK"][0] == "square" and shown["Gradient (dot)"][0] == "simple"
    assert shown["Journey-TRAK"][1] == "" and shown["TracInCP"][2]
    # every number of the headline is one of the full table's, in its own lines below
    numbers = re.findall(r"-?\d+\.\d\d \[-?\d+\.\d\d, -?\d+\.\d\d\]", head)
    assert numbers and all(number in rest for number in numbers)
