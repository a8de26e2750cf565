"""Features in TF32 (featurize.dtype: tf32), emulated on this CPU, against fp32: their LDS on a finished run.

    PYTHONPATH=src:benchmarks python benchmarks/bench_tf32.py [preset] [--seeds 42,1,2]  # after `snakemake results/lds_<preset>.csv`

On an Ampere or newer GPU, TF32 convolutions and matrix products read their fp32 operands with 10 of
their 23 mantissa bits and accumulate in fp32. A CPU ignores the setting (featurize computes plain
fp32 there), so `emulated_tf32` stands in: a dispatch mode that truncates to 10 mantissa bits the
operands of every convolution (forward and both gradients) and matrix product, and of nothing else.
Truncation is the coarser of the two ways an fp32 value can become TF32 (rounding to nearest halves
its error). It holds inside featurize's `precision('tf32')` blocks only, as the GPU's setting does:
the gradients and the norm split's measurement, not the dense projection.

paired_lds.py then compares, on the same subset resamples, fp32 features (the preset's dense
projection) with TF32 ones, and with TF32 ones projected by the factorized projection (its default
norm split): the two options the cost model prices for cifar2-fast.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffattr.featurize
from diffattr.device import precision
from paired_lds import Variant, paired_lds, print_tables

aten = torch.ops.aten
# The products' operand positions (a bias added after the product stays fp32, as on the GPU)
PRODUCTS = {aten.convolution.default: (0, 1), aten.convolution_backward.default: (0, 1, 2),
            aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
            aten.baddbmm.default: (1, 2)}


def truncate_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values with the low 13 of their 23 mantissa bits cleared: TF32's 10 bits, truncated."""
    return (x.view(torch.int32) & -(1 << 13)).view(torch.float32)


class TF32Products(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            args = tuple(truncate_to_tf32(a) if i in PRODUCTS[func] and isinstance(a, torch.Tensor)
                         and a.dtype == torch.float32 else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def emulated_precision(name: str, device: torch.device):
    """device.precision, with tf32 emulated by TF32Products (on any device)."""
    if name != "tf32":
        with precision(name, device):
            yield
        return
    with precision("fp32", device), TF32Products():
        yield


def emulated_tf32():
    """featurize's precision blocks with tf32 emulated."""
    return mock.patch.object(diffattr.featurize, "precision", emulated_precision)


VARIANTS = [Variant("fp32", {}),
            Variant("tf32", {"dtype": "tf32"}, emulated_tf32),
            Variant("tf32 factorized", {"dtype": "tf32", "projector": "factorized"}, emulated_tf32)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="default")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")],
                        help="projection seeds, comma-separated (default: the preset's proj_seed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        print_tables(*paired_lds(args.preset, Path(workdir), VARIANTS, args.seeds))


if __name__ == "__main__":
    main()
