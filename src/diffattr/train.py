"""Training a diffusion model on a set of images with the protocol's recipe (L_Simple, AdamW, cosine).

L_Simple is the mean squared error of the network's prediction against its target: the noise for
an epsilon-prediction model, the velocity for a v-prediction one (`DiffusionModel.target`).

`train.dtype` is the arithmetic: the protocol's fp32, tf32, or mixed precision (bf16, fp16) as the
diffusers LoRA example that the reference launches with `accelerate --mixed_precision=fp16`: the
forward pass under autocast, the loss in fp32, fp16's gradients through a loss scaler (unscaled
before clipping; a step the scaler skips for overflowing gradients does not advance the learning
rate schedule, as accelerate's), the trainable parameters and the optimizer in fp32. We call
torch.amp directly, not accelerate's Accelerator, whose process-wide state fixes one precision per
process while tests train in several, and whose scaler and schedule wrappers would have to be
checkpointed through its own files to resume bitwise. Frozen weights (a LoRA's base) stay fp32 in
memory: autocast casts them per operation, so a trained model's base is bitwise the one it started from.

Two opt-in speed options, off by default (their H200 speed and what is not yet shown: docs/gpu.md):
`train.channels_last` puts the network's weights (a LoRA kind's whole UNet, its frozen base too) and
each input batch in torch.channels_last memory format while training; the network is put back in the
ordinary (contiguous) layout when training ends, so the weights saved and returned are as without it
(the values are those of a training in the other layout, which sums in another order: equal within
float rounding, not bitwise, without dropout; dropout draws its masks in memory order, so with dropout
it is another training, as seeded and as resumable). `train.compile` compiles the network in place (`nn.Module.compile`,
inductor) for training: its state_dict keys and saving are unchanged, and it is uncompiled when
training ends. It is compiled with inductor's `layout_optimization` off: on, torch 2.13's inductor
(CPU) computed wrong weight gradients for the diffusers UNet (the tiny test UNet: 74 of its 104
parameters' gradients, all those upstream of the up path's first upsampler, zero or off; the forward
pass right; tests/test_train_speed.py), where off, and with `aot_eager`, they are eager's within
rounding; whether CUDA's inductor has the same fault is not known yet (tests/test_cuda.py checks it).
Both options together are refused (settings.COMPILE_WITH_CHANNELS_LAST): with the network and its
input in channels_last, torch 2.13's inductor (CPU) computed wrong gradients whatever its layout
optimization (the tiny UNet's gradient norm 15% off at the first step; the LoRA's B matrices
left at their initial values), as it does for its own channels-last layouts.
Compiled dropout draws its randomness differently from eager dropout (inductor's
kernels take seeds drawn from torch's global generator, not eager's per-element draws), so a compiled
training with dropout is not the eager one; it is deterministic given the seed on CPU and resumes
bitwise from a checkpoint, whose global generator states pin those seeds.
The workflow's compiled trainings share one inductor cache (`use_compile_cache`): only the first of
a model and precision compiles from scratch.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from .data import load_images, load_labels
from .device import precision
from .models import DROPPED, DiffusionModel, build_model, model_class
from .progress import Progress
from .protocol import TRAIN_SPEED_OPTIONS, stage_dtype, without_unset_speed_options
from .settings import COMPILE_WITH_CHANNELS_LAST
from .storage import array_sha256, atomic_output, file_sha256

TRAINING_RECORD = "training.json"  # beside the weights: the training images, subset and seed


def checkpoint_every(spec: dict) -> int:
    value = spec.get("checkpoint_every", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train.checkpoint_every={value!r}: expected an integer >= 0 "
                         "(training steps between checkpoints; 0 turns them off)")
    return value


def speed_option(spec: dict, key: str) -> bool:
    """`spec[key]` of TRAIN_SPEED_OPTIONS: true or false, false when absent."""
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"train.{key}={value!r}: expected true or false (off when absent)")
    return value


def use_compile_cache(spec: dict, folder: str | None) -> None:
    """For a compiled training (`spec["compile"]`), put inductor's on-disk cache (its compiled graphs
    and kernels) in `folder` (config.yaml's compile_cache), which later jobs then load instead of
    compiling again; None leaves torch's own choice. Assigned, not defaulted: importing
    torch._inductor, as the warm worker's preload does, already sets TORCHINDUCTOR_CACHE_DIR to
    torch's folder in /tmp, which inductor reads again at each compilation."""
    if speed_option(spec, "compile") and folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(folder)


def kept_steps(spec: dict) -> list[int]:
    """The steps of `spec["keep_checkpoints"]` whose weights are kept beside the final model: those
    before the last step (the last step's weights are the final model itself)."""
    value, steps = spec.get("keep_checkpoints", []), int(spec["steps"])
    if (not isinstance(value, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) for s in value)
            or list(value) != sorted(set(value)) or any(not 1 <= s <= steps for s in value)):
        raise ValueError(f"train.keep_checkpoints={value!r}: expected distinct integer steps in ascending "
                         f"order, each in [1, {steps}] (the training's steps)")
    return [step for step in value if step < steps]


