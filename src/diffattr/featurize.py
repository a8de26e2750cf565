"""Features: per-sample gradients of a model-output function, averaged over K timesteps, projected.

g(x) = (1/K) sum_t grad_theta f(x, t, eps_t), or with N noises per timestep the mean over the K x N
pairs (t, eps_td). The noised copies of one sample go through the network together and the mean of
their f values is differentiated once: the same average as separate backward passes (the network
treats batch items independently in eval mode). A batch of B samples is one pass over B x K x N
items; per_sample splits its gradient by sample at each featurized layer (torch.func's vmap where
a layer has no rule there).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr

from . import per_sample
from .data import load_images, load_labels
from .device import device_name, precision
from .factorized import FactorizedProjector
from .functions import model_output
from .models import DiffusionModel, load_model
from .noise import noise_batch
from .progress import Progress
from .project import make_projector
from .protocol import CALIBRATION, factor_split, featurize_arithmetic, projector_kind, select_timesteps
from .storage import ResumableOutput, array_sha256, file_sha256


def batch_gradients(model: DiffusionModel, images: torch.Tensor, indices, function: str, timesteps,
                    noise_seed: int, labels=None, max_pass_items: int | None = None,
                    eps: torch.Tensor | None = None, noises: int = 1, engine: str | None = None,
                    layer_rule=None, parameters: list | None = None) -> torch.Tensor:
    """(B, p) fp32: row b is the flat gradient of (1/(K N)) sum_t sum_d f(images[b], t, eps_td), with
    eps_td = noise.gaussian(noise_seed, indices[b], t, draw=d) for the N = `noises` draws d < N
    (N = 1: draw 0, the noise of (noise_seed, indices[b], t)), the model conditioned on labels[b]
    and f comparing its prediction with `model.target` of (encoded images[b], eps_td, t).

    `eps` (B, K, ...), when given (with N = 1), replaces the drawn noise: item (b, k) is then f at
    x_t = sqrt(abar_t) x0_b + sqrt(1 - abar_t) eps[b, k], x0_b the encoded images[b] (the journey
    features use it to put x_t on a sampling trajectory; the target is eps[b, k] or its velocity).
    All B x K x N noised copies go through the network as one batch. `engine`: "hooks" (per_sample:
    one ordinary backward pass, per-sample sums at each featurized layer), "vmap" (torch.func: vmap
    over samples of the gradient of their mean f) or None, hooks when every featurized layer has a
    rule there. With `max_pass_items`, the (t, d) pairs are split into chunks of at most
    max(1, max_pass_items // B) so that a pass holds at most that many noised copies (memory at
    large K), and the chunks' means are combined with weights |chunk| / (K N). `layer_rule`
    (hooks only): per_sample's rule override, e.g. a factorized projector's weight blocks, which
    then stand in the rows in place of those weights' gradients. `parameters`: the named
    parameters differentiated, in the row's order (default the model's featurized ones).
    """
    if eps is not None and noises != 1:
        raise ValueError(f"noises: got {noises}; expected 1 when the noise `eps` is given")
    parameters = model.featurized_parameters() if parameters is None else parameters
    if engine is None:
        engine = "vmap" if per_sample.unsupported(model.network(), parameters) else "hooks"
    if layer_rule is not None and engine != "hooks":
        raise ValueError("a factorized projection needs the hooks engine: every featurized layer needs a "
                         "per_sample rule")
    one_pass = {"hooks": partial(_hooks_pass, layer_rule=layer_rule), "vmap": _vmap_pass}[engine]
    draws = [(int(t), d) for t in timesteps for d in range(noises)]
    per_pass = len(draws) if max_pass_items is None else max(1, max_pass_items // len(images))
    total = None
    for start in range(0, len(draws), per_pass):
        chunk = draws[start:start + per_pass]
        noised = _noised_copies(model, images, indices, chunk, noise_seed, labels,
                                None if eps is None else eps[:, start:start + per_pass])
        grads = one_pass(model, function, parameters, *noised)
        if len(chunk) == len(draws):
            return grads
        total = grads.mul_(len(chunk) / len(draws)) if total is None else \
            total.add_(grads, alpha=len(chunk) / len(draws))
    return total


def _noised_copies(model: DiffusionModel, images: torch.Tensor, indices, draws, noise_seed: int, labels=None,
                   eps: torch.Tensor | None = None):
    """x0 (B, ...), t (D,), eps (B, D, ...) and the conditioning for the D = len(draws) (timestep, draw)
    pairs of each sample."""
    x0 = model.encode(images)
    t = torch.tensor([s for s, _ in draws], device=x0.device)
    if eps is None:
        eps = noise_batch([(noise_seed, int(i), s, d) for i in indices for s, d in draws], x0.shape[1:])
    eps = eps.reshape(len(x0), len(t), *x0.shape[1:]).to(x0.device, x0.dtype)
    return x0, t, eps, model.conditioning(None if labels is None else torch.as_tensor(labels, device=x0.device))


def _hooks_pass(model: DiffusionModel, function: str, featurized, x0, t, eps, cond, layer_rule=None) -> torch.Tensor:
    # item j B + b is sample b's copy j (per_sample's groups in turn)
    t_all, eps_all = t.repeat_interleave(len(x0)), eps.transpose(0, 1).flatten(0, 1)

    def objective():  # the sum over samples of each sample's mean f over its copies
        x0_all = x0.repeat(len(t), *[1] * (x0.dim() - 1))
        x_t = model.scheduler.add_noise(x0_all, eps_all, t_all)
        pred = model.predict(x_t, t_all, None if cond is None else cond.repeat(len(t), *[1] * (cond.dim() - 1)))
        return model_output(function, pred, model.target(x0_all, eps_all, t_all), t_all,
                            model.scheduler).sum() / len(t)

    grads = per_sample.group_gradients(model.network(), featurized, objective, len(x0), layer_rule)
    return torch.cat([grads[name].reshape(len(x0), -1) for name, _ in featurized], dim=1).float()


def _vmap_pass(model: DiffusionModel, function: str, featurized, x0, t, eps, cond) -> torch.Tensor:
    params = {name: p.detach() for name, p in featurized}

    def value(params, x0, eps, cond):
        x0 = x0.expand(len(t), *x0.shape)
        x_t = model.scheduler.add_noise(x0, eps, t)
        cond = None if cond is None else cond.expand(len(t), *cond.shape)
        pred = model.predict_with(params, x_t, t, cond)
        return model_output(function, pred, model.target(x0, eps, t), t, model.scheduler).mean()

    # torch.func.grad differentiates under no_grad too; no_grad keeps the trainable parameters left out
    # of `params` (e.g. a class embedding that is not featurized) from recording a graph
    with torch.no_grad():
        grads = torch.func.vmap(torch.func.grad(value), in_dims=(None, 0, 0, None if cond is None else 0))(
            params, x0, eps, cond)
    return torch.cat([grads[name].reshape(len(x0), -1) for name in params], dim=1).float()


def gradient_dim(model: DiffusionModel) -> int:
    return sum(p.numel() for _, p in model.featurized_parameters())


def gradient_norms(model: DiffusionModel, images: np.ndarray, function: str, noise_seed: int,
                   labels: np.ndarray | None = None, max_pass_items: int | None = None) -> dict[str, float]:
    """Each featurized parameter's root-mean-square per-sample gradient norm over the first calibration
    images (protocol.CALIBRATION), for the factorized projection's `norm` split."""
    count, chunk = min(len(images), CALIBRATION["images"]), CALIBRATION["chunk"]
    T = model.scheduler.config.num_train_timesteps
    timesteps = select_timesteps(min(CALIBRATION["timesteps"], T), "uniform", T)
    device = next(p.device for _, p in model.featurized_parameters())
    squares = None
    for start in range(0, count, chunk):
        rows = range(start, min(count, start + chunk))
        grads = batch_gradients(model, torch.from_numpy(images[rows.start:rows.stop]).to(device), rows, function,
                                timesteps, noise_seed, None if labels is None else labels[rows.start:rows.stop],
                                max_pass_items=max_pass_items)
        batch = grads.double().pow(2).sum(0)
        squares = batch if squares is None else squares + batch
    norms, start = {}, 0
    for name, p in model.featurized_parameters():
        norms[name] = math.sqrt(squares[start:start + p.numel()].sum().item() / count)
        start += p.numel()
    return norms


