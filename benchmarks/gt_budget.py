"""How much ground truth the LDS needs: the LDS of TRAK and D-TRAK, and the ground truth's own
reliability, as the budget of (timestep, noise) draws per (model, query) shrinks.

    PYTHONPATH=src:benchmarks python benchmarks/gt_budget.py draws [preset] [--dtype fp32]
    PYTHONPATH=src:benchmarks python benchmarks/gt_budget.py table [preset] [--dtype fp32]

Run from a folder holding a finished `snakemake results/lds_<preset>.csv`. `draws` evaluates every LDS
model on every val and gen query at each timestep of the union of the budgets' timesteps (`TIMESTEPS`)
and each of three noise seeds, with the workflow's own `ground_truth.draw_losses` (common random
numbers: every model sees the same noise for a (query, t, seed)), one file per model under
`results/benchmarks/gt_budget/<preset>/<dtype>/`, resumable. `table` averages those draws into the
ground truth of each budget and prints, per budget and split: the LDS (oracle lambda, bootstrap
interval over subsets) of TRAK and D-TRAK from the run's own predictions, the split-half reliability
of the ground truth (Spearman over subsets between the truths of its even and odd timesteps, mean over
queries; the Spearman-Brown estimate for the whole budget beside it) and its agreement with the
reference budget (the largest here: 100 uniform timesteps x 3 noises; all 1000 is out of reach on a CPU).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from diffattr.data import load_images, load_labels
from diffattr.ground_truth import draw_losses
from diffattr.lds import ground_truth_matrix, select_lambda, spearman_rows, subset_means
from diffattr.methods import read_predictions
from diffattr.models import load_model
from diffattr.plan import Plan, path
from diffattr.protocol import ModelName, ground_truth_timesteps, select_timesteps, stage_dtype, stratified_timesteps
from diffattr.storage import atomic_output
from presets import preset_settings

NOISES = (0, 1, 2)
SPLITS = ("val", "gen")
T = 1000
# name: (timesteps, noise seeds); U = the protocol's uniform range(0, T, T // K), S = one random t per
# stratum (protocol.stratified_timesteps, seed 0). The default preset's own ground truth is U20 x1.
BUDGETS = {
    "U100 x3": (select_timesteps(100, "uniform", T), NOISES),
    "U100 x1": (select_timesteps(100, "uniform", T), NOISES[:1]),
    "U20 x3": (select_timesteps(20, "uniform", T), NOISES),
    "U20 x1": (select_timesteps(20, "uniform", T), NOISES[:1]),
    "U10 x3": (select_timesteps(10, "uniform", T), NOISES),
    "U10 x1": (select_timesteps(10, "uniform", T), NOISES[:1]),
    "S20 x3": (stratified_timesteps(20, T, seed=0), NOISES),
    "S20 x1": (stratified_timesteps(20, T, seed=0), NOISES[:1]),
    "S10 x3": (stratified_timesteps(10, T, seed=0), NOISES),
    "S10 x1": (stratified_timesteps(10, T, seed=0), NOISES[:1]),
}
REFERENCE = "U100 x3"
TIMESTEPS = sorted({t for timesteps, _ in BUDGETS.values() for t in timesteps})
METHODS = {"TRAK": "simple", "D-TRAK": "square"}  # the `trak` method on each function's main feature set


def folder(preset: str, dtype: str) -> Path:
    return Path("results/benchmarks/gt_budget") / preset / dtype


def load_draws(preset: str, dtype: str, models) -> dict:
    return {name: dict(np.load(folder(preset, dtype) / f"{name}.npz")) for name in models}


def draws(preset: str, dtype: str, batch_size: int, budget: str | None = None) -> None:
    """Every LDS model's draws at TIMESTEPS x NOISES, or at one budget's only (e.g. in another precision)."""
    settings = preset_settings(preset)
    plan = Plan(preset, settings)
    timesteps, noises = BUDGETS[budget] if budget else (TIMESTEPS, NOISES)
    queries = {split: (load_images(plan.samples(split)), load_labels(plan.samples(split))) for split in SPLITS}
    out = folder(preset, dtype)
    for n, name in enumerate(plan.lds_models, 1):
        target = out / f"{name}.npz"
        if target.exists():
            continue
        start = time.perf_counter()
        model = load_model(settings["model"], path("model", experiment=preset, family="lds", model=name))
        values = {split: draw_losses(model, images, timesteps, noises, batch_size, dtype=dtype, labels=labels)
                  for split, (images, labels) in queries.items()}
        with atomic_output(target) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, timesteps=timesteps, noise_seeds=noises, **values)
        print(f"{n}/{len(plan.lds_models)} {name}: {time.perf_counter() - start:.0f} s", flush=True)


def budget_truth(stored: dict, split: str, timesteps, noises, n_subsets: int) -> np.ndarray:
    """(queries, subsets) ground truth of one budget: each model's mean over the budget's draws (its
    timesteps and noise seeds), then the mean over a subset's training seeds (lds.subset_means, as
    the workflow's ground_truth_matrix)."""

    def mean(arrays):
        rows = [list(arrays["noise_seeds"]).index(s) for s in noises]
        columns = [list(arrays["timesteps"]).index(t) for t in timesteps]
        return arrays[split][:, rows][:, :, columns].mean(axis=(1, 2))

    return subset_means({name: mean(arrays) for name, arrays in stored.items()}, n_subsets)