class KeptWeights:
    """The weights kept at training steps, saved as training passes them into a hidden folder
    (`step<S>/` each, written atomically) that a rerun after a kill finds again: Snakemake deletes a
    rerun job's declared outputs, not this. It belongs to one training (`identity`); a folder of
    another one is discarded."""

    def __init__(self, folder, identity: str):
        self.folder = Path(folder)
        record = self.folder / "identity.json"
        if self.folder.exists() and not (record.exists() and record.read_text() == identity):
            print(f"{self.folder}: discarding the kept weights of another training", flush=True)
            shutil.rmtree(self.folder)
        if not self.folder.exists():
            with atomic_output(self.folder) as staging:
                staging.mkdir()
                (staging / "identity.json").write_text(identity)

    def path(self, step: int) -> Path:
        return self.folder / f"step{step}"

    def has(self, step: int) -> bool:
        return self.path(step).is_dir()

    def save(self, step: int, model: DiffusionModel) -> None:
        with atomic_output(self.path(step)) as staging:
            model.save(staging)  # safetensors values: the same bytes whatever the weights' memory format


def train(model: DiffusionModel, images: torch.Tensor, labels: torch.Tensor | None, spec: dict,
          seed: int, device: torch.device = torch.device("cpu"), checkpoint=None, kept=None,
          flipped: torch.Tensor | None = None) -> pd.DataFrame:
    """Train in place on `device`, image i conditioned on labels[i] (None: no labels); deterministic
    given `seed` on CPU. Returns the loss log (one row per step).

    `images` are a split store's samples (`DiffusionModel.encode`'s input); with `spec["hflip"]` each is
    replaced, with probability 1/2, by its mirror image: `flipped[i]` when given (a latent kind's
    encoding of the flipped image), else images[i] flipped. With `spec["caption_dropout"]` p > 0, each
    label is replaced, with probability p, by models.DROPPED (the empty prompt, classifier-free
    guidance's unconditional branch).

    Batches are drawn epoch by epoch from a seeded permutation; flips, timesteps, noise and caption
    dropout come from the same CPU generator whatever the device, the network's dropout from torch's
    global generator seeded with `seed`.
    The training images are held on the device: no loader is needed for data that fit there.
    With a `checkpoint` path, the state is saved there every `spec["checkpoint_every"]` steps and
    training resumes from it when it holds this very training (same settings, seed, images, initial
    weights and device type): the result is bitwise that of an uninterrupted run on CPU. The caller
    deletes the checkpoint once the final weights are stored.
    With a `kept` folder, the weights after each step of `kept_steps(spec)` are saved there
    (`KeptWeights`); a checkpoint past a kept step whose weights are missing there is not resumed.
    `spec["dtype"]` (default fp32; device.PRECISIONS): the arithmetic, see the module's docstring.
    `spec["channels_last"]`, `spec["compile"]` (default false): the speed options, see the module's docstring.
    """
    every = checkpoint_every(spec)
    channels_last, compiled = (speed_option(spec, key) for key in TRAIN_SPEED_OPTIONS)
    if channels_last and compiled:
        raise ValueError(COMPILE_WITH_CHANNELS_LAST)
    dtype = stage_dtype(spec)
    device = torch.device(device)
    # fp32 for what autocast leaves in fp32 and for the backward pass, TF32 only when asked
    arithmetic = "tf32" if dtype == "tf32" else "fp32"
    keep = kept_steps(spec) if kept is not None else []
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps, batch_size = int(spec["steps"]), int(spec["batch_size"])
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=float(spec["lr"]), betas=tuple(spec["betas"]),
                                  weight_decay=float(spec["weight_decay"]), foreach=True)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, int(round(float(spec["warmup_fraction"]) * steps)), steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")  # disabled: a pass-through
    n_timesteps = model.scheduler.config.num_train_timesteps
    images = images.to(device)
    labels = None if labels is None else labels.to(device)
    flipped = None if flipped is None else flipped.to(device)
    dropout = float(spec.get("caption_dropout", 0.0))
    if dropout and labels is None:
        raise ValueError("train.caption_dropout: the images have no labels (captions) to drop")
    model.to(device).train(True)
    network = model.network()
    if channels_last:  # before the optimizer's state is made: it takes its parameters' layout
        network.to(memory_format=torch.channels_last)
    uncompiled = network._compiled_call_impl  # nn.Module.compile's attribute (None: not compiled)
    if compiled:  # without inductor's layout optimization: see the module's docstring
        network.compile(options={"layout_optimization": False})
    order, cursor, log = torch.randperm(len(images), generator=gen), 0, []
    first, store = 0, None
    if checkpoint is not None or keep:
        identity = _identity(model, images, labels, spec, seed, device, flipped)
    if keep:
        store = KeptWeights(kept, identity)
    if checkpoint is not None:
        state = _load_checkpoint(Path(checkpoint), identity)
        missing = [] if state is None or store is None else [
            s for s in keep if s <= state["step"] and not store.has(s)]
        if missing:
            print(f"{checkpoint}: discarding the checkpoint of step {state['step']}: the kept weights of "
                  f"step(s) {missing} are missing from {kept}; training from the start", flush=True)
            Path(checkpoint).unlink()
            state = None
        if state is not None:
            first, order, cursor, log = _restore(state, params, optimizer, schedule, scaler, gen)
            print(f"{checkpoint}: resuming from step {first} of {steps}", flush=True)
    progress = Progress(steps, "training steps", done=first)
    for step in range(first, steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        index = order[cursor:cursor + batch_size].to(device)
        cursor += batch_size
        x0 = images[index]
        if spec.get("hflip", False):
            flip = (torch.rand(len(index), generator=gen) < 0.5).to(device)
            mirrored = x0.flip(-1) if flipped is None else flipped[index]
            x0 = torch.where(flip[:, None, None, None], mirrored, x0)
        x0 = model.encode(x0)
        t = torch.randint(0, n_timesteps, (len(index),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = model.scheduler.add_noise(x0, noise, t)
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        batch_labels = labels[index] if labels is not None else None
        if dropout:
            drop = (torch.rand(len(index), generator=gen) < dropout).to(device)
            batch_labels = torch.where(drop, torch.full_like(batch_labels, DROPPED), batch_labels)
        cond = model.conditioning(batch_labels)
        optimizer.zero_grad(set_to_none=True)
        with precision(arithmetic, device):  # the protocol's fp32: no TF32 convolutions on a GPU
            with precision(dtype, device):  # bf16, fp16: autocast, the forward pass only
                prediction = model.predict(x_t, t, cond)
            loss = (prediction.float() - model.target(x0, noise, t)).pow(2).mean()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(spec["grad_clip"]))
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when fp16's gradients overflowed; the scale then drops
        scaler.update()
        if scaler.get_scale() >= scale:
            schedule.step()
        log.append((step, loss.item(), float(grad_norm), schedule.get_last_lr()[0]))
        progress.step()
        if store is not None and step + 1 in keep:
            store.save(step + 1, model)
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            _save_checkpoint(Path(checkpoint), {
                "identity": identity, "step": step + 1, "order": order, "cursor": cursor, "log": log,
                "params": [p.detach() for p in params], "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "gen": gen.get_state(),
                **_global_rng_states()})
    if channels_last:
        network.to(memory_format=torch.contiguous_format)
    network._compiled_call_impl = uncompiled
    model.train(False)
    return pd.DataFrame(log, columns=["step", "loss", "grad_norm", "lr"])


def _identity(model: DiffusionModel, images, labels, spec: dict, seed: int, device: torch.device,
              flipped=None) -> str:
    """What a training is a function of: a checkpoint of any other training is never resumed."""
    initial = torch.cat([p.detach().flatten().cpu().float() for p in model.trainable_parameters()])
    return json.dumps({
        "spec": {key: value for key, value in without_unset_speed_options(spec).items()
                 if key not in ("checkpoint_every", "keep_checkpoints")},
        "seed": seed,
        "images": array_sha256(images.detach().cpu().numpy()),
        **({} if flipped is None else {"flipped": array_sha256(flipped.detach().cpu().numpy())}),
        "labels": None if labels is None else array_sha256(labels.detach().cpu().numpy()),
        "initial_weights": array_sha256(initial.numpy()), "torch": torch.__version__, "device": device.type,
    }, sort_keys=True, default=str)


def _global_rng_states() -> dict:
    return {"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write under a temporary name, then rename: a kill leaves the previous checkpoint intact."""
    staging = path.with_name(f"{path.name}.new")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, staging)
    os.replace(staging, path)


def _load_checkpoint(path: Path, identity: str) -> dict | None:
    """The checkpoint at `path` if it belongs to this training; a stale one is removed."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = f"it cannot be read ({error})"
    else:
        if state.get("identity") == identity:
            return state
        reason = "it belongs to other settings, seed, images or initial weights"
    print(f"{path}: discarding the checkpoint: {reason}", flush=True)
    path.unlink()
    return None


def _restore(state: dict, params, optimizer, schedule, scaler, gen) -> tuple:
    """Put a checkpoint's weights, optimizer, schedule, loss scale and random states back; return
    (next step, epoch permutation, cursor in it, loss log). Only trainable parameters are saved: the
    rest of the model is its seeded initial state, which the identity already pins."""
    with torch.no_grad():
        for param, saved in zip(params, state["params"], strict=True):
            param.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["order"], state["cursor"], list(state["log"])


def checkpoint_path(weights_path) -> Path:
    """Where the training of `weights_path` keeps its checkpoint: a hidden sibling of the model
    folder (results/<exp>/models/lds/.s001-r1.ckpt), which Snakemake does not delete on a rerun."""
    folder = Path(weights_path).parent
    return folder.with_name(f".{folder.name}.ckpt")


def kept_path(weights_path) -> Path:
    """Where the training of `weights_path` keeps the weights of its kept steps until it ends: a hidden
    sibling of the model folder (results/<exp>/models/.full.kept), like its checkpoint."""
    folder = Path(weights_path).parent
    return folder.with_name(f".{folder.name}.kept")


def trajectory_weights(trajectory_path, step: int, model_spec: dict) -> Path:
    """The weights file of kept step `step` in a trajectory folder (models/full/trajectory) of a model
    of `model_spec`'s kind."""
    return Path(trajectory_path) / f"step{int(step)}" / model_class(model_spec).weights_file


def train_and_save(images_path, subsets_path, subset, seed: int, spec: dict, weights_path,
                   device: torch.device = torch.device("cpu"), trajectory_path=None, flipped_path=None) -> None:
    """Train one model (on the whole split, or on LDS subset `subset`) and save it beside `weights_path`,
    with a record of what it was trained on (TRAINING_RECORD).

    Files are written to a temporary folder and moved in with the weights last, so an
    interrupted job never leaves weights that look finished. A rerun after a kill resumes from the
    last checkpoint (`checkpoint_path`), which is deleted once the weights are in place.
    `flipped_path`: the store of the split's flipped samples (a latent kind's, see `train`).
    With `trajectory_path`, the weights after each of `kept_steps(spec)` are kept in it, one loadable
    model folder `step<S>/` each (with TRAINING_RECORD and its step), written as one folder before
    the final weights; until then they wait in `kept_path`, which a resumed training reuses.
    """
    images, labels = load_images(images_path), load_labels(images_path)
    flipped = None if flipped_path is None else load_images(flipped_path)
    if subsets_path is not None:
        table = pd.read_csv(subsets_path)
        positions = table.loc[table["subset"] == subset, "train_position"].to_numpy()
        if len(positions) == 0:
            raise ValueError(f"{subsets_path}: subset {subset} has no members")
        rows = np.sort(positions)
        images, labels = images[rows], None if labels is None else labels[rows]
        flipped = None if flipped is None else flipped[rows]
    # what the model was trained on, for the provenance of its ground truth (ground_truth.py)
    record = {"images_sha256": array_sha256(images), "subset": subset, "train_seed": int(seed),
              "subsets_sha256": None if subsets_path is None else file_sha256(subsets_path)}
    model = build_model(spec["model"], seed)
    checkpoint = checkpoint_path(weights_path)
    kept = None if trajectory_path is None else kept_path(weights_path)
    log = train(model, torch.from_numpy(np.ascontiguousarray(images)),
                None if labels is None else torch.from_numpy(labels), spec, seed, device, checkpoint, kept,
                None if flipped is None else torch.from_numpy(np.ascontiguousarray(flipped)))
    model.to(torch.device("cpu"))
    out = Path(weights_path).parent
    out.mkdir(parents=True, exist_ok=True)
    if trajectory_path is not None:
        with atomic_output(trajectory_path) as staging:
            staging.mkdir()
            for step in kept_steps(spec):  # hard links: the kept folder stays whole until the end
                shutil.copytree(kept / f"step{step}", staging / f"step{step}", copy_function=os.link)
                (staging / f"step{step}" / TRAINING_RECORD).write_text(
                    json.dumps({**record, "step": step, "steps": int(spec["steps"])}, indent=1) + "\n")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staging = Path(staging)
        model.save(staging)
        log.to_csv(staging / "train_log.csv", index=False)
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        for name in sorted(os.listdir(staging), key=lambda name: name == Path(weights_path).name):
            os.replace(staging / name, out / name)
    checkpoint.unlink(missing_ok=True)
    if kept is not None and kept.exists():
        shutil.rmtree(kept)
