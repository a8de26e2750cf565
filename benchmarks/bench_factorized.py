"""The factorized projection (featurize.projector: factorized) against the dense Normal one, in one run.

    PYTHONPATH=src python benchmarks/bench_factorized.py lds [preset] [--seeds 42,1,2]  # after `snakemake results/lds_<preset>.csv`
    PYTHONPATH=src python benchmarks/bench_factorized.py speed [preset] [--proj-dim 32768] [--device cuda] [--split even]

`lds`: on a finished run's full model, images, subsets and ground truth, featurizes the preset's
first grid set for TRAK (simple) and D-TRAK (square) with the dense projection and the factorized
one with each split of k (featurize.factor_split even and norm; same k, same seed) into a scratch
folder, scores them with the workflow's own score and LDS code and prints the LDS of each with its
bootstrap interval, and the featurization time per sample; then, per function and split, the paired
difference factorized - dense at each one's oracle lambda (the same subset resamples for both:
lds.lds_difference_interval), which tells a shift from the subsets' noise. `--seeds`: all of it for
each of these projection seeds (the projection's own randomness).
`speed`: seconds per sample (K = 10) on the preset's model with random weights: the factorized
projection at k, against per-sample gradients plus their dense projection (the projection is timed at
a small k' and scaled by k / k': its matrix, p x k, is drawn on every call when it does not fit in
memory, and both its draw and its product are linear in k). `--device cuda`: the same on a GPU, where
the dense projection is trak's CudaProjector when fast_jl is installed (timed at k itself: it never
forms the matrix) and the BlockProjector's matrix drawn on the GPU otherwise (timed at k', scaled);
`--dtype tf32` times both in TF32 (featurize.dtype), fp32 (strict, the default) otherwise. `--split`:
the factorized projection's split of k, by default the workflow's (norm: measured on the random
weights and images; the measurement, once per job, is not timed).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from diffattr.device import device_name, precision, resolve_device
from diffattr.featurize import batch_gradients, featurize_split, gradient_norms, make_feature_projector
from diffattr.lds import ground_truth_matrix, lds_difference_interval, lds_table, oracle_predictions
from diffattr.methods import read_predictions
from diffattr.plan import Plan, path
from diffattr.protocol import FEATURIZE_DTYPES, FeatureSet, factor_split
from diffattr.score import score_split
from diffattr.settings import cuda_projector_possible
from presets import preset_model, preset_settings

# (featurize.projector, featurize.factor_split): the dense projection and the factorized one's two splits
VARIANTS = (("normal", None), ("factorized", "even"), ("factorized", "norm"))


def variant_name(projector: str, split: str | None) -> str:
    return projector if split is None else f"{projector} {split}"


def lds(preset: str, workdir: Path, seeds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The LDS table and the paired differences (see the module's docstring), for each projection
    seed of `seeds` (default: the preset's featurize.proj_seed)."""
    settings = preset_settings(preset)
    plan = Plan(preset, settings)
    grid = settings["featurize"]
    weights = plan.weights(path("full_model", experiment=preset))
    truth = {m: path("ground_truth", root=plan.root, model=m) for m in plan.lds_models}
    subsets = path("subsets", experiment=preset)
    lds_spec = {**settings["lds"], "lambda_rules": ["oracle", "heldout"]}
    truth_matrices = {split: ground_truth_matrix(truth, split, int(settings["subsets"]["m"]))[0]
                      for split in ("val", "gen")}
    rows, paired = [], []
    for seed, function in ((seed, function) for seed in seeds or [grid["proj_seed"]] for function in ("simple", "square")):
        fset = FeatureSet(function, grid["timesteps"][0], grid["proj_dims"][0])
        chosen = {}
        for projector, factor_split in VARIANTS:
            variant = variant_name(projector, factor_split)
            spec = {**grid, "scheme": fset.scheme, "noises": 1, "projector": projector, "proj_seed": seed,
                    "factor_split": factor_split}
            stores, seconds = {}, 0.0
            for split in ("train", "val", "gen"):
                stores[split] = workdir / f"{fset.name}_{variant}_{seed}_{split}.zarr".replace(" ", "_")
                start = time.perf_counter()
                featurize_split(weights, settings["model"], plan.images(split), function,
                                fset.timesteps(plan.num_train_timesteps), fset.proj_dim, spec, stores[split],
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
                chosen[variant, split] = oracle_predictions(stored, truth_matrices[split])
                for row in pd.read_csv(table).to_dict("records"):
                    rows.append({"function": function, "projector": variant, "seed": seed, "split": split,
                                 "rule": row["lambda_rule"], "lds": row["lds"], "ci_low": row["ci_low"],
                                 "ci_high": row["ci_high"], "s_per_sample": seconds / samples})
        for variant, split in ((variant_name(*v), split) for v in VARIANTS[1:] for split in ("val", "gen")):
            difference, low, high = lds_difference_interval(
                chosen[variant, split], chosen["normal", split], truth_matrices[split],
                float(lds_spec["confidence"]), int(lds_spec["bootstrap_resamples"]))
            paired.append({"function": function, "projector": variant, "seed": seed, "split": split,
                           "minus normal (oracle)": difference, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows), pd.DataFrame(paired)


def speed(preset: str, proj_dim: int, small_k: int, batch: int, repeats: int = 2,
          device: torch.device = torch.device("cpu"), dtype: str = "fp32", split: str = "norm") -> list[str]:
    """Both paths in featurize.dtype `dtype` (device.precision; fp32 is strict on a GPU, TF32 off);
    the factorized projection's k split `split`, norm measured on the batch's own images."""
    with precision(dtype, device):
        return _speed(preset, proj_dim, small_k, batch, repeats, device, dtype, split)


def _speed(preset, proj_dim, small_k, batch, repeats, device, dtype, split) -> list[str]:
    model, settings = preset_model(preset)
    model = model.to(device)
    unet = settings["model"]["unet"]
    images = torch.from_numpy(np.random.default_rng(0).uniform(
        -1, 1, (batch, unet["in_channels"], unet["sample_size"], unet["sample_size"])).astype(np.float32)).to(device)
    timesteps, seed = list(range(0, 1000, 100)), 0

    def timed(fn):
        fn()  # warm-up (and the matrices' draw, once per job in the workflow)
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    norms = gradient_norms(model, images.cpu().numpy(), "square", seed) if split == "norm" else None
    factorized, info = make_feature_projector(model, proj_dim, seed, device, batch, "factorized", norms)
    fact = timed(lambda: factorized.project(batch_gradients(model, images, range(batch), "square", timesteps, 0,
                                                            layer_rule=factorized.layer_rule)))
    grads = batch_gradients(model, images, range(batch), "square", timesteps, 0)
    gradient = timed(lambda: batch_gradients(model, images, range(batch), "square", timesteps, 0))
    # fast_jl draws no matrix (its cost is the product, at k itself); the others are timed at k'
    timed_k = proj_dim if cuda_projector_possible(device.type) else small_k
    dense, dense_info = make_feature_projector(model, timed_k, seed, device, batch, "normal")
    projection = timed(lambda: dense.project(grads, model_id=0)) * proj_dim / timed_k
    scaled = f"k = {timed_k} timed, x {proj_dim // timed_k}" if timed_k != proj_dim else f"k = {proj_dim}"
    on_gpu = (f", {device_name(device)}, {dtype}", f"; dense projection: {dense_info['projector']}") \
        if device.type == "cuda" else ("", "")  # the CPU's lines as before --device
    return [f"# {preset} UNet, p = {grads.shape[1]}, batch {batch}, K = 10, k = {proj_dim}, torch {torch.__version__}"
            f"{on_gpu[0]}",
            f"factorized, {split} split: s = {sides(info['factor_sides'])} per side, {info['factorized_layers']} "
            f"layers, dense part {info['dense_dim']} columns{on_gpu[1]}",
            "| path | s per sample |", "|---|---|",
            f"| factorized projection | {fact / batch:.3g} |",
            f"| per-sample gradients | {gradient / batch:.3g} |",
            f"| their dense projection ({scaled}) | {projection / batch:.3g} |",
            f"| dense path | {(gradient + projection) / batch:.3g} |",
            f"| **ratio** | **{(gradient + projection) / fact:.1f}x** |"]


def sides(values: list[int]) -> str:
    """A split's sides in a line: the one side of an even split, or their range and median."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high} (median {int(np.median(values))})"


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timing holds the computation and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["lds", "speed"])
    parser.add_argument("preset", nargs="?", default="default")
    parser.add_argument("--proj-dim", type=int, default=32768)
    parser.add_argument("--small-k", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="speed only: cpu (the default), cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="fp32", choices=FEATURIZE_DTYPES,
                        help="speed only: the gradients' arithmetic (featurize.dtype; tf32 on a GPU only)")
    parser.add_argument("--split", default=factor_split({"projector": "factorized"}), choices=["even", "norm"],
                        help="speed only: the factorized projection's featurize.factor_split (default: the workflow's)")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")],
                        help="lds only: projection seeds, comma-separated (default: the preset's proj_seed)")
    args = parser.parse_args(argv)
    if args.what == "speed":
        print("\n".join(speed(args.preset, args.proj_dim, args.small_k, args.batch,
                               device=resolve_device(args.device), dtype=args.dtype, split=args.split)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        table, paired = lds(args.preset, Path(workdir), args.seeds)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print()
    print(paired.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