def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.nanmean(spearman_rows(a, b)))


def table(preset: str, dtype: str) -> pd.DataFrame:
    """A row per (split, budget that the stored draws of `dtype` hold); agreement is with the fp32
    reference budget."""
    settings = preset_settings(preset)
    plan = Plan(preset, settings)
    m, gt = int(settings["subsets"]["m"]), settings["ground_truth"]
    stored = load_draws(preset, dtype, plan.lds_models)
    reference_draws = stored if dtype == "fp32" else load_draws(preset, "fp32", plan.lds_models)
    held = next(iter(stored.values()))
    own = (ground_truth_timesteps(gt, T), list(gt["noise_seeds"]))
    budgets = {**BUDGETS, f"U{len(own[0])} x{len(own[1])}": own}  # the preset's own, when not listed
    budgets = {name: (timesteps, noises) for name, (timesteps, noises) in budgets.items()
               if set(timesteps) <= set(held["timesteps"]) and set(noises) <= set(held["noise_seeds"])}
    grid, lds_spec = settings["featurize"], settings["lds"]
    K, k = grid["timesteps"][0], grid["proj_dims"][0]
    rows = []
    for split in SPLITS:
        if dtype == stage_dtype(gt):  # the run's own ground truth from these draws: are they the workflow's?
            truth, _ = ground_truth_matrix({name: path("ground_truth", root=plan.root, model=name)
                                            for name in plan.lds_models}, split, m)
            recomputed = budget_truth(stored, split, *own, m)
            print(f"{split}: the run's ground truth recomputed from the draws: largest relative difference "
                  f"{np.abs(recomputed - truth).max() / np.abs(truth).max():.1e}", flush=True)
        predictions = {label: read_predictions(path("scores", experiment=preset, scores=f"{function}_K{K}_k{k}",
                                                    qsplit=split))[0]["trak"] for label, function in METHODS.items()}
        reference = budget_truth(reference_draws, split, *BUDGETS[REFERENCE], m)
        for budget, (timesteps, noises) in budgets.items():
            truth = budget_truth(stored, split, timesteps, noises, m)
            half = mean_spearman(budget_truth(stored, split, timesteps[0::2], noises, m),
                                 budget_truth(stored, split, timesteps[1::2], noises, m))
            row = {"split": split, "budget": budget, "dtype": dtype, "draws": len(timesteps) * len(noises),
                   "of the paper's": f"1/{T * len(NOISES) // (len(timesteps) * len(noises))}",
                   "split-half r": half, "Spearman-Brown r": 2 * half / (1 + half),
                   f"agreement with {REFERENCE} fp32": mean_spearman(truth, reference)}
            for label, (preds, lambdas) in predictions.items():
                result = select_lambda(preds, truth, lambdas, "oracle", int(lds_spec["heldout_seed"]),
                                       float(lds_spec["confidence"]), int(lds_spec["bootstrap_resamples"]))
                row[label] = f"{100 * result['lds']:.2f} [{100 * result['ci_low']:.2f}, {100 * result['ci_high']:.2f}]"
            rows.append(row)
        if dtype == "fp32":
            rows.append(_seed_row(stored, split, m, plan))
    return pd.DataFrame(rows)


def _seed_row(stored: dict, split: str, m: int, plan: Plan) -> dict:
    """The training seeds' share of the noise: the mean Spearman over subsets between the reference
    budget's truths of two single training seeds (every pair averaged)."""
    seeds = plan.settings["subsets"]["train_seeds"]
    single = {seed: budget_truth({n: a for n, a in stored.items() if ModelName.parse(n).seed == seed},
                                 split, *BUDGETS[REFERENCE], m) for seed in seeds}
    pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    r = float(np.mean([mean_spearman(single[a], single[b]) for a, b in pairs]))
    return {"split": split, "budget": f"{REFERENCE}, one training seed against another", "split-half r": r,
            "Spearman-Brown r": len(seeds) * r / (1 + (len(seeds) - 1) * r)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("draws", "table"))
    parser.add_argument("preset", nargs="?", default="default")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--budget", choices=list(BUDGETS), help="draws: only this budget's")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "draws":
        draws(args.preset, args.dtype, args.batch_size, args.budget)
    else:
        frame = table(args.preset, args.dtype)
        print(frame.to_markdown(index=False, floatfmt=".3f"))
        out = folder(args.preset, args.dtype) / "table.csv"  # beside the draws
        frame.to_csv(out, index=False)
        print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    main()
