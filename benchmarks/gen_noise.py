"""Which noise moves the gen LDS of a preset (default: `default`): TRAK's and D-TRAK's gen (and val)
LDS redone with one source of randomness changed at a time, everything else as the run made it.

    PYTHONPATH=src:benchmarks python benchmarks/gen_noise.py [preset] [--sources truth projection generation]
    PYTHONPATH=src:benchmarks python benchmarks/gen_noise.py default --sources \
        --override '{"subsets": {"m": 72, "train_seeds": [0]}}'   # a run made with that --config

Run from a folder holding a finished `snakemake results/lds_<preset>.csv` and, for the ground-truth
rows, `benchmarks/gt_budget.py draws <preset>`. Sources, each as replicates:
- `projection`: the features' projection seed (featurize.proj_seed and 4 others);
- `generated images`: the generation seed (generate.seed and 3 others, disjoint images), each new set
  with its own ground truth under every LDS model (the preset's ground_truth settings) and features;
- `ground-truth draws`: the preset's ground-truth budget with each of the 3 noise seeds of the draws
  (independent draws at the same timesteps);
- `training seed`: the truth of one training seed per subset instead of the mean of the 3 (its spread
  is that of a single seed: about sqrt(3) times what the mean of three carries);
For each source: the LDS of each method per replicate, their standard deviation, and the difference
D-TRAK - TRAK. Then the subsets' share: the run's own bootstrap intervals over subsets, and the
difference's paired interval (the same resamples for both methods), which orders the two methods
when it excludes 0.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffattr.data import load_images, load_labels
from diffattr.featurize import features, make_feature_projector
from diffattr.generate import generation_labels, guidance_scale, sample
from diffattr.ground_truth import query_losses
from diffattr.lds import (ground_truth_matrix, lds, lds_difference_interval, lds_interval, oracle_predictions,
                          select_lambda, subset_means)
from diffattr.methods import read_predictions
from diffattr.models import load_model
from diffattr.plan import Plan, path
from diffattr.protocol import FeatureSet, ModelName, ground_truth_timesteps, lambda_grid
from diffattr.score import read_masks, subset_predictions
from diffattr.settings import deep_merge
from gt_budget import NOISES, budget_truth, load_draws
from presets import preset_settings

METHODS = {"TRAK": "simple", "D-TRAK": "square"}
CPU = torch.device("cpu")


class Run:
    """A finished run of the preset: its settings, models, images, subsets and ground truth."""

    def __init__(self, preset: str, override: dict | None = None):
        self.preset, self.settings = preset, deep_merge(preset_settings(preset), override or {})
        self.plan = Plan(preset, self.settings)
        self.grid = self.settings["featurize"]
        self.m = int(self.settings["subsets"]["m"])
        self.subsets = path("subsets", experiment=preset)
        self.full = load_model(self.settings["model"], path("full_model", experiment=preset)).for_per_sample_gradients()
        self.sets = {label: FeatureSet(function, self.grid["timesteps"][0], self.grid["proj_dims"][0])
                     for label, function in METHODS.items()}
        self.truth = {split: ground_truth_matrix({n: path("ground_truth", root=self.plan.root, model=n)
                                                  for n in self.plan.lds_models}, split, self.m)[0]
                      for split in ("val", "gen")}
        self.samples = {split: (load_images(self.plan.samples(split)), load_labels(self.plan.samples(split)))
                        for split in ("train", "val", "gen")}
        self.masks = read_masks(self.subsets, len(self.samples["train"][0]), self.subsets)

    def features(self, label: str, images: np.ndarray, labels, proj_seed: int) -> np.ndarray:
        fset = self.sets[label]
        projector, _ = make_feature_projector(self.full, fset.proj_dim, proj_seed, CPU, int(self.grid["batch_size"]))
        rows = features(self.full, images, fset.function, fset.timesteps(self.plan.num_train_timesteps),
                        int(self.grid["noise_seed"]), projector, int(self.grid["batch_size"]), labels=labels)
        return np.concatenate([block for _, block in rows])

    def predictions(self, train: np.ndarray, query: np.ndarray) -> np.ndarray:
        return subset_predictions(train, query, self.masks, lambda_grid(self.settings["score"]["lambda_exponents"]))

    def lds(self, preds: np.ndarray, truth: np.ndarray) -> dict:
        spec = self.settings["lds"]
        return select_lambda(preds, truth, lambda_grid(self.settings["score"]["lambda_exponents"]), "oracle",
                             int(spec["heldout_seed"]), float(spec["confidence"]), int(spec["bootstrap_resamples"]))


def projection_rows(run: Run, seeds) -> list[dict]:
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        train = {label: run.features(label, *run.samples["train"], seed) for label in METHODS}
        for split in ("val", "gen"):
            row = {"source": "projection", "replicate": f"proj_seed {seed}", "split": split}
            for label in METHODS:
                preds = run.predictions(train[label], run.features(label, *run.samples[split], seed))
                row[label] = run.lds(preds, run.truth[split])["lds"]
            rows.append(row)
        print(f"projection seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def generation_rows(run: Run, seeds) -> list[dict]:
    spec, gt = run.settings["generate"], run.settings["ground_truth"]
    timesteps = ground_truth_timesteps(gt, run.plan.num_train_timesteps)
    seed0 = int(run.grid["proj_seed"])
    train = {label: run.features(label, *run.samples["train"], seed0) for label in METHODS}
    models = {n: load_model(run.settings["model"], path("model", experiment=run.preset, family="lds", model=n))
              for n in run.plan.lds_models}
    rows = [{"source": "generated images", "replicate": f"generate.seed {spec['seed']} (the run's)", "split": "gen",
             **{label: run.lds(preds, run.truth["gen"])["lds"] for label, preds in stored_predictions(run, "gen").items()}}]
    for seed in seeds:
        start = time.perf_counter()
        labels = generation_labels(run.full, int(spec["n"]))
        images = sample(run.full, int(spec["n"]), run.full.latent_shape(), int(spec["steps"]), float(spec["eta"]),
                        seed, int(spec["batch_size"]), labels=labels, guidance=guidance_scale(spec))
        truth = subset_means({name: query_losses(model, images, timesteps, list(gt["noise_seeds"]),
                                                 int(gt["batch_size"]), labels=labels)
                              for name, model in models.items()}, run.m)
        row = {"source": "generated images", "replicate": f"generate.seed {seed}", "split": "gen"}
        for label in METHODS:
            row[label] = run.lds(run.predictions(train[label], run.features(label, images, labels, seed0)), truth)["lds"]
        rows.append(row)
        print(f"generation seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def stored_predictions(run: Run, split: str) -> dict:
    return {label: read_predictions(path("scores", experiment=run.preset, scores=fset.name, qsplit=split))[0]["trak"][0]
            for label, fset in run.sets.items()}


def truth_rows(run: Run) -> list[dict]:
    """Ground-truth draws (each noise seed alone at the preset's timesteps) and training seeds (one per
    subset), scored with the run's own predictions."""
    stored = load_draws(run.preset, "fp32", run.plan.lds_models)
    timesteps = ground_truth_timesteps(run.settings["ground_truth"], run.plan.num_train_timesteps)
    rows = []
    for split in ("val", "gen"):
        preds = stored_predictions(run, split)
        for noise in NOISES:
            truth = budget_truth(stored, split, timesteps, [noise], run.m)
            rows.append({"source": "ground-truth draws", "replicate": f"noise seed {noise}", "split": split,
                         **{label: run.lds(p, truth)["lds"] for label, p in preds.items()}})
        for seed in run.settings["subsets"]["train_seeds"]:
            single = {n: a for n, a in stored.items() if ModelName.parse(n).seed == seed}
            truth = budget_truth(single, split, timesteps, run.settings["ground_truth"]["noise_seeds"], run.m)
            rows.append({"source": "training seed", "replicate": f"seed {seed} alone", "split": split,
                         **{label: run.lds(p, truth)["lds"] for label, p in preds.items()}})
    return rows


