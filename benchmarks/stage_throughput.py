"""Throughput of the GPU stages on a preset's model, for sizing a cluster run: training steps/s,
ground-truth evaluations/s (per precision), per-sample gradients/s (fp32, and tf32 on a GPU), the same
projected by the factorized projector, projected row-dimensions/s and DDIM image-steps/s: the units
of diffattr.cost, which `benchmarks/cost.py --measure` reads from here.
No reference: these are the stages' own code (`train.train`, `ground_truth.query_losses`,
`featurize.batch_gradients`, `project.make_projector`, `generate.sample`) on random weights and images.
One comparison for the question how many models a training job should train: the forward and
backward pass of a training step for 3 models one after another against the same 3 models stacked
(torch.func.stack_module_state, vmap over the weights, dropout drawn per model).
And the training speed options (train.channels_last, train.compile; `option_throughputs`): training
steps/s of each precision with each option, beside the plain training's, printed as
train_step_<dtype>[_cl|_compiled] (units of the cost model, diffattr.cost.train_unit); on a CPU fp32
only. Not both together: train refuses them (wrong gradients, diffattr.train). A compiled variant's
warm-up pays its compilation (minutes on a CPU; about 90 s on an H200): the unit `compilation`.

    PYTHONPATH=src python benchmarks/stage_throughput.py [preset] [--device cuda] [--options-only]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from diffattr.cost import TRAIN_OPTION_SUFFIXES, train_unit
from diffattr.device import device_name, precision, resolve_device
from diffattr.featurize import batch_gradients, gradient_norms, make_feature_projector
from diffattr.generate import sample
from diffattr.ground_truth import query_losses
from diffattr.models import build_model
from diffattr.project import make_projector
from diffattr.protocol import factor_split
from diffattr.settings import CUDA_PROJ_MULTIPLE, cuda_projector_possible
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


def stacked_against_sequential(settings: dict, images: np.ndarray, device, models: int = 3,
                               repeats: int = 10) -> str:
    """Median seconds of the gradient of a training step's loss (batch `train.batch_size` each) for
    `models` models one after another and for the same models stacked into one vmapped call."""
    nets = [build_model(settings["model"], seed=r).to(device).train(True).unet for r in range(models)]
    batch = int(settings["train"]["batch_size"])
    x = torch.from_numpy(images[:batch]).to(device).expand(models, *images[:batch].shape).contiguous()
    t = torch.randint(0, 1000, (models, batch), device=device)
    noise = torch.randn_like(x)

    def loss(net, params, x, t, noise):
        return (torch.func.functional_call(net, params, (x, t)).sample - noise).square().mean()

    def sequential():  # as train.train: autograd on each model in turn
        return [dict(zip(dict(net.named_parameters()), torch.autograd.grad(
            (net(x[r], t[r]).sample - noise[r]).square().mean(), list(net.parameters()))))
            for r, net in enumerate(nets)]

    params, buffers = torch.func.stack_module_state(nets)
    template = copy.deepcopy(nets[0]).to("meta")
    stacked_grad = torch.func.vmap(torch.func.grad(lambda p, b, *data: loss(template, (p, b), *data)),
                                   randomness="different")
    for net in [*nets, template]:  # the same gradients without dropout: the two do the same work
        net.train(False)
    with precision("fp32", device):  # no TF32 on a GPU for the comparison
        stacked, one_by_one = stacked_grad(params, buffers, x, t, noise), sequential()
    # within 1e-4 of the largest gradient entry: a parameter whose gradient is nearly zero (~1e-11 on the
    # GPU for one of the cifar2 UNet's) differs in its rounding alone
    scale = max(max(g.abs().max().item() for g in grads.values()) for grads in one_by_one)
    for name, value in stacked.items():
        expected = torch.stack([grads[name] for grads in one_by_one])
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-4 * scale)
    for net in [*nets, template]:
        net.train(True)
    times = {}
    for name, fn in (("one after another", sequential),
                     ("stacked", lambda: stacked_grad(params, buffers, x, t, noise))):
        fn()
        times[name] = statistics.median(timed(fn) for _ in range(repeats))
    return (f"batch {batch} each, fp32: one after another {times['one after another']:.3g} s, stacked "
            f"{times['stacked']:.3g} s per step ({times['one after another'] / times['stacked']:.2f}x)")


def unit_throughputs(settings: dict, device, steps: int = 30, gt_images: int = 256,
                     feature_batch: int | None = None, proj_dim: int = 64, report=None) -> dict[str, float]:
    """Units of work per second (diffattr.cost.UNITS) of the preset's model on `device`, each timed
    after a warm-up call on random weights and images: training steps at `train.batch_size` and
    ground-truth evaluations, per precision (fp32 only on a CPU), per-sample gradients (K = 10, `feature_batch` samples,
    default `featurize.batch_size`; `gradient` in fp32, `gradient_tf32` on a GPU only), the same projected by
    the factorized projector at the preset's largest k (`factorized`, `factorized_tf32`), projected row-dimensions
    (the job's projector at k = `proj_dim`: its cost is linear in k, so a small k measures it; rounded up to a
    multiple of 512 where the projector is fast_jl's, which refuses other k), and DDIM image-steps (per
    precision on a GPU, fp32 on a CPU).
    `report(unit, rate)`, when given, is called as each rate is measured (a later stage's failure
    then loses only its own)."""
    model = build_model(settings["model"], seed=0)  # the default (fused) attention, as the stages use it
    shape = image_shape(settings)
    images = random_images(settings, 1024)
    rates = _Rates(report)

    for dtype in ("fp32", "tf32", "bf16", "fp16") if device.type == "cuda" else ("fp32",):  # train.dtype's choices
        spec = {**settings["train"], "steps": 5, "dtype": dtype}
        train(model, torch.from_numpy(images), None, spec, seed=0, device=device)  # warm-up
        rates[train_unit(spec)] = steps / timed(lambda: train(model, torch.from_numpy(images), None,
                                                              {**spec, "steps": steps}, seed=0, device=device))

    gt = settings["ground_truth"]
    timesteps = list(range(0, 1000, 10))
    for dtype in ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",):
        query_losses(model, images[:8], timesteps[:2], [0], int(gt["batch_size"]), device, dtype)  # warm-up
        seconds = timed(lambda: query_losses(model, images[:gt_images], timesteps, [0], int(gt["batch_size"]),
                                             device, dtype))
        rates[f"eval_{dtype}"] = gt_images * len(timesteps) / seconds

    featurizer = build_model(settings["model"], seed=0).for_per_sample_gradients().to(device).train(False)
    batch = int(feature_batch or settings["featurize"]["batch_size"])
    x, K = torch.from_numpy(images[:batch]).to(device), 10
    timesteps = list(range(0, 1000, 1000 // K))
    for dtype in ("fp32", "tf32") if device.type == "cuda" else ("fp32",):  # featurize.dtype's choices

        def gradients():
            with precision(dtype, device):  # as featurize.features (torch's default would be TF32 convolutions)
                return batch_gradients(featurizer, x, range(batch), "square", timesteps, 0)

        gradients()  # warm-up
        rates["gradient" if dtype == "fp32" else f"gradient_{dtype}"] = batch * K / timed(gradients)
    factorized_k = max(int(k) for k in settings["featurize"]["proj_dims"])  # the unit's price for every k
    # the preset's split (featurize.factor_split), a norm split measured on these images (not timed: once a job)
    split = factor_split({**settings["featurize"], "projector": "factorized"})
    norms = gradient_norms(featurizer, images[:batch], "square", 0) if split == "norm" else None
    factorized, _ = make_feature_projector(featurizer, factorized_k, 0, device, batch, "factorized", norms)
    for dtype in ("fp32", "tf32") if device.type == "cuda" else ("fp32",):

        def factorized_features():
            with precision(dtype, device):
                return factorized.project(batch_gradients(featurizer, x, range(batch), "square", timesteps, 0,
                                                          layer_rule=factorized.layer_rule))

        factorized_features()  # warm-up
        rates["factorized" if dtype == "fp32" else f"factorized_{dtype}"] = batch * K / timed(factorized_features)
    with precision("fp32", device):
        grads = batch_gradients(featurizer, x, range(batch), "square", timesteps, 0)
    if cuda_projector_possible(device.type):
        proj_dim = -(-proj_dim // CUDA_PROJ_MULTIPLE) * CUDA_PROJ_MULTIPLE
    projector, _ = make_projector(grads.shape[1], proj_dim, 0, device, batch)
    projector.project(grads, model_id=0)  # warm-up (draws the matrix where it is kept)
    rates["projection"] = batch * proj_dim / timed(lambda: projector.project(grads, model_id=0))

    gen = settings["generate"]
    n = int(gen["batch_size"])
    for dtype in ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",):  # generate.dtype's choices
        sample(model, n, shape, 2, 0.0, 0, n, device, dtype)  # warm-up
        rates[f"ddim_step_{dtype}"] = n * int(gen["steps"]) / timed(
            lambda: sample(model, n, shape, int(gen["steps"]), 0.0, 0, n, device, dtype))
    return dict(rates)


class _Rates(dict):
    """A dict that passes each rate to `report` as it is set."""

    def __init__(self, report=None):
        super().__init__()
        self.report = report

    def __setitem__(self, unit, rate):
        super().__setitem__(unit, rate)
        if self.report is not None:
            self.report(unit, rate)


# train's speed options: the suffix of a variant's rate (diffattr.cost.train_unit), its settings (not
# both together: train refuses them, settings.COMPILE_WITH_CHANNELS_LAST)
VARIANTS = {"": {}, **{suffix: {key: True} for key, suffix in TRAIN_OPTION_SUFFIXES.items()}}


def option_throughputs(settings: dict, device, steps: int = 30, variants=None, rates=None) -> dict[str, float]:
    """Training steps/s at `train.batch_size` of each precision (bf16, fp32, tf32 on a GPU; fp32 on a
    CPU) with each of train's speed options (`variants`, suffixes of VARIANTS, default all), the plain
    training measured again in the same run; each timed after a 5-step warm-up (which compiles a
    compiled variant: minutes on a CPU) on a fresh model of the preset's on random images; a compiled
    variant's warm-up less its steps' time gives `compilation` (per second: the cost model's unit)."""
    images = torch.from_numpy(random_images(settings, 1024))
    variants = list(VARIANTS) if variants is None else variants
    rates = {} if rates is None else rates  # a _Rates reports each as it is measured
    for dtype in ("bf16", "fp32", "tf32") if device.type == "cuda" else ("fp32",):  # the likeliest choice first
        for suffix in variants:
            options = VARIANTS[suffix]
            model = build_model(settings["model"], seed=0)
            spec = {**settings["train"], "steps": 5, "dtype": dtype, **options}
            warm_up = timed(lambda: train(model, images, None, spec, seed=0, device=device))  # (compiles)
            rate = rates[train_unit(spec)] = steps / timed(
                lambda: train(model, images, None, {**spec, "steps": steps}, seed=0, device=device))
            if options.get("compile"):  # the warm-up less its steps' time: compilations per second
                rates["compilation"] = 1 / max(warm_up - spec["steps"] / rate, 1e-9)
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="cifar2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed (after 5 warm-up steps)")
    parser.add_argument("--options-only", action="store_true",
                        help="only the training speed options' rates (option_throughputs)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    settings = preset_settings(args.preset)
    print(f"# {args.preset} on {device_name(device)}, torch {torch.__version__}")
    if not args.options_only:
        print("| unit | per second |\n|---|---|")
        unit_throughputs(settings, device, args.steps, report=lambda unit, rate: print(f"| {unit} | {rate:.4g} |",
                                                                                        flush=True))
        images = random_images(settings, 1024)
        print(f"\ntrain, 3 models: {stacked_against_sequential(settings, images, device)}\n", flush=True)
    print("| training (train.dtype, channels_last, compile) | steps per second | x plain |\n|---|---|---|")

    def row(name, rate):  # each variant follows its plain training in VARIANTS' order
        if name == "compilation":  # of the variant just printed
            print(f"| (its compilation: {1 / rate:.1f} s) | | |", flush=True)
            return
        plain = rates[name.removesuffix("_compiled").removesuffix("_cl")]
        print(f"| {name} | {rate:.4g} | {rate / plain:.2f} |", flush=True)

    rates = _Rates(row)
    option_throughputs(settings, device, args.steps, rates=rates)


def image_shape(settings: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the preset's pixel UNet's input."""
    unet = settings["model"]["unet"]
    return unet["in_channels"], unet["sample_size"], unet["sample_size"]


def random_images(settings: dict, count: int) -> np.ndarray:
    """`count` float32 images of the preset's shape, uniform in [-1, 1] (seed 0: the same in every harness)."""
    return np.random.default_rng(0).uniform(-1, 1, (count, *image_shape(settings))).astype(np.float32)


if __name__ == "__main__":
    main()
