"""Whether an option changes the LDS: two finished runs of one preset, A (as configured) and B (one
option changed through --config, e.g. `train.dtype: bf16`), compared row by row and, on the queries
they share, paired over subsets.

    PYTHONPATH=src:benchmarks python benchmarks/compare_runs.py default RUN_A RUN_B [--override JSON]

RUN_A and RUN_B are folders (clones) each holding a finished `snakemake results/lds_<preset>.csv`;
`--override` is B's --config change to the preset, as a JSON mapping (for B's plan; only needed when
it changes the subsets or models). Prints, for every row of both LDS tables: A's LDS with its interval,
B's, B - A, and whether B's LDS lies inside A's interval (the criterion "unchanged within interval").
Then for TRAK and D-TRAK (the `trak` method on each function's main feature set) on the validation
queries, which both runs share: B - A paired over subsets (the same subset resamples for both runs,
each with its own ground truth and its own oracle lambda; lds.lds_difference_interval). Generated
queries are not paired: each run generates its own from its own full model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from diffattr.lds import ground_truth_matrix, lds_difference_interval, oracle_predictions
from diffattr.methods import read_predictions
from diffattr.plan import Plan, path
from diffattr.protocol import FeatureSet
from diffattr.settings import deep_merge
from presets import preset_settings

METHODS = {"TRAK": "simple", "D-TRAK": "square"}
KEYS = ["method", "function", "timesteps", "proj_dim", "checkpoint", "tags", "split", "lambda_rule"]


def percent(value, low, high) -> str:
    return f"{100 * value:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def rows(preset: str, run_a: Path, run_b: Path) -> pd.DataFrame:
    """Every row the two LDS tables share: both LDS, B - A, and whether B is inside A's interval."""
    tables = [pd.read_csv(run / path("table", experiment=preset), dtype={"checkpoint": str, "tags": str})
              .fillna({"function": "", "checkpoint": "", "tags": ""}) for run in (run_a, run_b)]
    both = tables[0].merge(tables[1], on=KEYS, suffixes=("_a", "_b"), validate="one_to_one")
    both["A"] = [percent(*r) for r in both[["lds_a", "ci_low_a", "ci_high_a"]].to_numpy()]
    both["B"] = [percent(*r) for r in both[["lds_b", "ci_low_b", "ci_high_b"]].to_numpy()]
    both["B - A"] = (100 * (both.lds_b - both.lds_a)).round(2)
    both["B inside A's interval"] = both.lds_b.between(both.ci_low_a, both.ci_high_a)
    return both[[*KEYS, "A", "B", "B - A", "B inside A's interval"]]


def chosen(run: Path, preset: str, settings: dict, function: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(predictions at the run's oracle lambda, the run's ground truth), both (queries, subsets)."""
    plan, grid = Plan(preset, settings), settings["featurize"]
    m = int(settings["subsets"]["m"])
    truth, _ = ground_truth_matrix({n: run / path("ground_truth", root=plan.root, model=n) for n in plan.lds_models},
                                   split, m)
    fset = FeatureSet(function, grid["timesteps"][0], grid["proj_dims"][0])
    preds, _ = read_predictions(run / path("scores", experiment=preset, scores=fset.name, qsplit=split))[0]["trak"]
    return oracle_predictions(preds, truth), truth


def paired(preset: str, run_a: Path, run_b: Path, override: dict) -> list[dict]:
    settings_a = preset_settings(preset)
    settings_b = deep_merge(settings_a, override)
    spec = settings_a["lds"]
    out = []
    for label, function in METHODS.items():
        pred_a, truth_a = chosen(run_a, preset, settings_a, function, "val")
        pred_b, truth_b = chosen(run_b, preset, settings_b, function, "val")
        out.append({"method": label, "split": "val", "B - A, paired over subsets": percent(*lds_difference_interval(
            pred_b, pred_a, truth_b, float(spec["confidence"]), int(spec["bootstrap_resamples"]), truth_b=truth_a))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--override", type=json.loads, default={}, help="B's --config change, as JSON")
    args = parser.parse_args()
    table = rows(args.preset, args.run_a, args.run_b)
    print(table.to_markdown(index=False))
    inside = table["B inside A's interval"]
    print(f"\n{int(inside.sum())} of {len(inside)} rows: B's LDS inside A's interval\n")
    print(pd.DataFrame(paired(args.preset, args.run_a, args.run_b, args.override)).to_markdown(index=False))


if __name__ == "__main__":
    main()