def make_feature_projector(model: DiffusionModel, proj_dim: int, seed: int, device: torch.device,
                           batch_size: int, kind: str = "normal", norms: dict[str, float] | None = None):
    """The projector of a feature store and the attributes that identify it: `kind` normal, a dense
    Normal matrix (project.make_projector), or factorized (diffattr.factorized, its dense part a
    BlockProjector on every device: its k is whatever the split leaves, not a multiple of fast_jl's
    512), its k split by the parameters' gradient `norms` (`gradient_norms`) when given, evenly
    otherwise; `grad_dim` is the gradient's dimension either way."""
    if kind == "normal":
        return make_projector(gradient_dim(model), proj_dim, seed, device, batch_size)
    projector = FactorizedProjector(model.network(), model.featurized_parameters(), proj_dim, seed, device,
                                    lambda dim, k: make_projector(dim, k, seed, device, batch_size, fast_jl=False),
                                    norms=norms)
    return projector, {"proj_dim": proj_dim, "proj_seed": seed, "grad_dim": gradient_dim(model), **projector.info}


def features(model: DiffusionModel, images: np.ndarray, function: str, timesteps, noise_seed: int,
             projector, batch_size: int, starts=None, max_pass_items: int | None = None, noise=None,
             noises: int = 1, labels: np.ndarray | None = None, arithmetic: str = "fp32"):
    """Yield (start, projected features of rows start..start+len) for batches of samples (only those
    beginning at `starts`, when given), computed on the model's device, row i conditioned on labels[i].
    `noise(rows)`, when given, returns the (B, K, ...) noise of those rows instead of drawing it
    (see `batch_gradients`). `arithmetic` (featurize.dtype) of the gradients: fp32, the protocol's
    strict fp32 (no TF32 on a GPU), or tf32 (TF32 matmuls and convolutions on Ampere or newer GPUs, as
    the reference's cuDNN default computed its convolutions; plain fp32 on a CPU, bitwise)."""
    arithmetic = featurize_arithmetic({"dtype": arithmetic})
    model.train(False)
    device = next(p.device for _, p in model.featurized_parameters())
    for start in range(0, len(images), batch_size) if starts is None else starts:
        stop = min(len(images), start + batch_size)
        eps = None if noise is None else noise(range(start, stop))
        rows = None if labels is None else labels[start:stop]
        with precision(arithmetic, device):
            grads = batch_gradients(model, torch.from_numpy(images[start:stop]).to(device), range(start, stop),
                                    function, timesteps, noise_seed, rows, max_pass_items=max_pass_items,
                                    eps=eps, noises=noises, layer_rule=getattr(projector, "layer_rule", None))
        yield start, projector.project(grads, model_id=0).float().cpu().numpy()


