"""The factorized projection (featurize.projector: factorized) against the dense Normal one, in one run.

    # lds and shape: after `snakemake results/lds_<preset>.csv`
    PYTHONPATH=src python benchmarks/bench_factorized.py lds [preset] [--seeds 42,1,2] [--dense-k 512,256]
    PYTHONPATH=src python benchmarks/bench_factorized.py shape [preset] [--function simple]
    PYTHONPATH=src python benchmarks/bench_factorized.py speed [preset] [--proj-dim 32768] [--device cuda] \
        [--split even]

`lds`: paired_lds.py on a finished run: the dense projection, and the factorized one with each split
of k (featurize.factor_split even and norm; same k, same seed), each factorized one against the dense
one on the same subset resamples. `--seeds`: all of it for each of these projection seeds (the
projection's own randomness). `--dense-k`: the dense projection at smaller k too, against the same one.
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
from pathlib import Path

import numpy as np
import torch

from diffattr.data import load_images, load_labels
from diffattr.device import device_name, precision, resolve_device
from diffattr.featurize import batch_gradients, gradient_norms, make_feature_projector
from diffattr.models import load_model
from diffattr.plan import Plan, path
from diffattr.protocol import CALIBRATION, FEATURIZE_DTYPES, FeatureSet, factor_split
from diffattr.settings import cuda_projector_possible
from paired_lds import Variant, paired_lds, print_tables
from presets import preset_model, preset_settings
from stage_throughput import random_images, timed as once

# the dense projection, then the factorized one with each split of k
VARIANTS = [Variant("normal", {"projector": "normal"}),
            *(Variant(f"factorized {split}", {"projector": "factorized", "factor_split": split})
              for split in ("even", "norm"))]


def speed(preset: str, proj_dim: int, small_k: int, batch: int, repeats: int = 2,
          device: torch.device = torch.device("cpu"), dtype: str = "fp32", split: str = "norm") -> list[str]:
    """Both paths in featurize.dtype `dtype` (device.precision; fp32 is strict on a GPU, TF32 off);
    the factorized projection's k split `split`, norm measured on the batch's own images."""
    with precision(dtype, device):
        return _speed(preset, proj_dim, small_k, batch, repeats, device, dtype, split)


def _speed(preset, proj_dim, small_k, batch, repeats, device, dtype, split) -> list[str]:
    model, settings = preset_model(preset)
    model = model.to(device)
    images = torch.from_numpy(random_images(settings, batch)).to(device)
    timesteps, seed = list(range(0, 1000, 100)), 0

    def timed(fn):
        fn()  # warm-up (and the matrices' draw, once per job in the workflow)
        return min(once(fn) for _ in range(repeats))

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


def kronecker_variance(g: torch.Tensor, h: torch.Tensor, s_out: int, s_in: int) -> float:
    """The variance of <P_out^T g P_in, P_out^T h P_in>, the factorized estimate of <g, h> for two
    (out x in) gradients, with P_out (out x s_out) and P_in (in x s_in) of N(0, 1/s) entries:
        C_out / s_out + C_in / s_in + (|g^T h|^2 + |h g^T|^2 + D) / (s_out s_in),
    where M = h g^T, C_out = |M|^2 + tr(M^2), C_in = |g^T h|^2 + tr(M^2), D = |g|^2 |h|^2 + <g, h>^2
    (|.| Frobenius). It follows from Var[tr(P^T A P)] = (|A|^2 + tr(A^2)) / s and, for A = P P^T,
    E[A B A] = B + (B^T + tr(B) I) / s. A dense Normal sketch with c columns has variance D / c."""
    m = h @ g.T
    trace_m2 = torch.trace(m @ m).item()
    out_side, in_side = m.pow(2).sum().item(), (g.T @ h).pow(2).sum().item()
    d = dense_variance(g, h, 1)
    return (out_side + trace_m2) / s_out + (in_side + trace_m2) / s_in + (in_side + out_side + d) / (s_out * s_in)


def dense_variance(g: torch.Tensor, h: torch.Tensor, columns: int) -> float:
    """The variance of a dense Normal sketch's estimate of <g, h> with `columns` columns."""
    return (g.pow(2).sum().item() * h.pow(2).sum().item() + (g * h).sum().item() ** 2) / columns


