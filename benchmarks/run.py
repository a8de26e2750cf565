"""Run every engine's benchmark and print one table: `python benchmarks/run.py [--full] [engine ...]`.

Tiny sizes by default (seconds; checks that ours and the reference give the same outputs); --full
gives the sizes recorded in benchmarks/README.md. Exits 1 when an output differs beyond its tolerance.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

import bench_featurize
import bench_project
import bench_score
from diffattr.device import resolve_device
from harness import table

ENGINES = {"featurize": bench_featurize, "project": bench_project, "score": bench_score}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full sizes (minutes) instead of tiny ones")
    parser.add_argument("engines", nargs="*", metavar="engine", help=f"some of {', '.join(ENGINES)} (default: all)")
    parser.add_argument("--device", default="cpu",
                        help="where featurization runs: cpu (default) or cuda[:N]; the other engines run on the CPU")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine {', '.join(unknown)}: expected some of {', '.join(ENGINES)}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {'full' if args.full else 'tiny'} sizes", flush=True)
    rows = []
    for name in args.engines or ENGINES:
        new = (ENGINES[name].run(args.full, resolve_device(args.device)) if name == "featurize"
               else ENGINES[name].run(args.full))
        print("\n".join(table(new).splitlines()[2:]), flush=True)
        rows += new
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