def featurize_split(weights_path, model_spec: dict, images_path, function: str, timesteps,
                    proj_dim: int, spec: dict, out_path, device: torch.device = torch.device("cpu"),
                    max_pass_items: int | None = None, checkpoint: int | None = None, calibration=None) -> None:
    """Projected features of every image of a split, written in row chunks with their provenance;
    a rerun after a kill computes only the chunks not yet written (storage.ResumableOutput).
    `calibration`: the train split's store, where a factorized projection splits k by gradient norms.

    `device` is part of the provenance: a projector's matrix can depend on where it is drawn.
    `checkpoint` is the training step of the weights when they are a kept checkpoint (None: final).
    """
    model = load_model(model_spec, Path(weights_path).parent).to(device).for_per_sample_gradients()
    write_features(model, weights_path, load_images(images_path), function, timesteps, proj_dim, spec,
                   out_path, device, {"checkpoint": checkpoint, "scheme": spec["scheme"],
                                      "noise_seed": int(spec["noise_seed"])}, max_pass_items,
                   noises=int(spec.get("noises", 1)), labels=load_labels(images_path), calibration=calibration)


def write_features(model: DiffusionModel, weights_path, images: np.ndarray, function: str, timesteps,
                   proj_dim: int, spec: dict, out_path, device: torch.device, attrs: dict,
                   max_pass_items: int | None = None, noise=None, noises: int = 1,
                   labels: np.ndarray | None = None, calibration=None) -> None:
    """`featurize_split`'s store for a loaded model: `attrs` (how the noise was chosen) and `noises`
    (per timestep) join the provenance, and `noise`, `noises` and the images' `labels` are passed on
    to `features`, in the arithmetic of `spec['dtype']` (fp32 when absent), recorded as `arithmetic`
    (`dtype` is the array's, float32 either way). A factorized projection with `factor_split: norm`
    measures its split on the train store `calibration` (gradient_norms), in that arithmetic."""
    batch_size = int(spec["batch_size"])
    arithmetic = featurize_arithmetic(spec)
    norms = None
    if factor_split(spec) == "norm":
        if calibration is None:
            raise ValueError("featurize.factor_split norm: the train split's store (calibration) is needed "
                             "to measure the gradient norms that split k")
        with precision(arithmetic, device):
            norms = gradient_norms(model, load_images(calibration), function, int(spec["noise_seed"]),
                                   load_labels(calibration), max_pass_items)
    projector, projector_info = make_feature_projector(model, proj_dim, int(spec["proj_seed"]), device, batch_size,
                                                       projector_kind(spec), norms)
    attrs = {"model_sha256": file_sha256(weights_path), "function": function,
             "K": len(timesteps), "timesteps": list(timesteps), **attrs, "noises": noises, "dtype": "float32",
             "arithmetic": arithmetic, "device": device_name(device), "query_sha256": array_sha256(images),
             "torch": torch.__version__,
             **projector_info}

    def create(path):
        array = zarr.create_array(path, shape=(len(images), proj_dim), dtype="float32",
                                   chunks=(batch_size, proj_dim))
        array.attrs.update(attrs)

    # resumable: one chunk of `batch_size` rows per batch, recorded done once written
    output = ResumableOutput(out_path, {**attrs, "rows": len(images), "chunk_rows": batch_size}, create)
    array = zarr.open_array(output.partial, mode="r+")
    chunks = {str(start // batch_size): start for start in range(0, len(images), batch_size)}
    todo = [chunks[key] for key in output.todo(chunks)]
    progress = Progress(len(chunks), "feature batches", done=len(chunks) - len(todo))
    for start, rows in features(model, images, function, timesteps, int(spec["noise_seed"]),
                                projector, batch_size, starts=todo, max_pass_items=max_pass_items,
                                noise=noise, noises=noises, labels=labels, arithmetic=arithmetic):
        array[start:start + len(rows)] = rows
        output.mark_done(str(start // batch_size))
        progress.step()
    output.commit(chunks)
