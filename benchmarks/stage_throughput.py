"""Throughput of the GPU stages on a preset's model, for sizing a cluster run: training steps/s,
ground-truth evaluations/s (per precision) and DDIM images/s. No reference: these are the stages'
own code (`train.train`, `ground_truth.query_losses`, `generate.sample`) on random weights and images.

    PYTHONPATH=src python benchmarks/stage_throughput.py [preset] [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffattr.device import device_name, resolve_device
from diffattr.generate import sample
from diffattr.ground_truth import query_losses
from diffattr.models import build_model
from diffattr.train import train
from presets import preset_settings


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="cifar2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed (after 5 warm-up steps)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    settings = preset_settings(args.preset)
    model = build_model(settings["model"], seed=0)  # the default (fused) attention, as the stages use it
    unet = settings["model"]["unet"]
    shape = (unet["in_channels"], unet["sample_size"], unet["sample_size"])
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (1024, *shape)).astype(np.float32)
    print(f"# {args.preset} on {device_name(device)}, torch {torch.__version__}")
    print("| stage | setting | throughput |\n|---|---|---|")

    spec = {**settings["train"], "steps": 5}
    train(model, torch.from_numpy(images), None, spec, seed=0, device=device)  # warm-up
    seconds = timed(lambda: train(model, torch.from_numpy(images), None, {**spec, "steps": args.steps},
                                  seed=0, device=device))
    batch = int(settings["train"]["batch_size"])
    print(f"| train | batch {batch}, fp32 | {args.steps / seconds:.3g} steps/s ({batch * args.steps / seconds:.4g} images/s) |")

    gt = settings["ground_truth"]
    timesteps = list(range(0, 1000, 10))
    for dtype in ("fp32", "tf32", "bf16"):
        n = 256
        query_losses(model, images[:8], timesteps[:2], [0], int(gt["batch_size"]), device, dtype)  # warm-up
        seconds = timed(lambda: query_losses(model, images[:n], timesteps, [0], int(gt["batch_size"]), device, dtype))
        print(f"| ground truth | batch {gt['batch_size']}, {dtype} | {n * len(timesteps) / seconds:.4g} (image, t) evaluations/s |")

    gen = settings["generate"]
    n = int(gen["batch_size"])
    seconds = timed(lambda: sample(model, n, shape, int(gen["steps"]), 0.0, 0, n, device, "fp32"))
    print(f"| generate | {gen['steps']} DDIM steps, batch {n}, fp32 | {n / seconds:.3g} images/s |")


if __name__ == "__main__":
    main()
