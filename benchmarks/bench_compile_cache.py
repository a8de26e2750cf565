"""What `train.compile` costs a training job when the jobs share inductor's on-disk cache
(TORCHINDUCTOR_CACHE_DIR; the workflow's `compile_cache`, docs/gpu.md): the compilation of the first
job, whose cache is empty, against that of the jobs after it, which find the first one's kernels
and graphs there. Dynamo still traces the network in every job; the cache saves AOTAutograd's
graphs and inductor's code generation and kernel compilation (C++ on a CPU, Triton on a GPU).

Each run is a fresh interpreter (the in-process caches would hide the on-disk one's effect): it
builds the preset's model, trains it `--warm-up` steps compiled (that pays the compilation) and then
`--steps` more; the warm-up less its steps' time at the timed rate is its compilation. The first run
finds an empty cache folder, the next `--runs` - 1 the folder the first one filled. No reference
beyond the cold run: this is the ratio the cost model's `compilation_cached` is about.

    PYTHONPATH=src:benchmarks python benchmarks/bench_compile_cache.py [preset] [--device cuda]
        [--dtype bf16] [--batch 32] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

RESULT = "compile-cache-run: "


def child(args) -> None:
    import torch
    from torch._dynamo.utils import compile_times

    from diffattr.device import resolve_device
    from diffattr.models import build_model
    from diffattr.train import train
    from presets import preset_settings
    from stage_throughput import random_images, timed

    settings = preset_settings(args.preset)
    device = resolve_device(args.device)
    images = torch.from_numpy(random_images(settings, 512))
    spec = {**settings["train"], "dtype": args.dtype, "compile": True,
            "batch_size": args.batch or settings["train"]["batch_size"]}
    model = build_model(settings["model"], seed=0)

    def seconds(steps: int) -> float:
        return timed(lambda: train(model, images, None, {**spec, "steps": steps}, seed=0, device=device))

    warm_up = seconds(args.warm_up)
    rate = args.steps / seconds(args.steps)
    # Dynamo's phase timers (a private table of torch's; names as in torch 2.11-2.13), summed over graphs
    phases = dict(zip(*compile_times(repr="csv", aggregate=True)))

    def phase(*names: str) -> float:
        return sum(float(phases.get(name, 0)) for name in names)

    print(RESULT + json.dumps({"warm_up_s": warm_up, "steps_per_s": rate,
                               "compilation_s": warm_up - args.warm_up / rate,
                               "tracing_s": phase("bytecode_tracing"),
                               "backend_s": phase("OutputGraph.call_user_compiler", "backward._backward_impl")}),
          flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="cifar2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", help="train.dtype (bf16: the one compile pays in on a GPU)")
    parser.add_argument("--batch", type=int, default=0, help="train.batch_size (default: the preset's)")
    parser.add_argument("--warm-up", type=int, default=3, help="compiled steps that pay the compilation")
    parser.add_argument("--steps", type=int, default=10, help="compiled steps timed after the warm-up")
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters: the first cold, the rest cached")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    forwarded = [args.preset, "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
                 "--warm-up", str(args.warm_up), "--steps", str(args.steps), "--child"]
    batch = args.batch or "the preset's"
    print(f"# {args.preset}, train.dtype {args.dtype}, device {args.device}, batch {batch}; "
          "a fresh interpreter per run, one cache folder for all")
    print("| run | inductor cache | compilation (s) | x cold | of it: Dynamo's tracing (s) | backend (s) | rest (s) "
          "| compiled steps/s |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        env.pop("TRITON_CACHE_DIR", None)  # Triton's kernels then go under the same folder
        cold = None
        for run in range(1, args.runs + 1):
            done = subprocess.run([sys.executable, __file__, *forwarded], env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
            if done.returncode or not lines:
                sys.exit(f"run {run} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1].removeprefix(RESULT))
            cold = cold or result["compilation_s"]
            rest = result["compilation_s"] - result["tracing_s"] - result["backend_s"]
            print(f"| {run} | {'empty' if run == 1 else 'filled by run 1'} | {result['compilation_s']:.1f} | "
                  f"{result['compilation_s'] / cold:.2f} | {result['tracing_s']:.1f} | {result['backend_s']:.1f} | "
                  f"{rest:.1f} | {result['steps_per_s']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