def paired(run: Run, split: str) -> dict:
    """The run's own LDS of each method at its oracle lambda with its interval over subsets, and the
    paired difference D-TRAK - TRAK (the same resamples for both: lds.lds_difference_interval)."""
    truth, spec = run.truth[split], run.settings["lds"]
    chosen = {label: oracle_predictions(preds, truth) for label, preds in stored_predictions(run, split).items()}
    confidence, resamples = float(spec["confidence"]), int(spec["bootstrap_resamples"])
    row = {"split": split}
    for label, pred in chosen.items():
        row[label] = _percent(lds(pred, truth), *lds_interval(pred, truth, confidence, resamples))
    row["D-TRAK - TRAK, paired"] = _percent(*lds_difference_interval(chosen["D-TRAK"], chosen["TRAK"], truth,
                                                                      confidence, resamples))
    return row


def _percent(value, low, high) -> str:
    return f"{100 * value:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


SOURCES = ("truth", "projection", "generation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="default")
    parser.add_argument("--sources", nargs="*", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--override", type=json.loads, default={},
                        help="settings the run was made with beyond the preset's, as given to --config")
    args = parser.parse_args()
    run = Run(args.preset, args.override)
    out = Path("results/benchmarks/gen_noise") / args.preset
    out.mkdir(parents=True, exist_ok=True)
    for source in args.sources:  # each source's replicates in its own file: sources can run apart
        if source == "truth":
            rows = truth_rows(run)
        elif source == "projection":
            rows = projection_rows(run, [int(run.grid["proj_seed"]), 1, 2, 3, 4])
        else:
            rows = generation_rows(run, [int(run.settings["generate"]["seed"]) + 1000 * i for i in (1, 2, 3)])
        pd.DataFrame(rows).to_csv(out / f"{source}.csv", index=False)
    frames = [pd.read_csv(out / f"{source}.csv") for source in SOURCES if (out / f"{source}.csv").exists()]
    if frames:
        frame = pd.concat(frames)
        frame["D-TRAK - TRAK"] = frame["D-TRAK"] - frame["TRAK"]
        print(frame.to_markdown(index=False, floatfmt=".3f"))
        spread = frame.groupby(["source", "split"])[["TRAK", "D-TRAK", "D-TRAK - TRAK"]].std().reset_index()
        print(spread.to_markdown(index=False, floatfmt=".3f"))
    intervals = pd.DataFrame([paired(run, split) for split in ("val", "gen")])
    print(intervals.to_markdown(index=False))
    intervals.to_csv(out / "paired.csv", index=False)


if __name__ == "__main__":
    main()