def best_shape(pairs: list[tuple[torch.Tensor, torch.Tensor]], columns: int) -> tuple[int, int, float]:
    """The block (s_out, s_in) of at most `columns` columns, each side at most its gradient's, with the
    least summed `kronecker_variance` over `pairs`, and that variance."""
    out, inputs = pairs[0][0].shape
    shapes = [(a, min(inputs, columns // a)) for a in range(1, min(out, columns) + 1)]
    return min(((a, b, sum(kronecker_variance(g, h, a, b) for g, h in pairs)) for a, b in shapes),
               key=lambda shape: shape[2])


def shape(preset: str, function: str) -> list[str]:
    """The `shape` table (see the module's docstring) for TRAK (simple) or D-TRAK (square) features of
    the preset's first grid set (K, k), in float64 on the CPU."""
    settings = preset_settings(preset)
    plan, grid = Plan(preset, settings), settings["featurize"]
    fset = FeatureSet(function, grid["timesteps"][0], grid["proj_dims"][0])
    model = load_model(settings["model"], Path(plan.weights(path("full_model", experiment=preset))).parent)
    model = model.for_per_sample_gradients().train(False)
    images, labels = load_images(plan.samples("train")), load_labels(plan.samples("train"))
    count, seed = CALIBRATION["images"], int(grid["noise_seed"])
    norms = gradient_norms(model, images, function, seed, labels)
    projector, _ = make_feature_projector(model, fset.proj_dim, int(grid["proj_seed"]), torch.device("cpu"), count,
                                          "factorized", norms)
    grads = batch_gradients(model, torch.from_numpy(images[:count]), range(count), function,
                            fset.timesteps(plan.num_train_timesteps), seed,
                            None if labels is None else labels[:count]).double()
    side_of = {id(m.weight): projector.factors[id(m)][0].shape[1]
               for m in model.network().modules() if id(m) in projector.factors}
    rows = [f"# {preset}, {function}, K = {fset.n_timesteps}, k = {fset.proj_dim}: pairs of the first {count} "
            "train images; effective columns: a dense sketch's with the block's variance", "",
            "| layer | out x in | block | cosine | effective columns | centred: cosine | effective | best shape | "
            "its variance |", "|---|---|---|---|---|---|---|---|---|"]
    totals, offset = np.zeros(3), 0
    for name, p in model.featurized_parameters():
        per_sample, offset = grads[:, offset:offset + p.numel()].reshape(count, p.shape[0], -1), offset + p.numel()
        if id(p) not in side_of:
            continue
        side = side_of[id(p)]
        centred = per_sample - per_sample.mean(0)
        raw, centred = (list(zip(x[0::2], x[1::2])) for x in (per_sample, centred))
        square = [sum(kronecker_variance(g, h, side, side) for g, h in pairs) for pairs in (raw, centred)]
        effective = [sum(dense_variance(g, h, 1) for g, h in pairs) / kron
                     for pairs, kron in zip((raw, centred), square)]
        cosines = [np.mean([(g * h).sum().item() / (g.norm() * h.norm()).item() for g, h in pairs])
                   for pairs in (raw, centred)]
        a, b, best = best_shape(centred, side * side)
        totals += (side * side, *effective)
        rows.append(f"| {name} | {p.shape[0]} x {per_sample.shape[2]} | {side} x {side} | {cosines[0]:.3f} | "
                    f"{effective[0]:.1f} | {cosines[1]:+.3f} | {effective[1]:.1f} | {a} x {b} | "
                    f"{best / square[1]:.2f} |")
    rows.append(f"| **all {len(side_of)} blocks** | | {totals[0]:.0f} columns | | {totals[1]:.0f} | | "
                f"{totals[2]:.0f} | | |")
    return rows


def sides(values: list[int]) -> str:
    """A split's sides in a line: the one side of an even split, or their range and median."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high} (median {int(np.median(values))})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["lds", "speed", "shape"])
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
    parser.add_argument("--dense-k", type=lambda text: [int(x) for x in text.split(",")], default=[],
                        help="lds only: also the dense projection at these smaller k, comma-separated")
    parser.add_argument("--function", default="square", choices=["simple", "square"],
                        help="shape only: TRAK's (simple) or D-TRAK's (square) features")
    args = parser.parse_args(argv)
    if args.what == "shape":
        print("\n".join(shape(args.preset, args.function)))
        return
    if args.what == "speed":
        print("\n".join(speed(args.preset, args.proj_dim, args.small_k, args.batch,
                               device=resolve_device(args.device), dtype=args.dtype, split=args.split)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        smaller = [Variant(f"normal k={k}", {"projector": "normal"}, proj_dim=k) for k in args.dense_k]
        print_tables(*paired_lds(args.preset, Path(workdir), VARIANTS + smaller, args.seeds))


if __name__ == "__main__":
    main()
