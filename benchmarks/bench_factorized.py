"""The factorized projection (featurize.projector: factorized) against the dense Normal one, in one run.

    PYTHONPATH=src python benchmarks/bench_factorized.py lds [preset] [--seeds 42,1,2]  # after `snakemake results/lds_<preset>.csv`
    PYTHONPATH=src python benchmarks/bench_factorized.py speed [preset] [--proj-dim 32768] [--device cuda] [--split even]

`lds`: paired_lds.py on a finished run: the dense projection, and the factorized one with each split
of k (featurize.factor_split even and norm; same k, same seed), each factorized one against the dense
one on the same subset resamples. `--seeds`: all of it for each of these projection seeds (the
projection's own randomness).
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

from diffattr.device import device_name, precision, resolve_device
from diffattr.featurize import batch_gradients, gradient_norms, make_feature_projector
from diffattr.protocol import FEATURIZE_DTYPES, factor_split
from diffattr.settings import cuda_projector_possible
from paired_lds import Variant, paired_lds, print_tables
from presets import preset_model
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


def sides(values: list[int]) -> str:
    """A split's sides in a line: the one side of an even split, or their range and median."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high} (median {int(np.median(values))})"


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
        print_tables(*paired_lds(args.preset, Path(workdir), VARIANTS, args.seeds))


if __name__ == "__main__":
    main()
