"""The LDS of features computed in several ways from one finished run, each against the first way on the
same subset resamples (bench_factorized.py's projections, bench_tf32.py's arithmetic).

On a finished run's full model, images, subsets and ground truth, each variant featurizes the preset's
first grid set for TRAK (simple) and D-TRAK (square) into a scratch folder (its featurize settings
over the preset's, inside its context), and the workflow's own score and LDS code give its LDS with the
bootstrap interval and its featurization time per sample; then, per function and split, the paired
difference of each variant and the first at each one's oracle lambda (lds.lds_difference_interval),
which tells a shift from the subsets' noise. All of it for each projection seed asked for.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import zarr

from diffattr.featurize import featurize_split
from diffattr.lds import ground_truth_matrix, lds_difference_interval, lds_table, oracle_predictions
from diffattr.methods import read_predictions
from diffattr.plan import Plan, path
from diffattr.protocol import FeatureSet
from diffattr.score import score_split
from presets import preset_settings


@dataclass(frozen=True)
class Variant:
    name: str
    featurize: dict  # settings over the preset's featurize block
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    proj_dim: int | None = None  # k, when not the preset's first


def paired_lds(preset: str, workdir: Path, variants: list[Variant],
               seeds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The LDS table and the paired differences against variants[0] (see the module's docstring), for
    each projection seed of `seeds` (default: the preset's featurize.proj_seed)."""
    settings = preset_settings(preset)
    plan = Plan(preset, settings)
    grid = settings["featurize"]
    weights = plan.weights(path("full_model", experiment=preset))
    truth = {m: path("ground_truth", root=plan.root, model=m) for m in plan.lds_models}
    subsets = path("subsets", experiment=preset)
    lds_spec = {**settings["lds"], "lambda_rules": ["oracle", "heldout"]}
    truth_matrices = {split: ground_truth_matrix(truth, split, int(settings["subsets"]["m"]))[0]
                      for split in ("val", "gen")}
    reference = variants[0].name
    rows, paired = [], []
    for seed, function in ((seed, function) for seed in seeds or [grid["proj_seed"]] for function in ("simple", "square")):
        fset = FeatureSet(function, grid["timesteps"][0], grid["proj_dims"][0])
        chosen = {}
        for variant in variants:
            spec = {**grid, "scheme": fset.scheme, "noises": 1, "proj_seed": seed, **variant.featurize}
            stores, seconds = {}, 0.0
            for split in ("train", "val", "gen"):
                stores[split] = workdir / f"{fset.name}_{variant.name}_{seed}_{split}.zarr".replace(" ", "_")
                start = time.perf_counter()
                with variant.context():
                    featurize_split(weights, settings["model"], plan.images(split), function,
                                    fset.timesteps(plan.num_train_timesteps), variant.proj_dim or fset.proj_dim,
                                    spec, stores[split],
                                    calibration=plan.samples("train"))
                seconds += time.perf_counter() - start
            samples = sum(zarr.open_array(store, mode="r").shape[0] for store in stores.values())
            for split in ("val", "gen"):
                preds = stores[split].with_suffix(".preds.zarr")
                score_split(stores["train"], stores[split], subsets,
                            {"methods": ["trak"], "lambda_exponents": settings["score"]["lambda_exponents"]},
                            preds, split)
                table = stores[split].with_suffix(".csv")
                lds_table(preds, subsets, truth, split, lds_spec, table)
                stored, _ = read_predictions(preds)[0]["trak"]
                chosen[variant.name, split] = oracle_predictions(stored, truth_matrices[split])
                for row in pd.read_csv(table).to_dict("records"):
                    rows.append({"function": function, "features": variant.name, "seed": seed, "split": split,
                                 "rule": row["lambda_rule"], "lds": row["lds"], "ci_low": row["ci_low"],
                                 "ci_high": row["ci_high"], "s_per_sample": seconds / samples})
        for name, split in ((v.name, split) for v in variants[1:] for split in ("val", "gen")):
            difference, low, high = lds_difference_interval(
                chosen[name, split], chosen[reference, split], truth_matrices[split],
                float(lds_spec["confidence"]), int(lds_spec["bootstrap_resamples"]))
            paired.append({"function": function, "features": name, "seed": seed, "split": split,
                           f"minus {reference} (oracle)": difference, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows), pd.DataFrame(paired)


def print_tables(table: pd.DataFrame, paired: pd.DataFrame) -> None:
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print()
    print(paired.to_markdown(index=False, floatfmt=".3f"))
