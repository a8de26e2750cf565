"""Ground truth: each query's L_Simple under one model, averaged over timesteps x noise seeds (or,
for the ground-truth ablation, another model-output function's value averaged the same way)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
import zarr

from .data import load_images, load_labels
from .device import device_name, precision
from .functions import model_output
from .models import DiffusionModel, load_model
from .noise import noise_batch
from .progress import Progress
from .protocol import DEFAULT_DTYPE, DEFAULT_GT_FUNCTION, ground_truth_timesteps, stage_dtype
from .storage import ResumableOutput, array_sha256, file_sha256
from .train import TRAINING_RECORD

# Resumable pieces per query split: a kill loses at most about 1/CHUNKS_PER_SPLIT of a split's work.
CHUNKS_PER_SPLIT = 16


@torch.no_grad()
def draw_losses(model: DiffusionModel, images: np.ndarray, timesteps, noise_seeds, batch_size: int,
                device: torch.device = torch.device("cpu"), dtype: str = DEFAULT_DTYPE, rows: range | None = None,
                function: str = DEFAULT_GT_FUNCTION, labels: np.ndarray | None = None) -> np.ndarray:
    """(len(rows), len(noise_seeds), len(timesteps)) float64: f(x, t, eps) of each query in `rows`
    (default all) at each (noise seed, timestep) draw, conditioned on its class in `labels` (n,), f
    the model-output function `function` (diffattr.functions) of the prediction and its target; by
    default L_Simple, mean_pixels (eps_theta(x_t, t) - eps)^2 for an epsilon-prediction model.

    The noise of (query, t, seed) comes from `noise.gaussian`, so batching never changes it and every
    model sees the same draws (common random numbers). The UNet runs in precision `dtype`
    (`diffattr.device.precision`); f is taken in fp32.
    """
    model.to(device).train(False)
    rows = range(len(images)) if rows is None else rows
    triples = list(itertools.product(noise_seeds, rows, timesteps))
    values = np.empty(len(triples), dtype=np.float64)
    for start in range(0, len(triples), batch_size):
        chunk = triples[start:start + batch_size]
        index = np.array([i for _, i, _ in chunk])
        t = torch.tensor([t for _, _, t in chunk], device=device)
        x0 = model.encode(torch.from_numpy(images[index]).to(device))
        eps = noise_batch(chunk, x0.shape[1:]).to(device)
        cond = model.conditioning(None if labels is None else torch.from_numpy(labels[index]).to(device))
        with precision(dtype, device):
            pred = model.predict(model.scheduler.add_noise(x0, eps, t), t, cond).float()
        values[start:start + len(chunk)] = model_output(function, pred, model.target(x0, eps, t), t,
                                                        model.scheduler).double().cpu().numpy()
    return values.reshape(len(noise_seeds), len(rows), len(timesteps)).transpose(1, 0, 2)


def query_losses(model: DiffusionModel, images: np.ndarray, timesteps, noise_seeds, batch_size: int,
                 device: torch.device = torch.device("cpu"), dtype: str = DEFAULT_DTYPE, rows: range | None = None,
                 function: str = DEFAULT_GT_FUNCTION, labels: np.ndarray | None = None) -> np.ndarray:
    """(len(rows),) float64: each query's ground truth, the mean of its `draw_losses` over (t, seed)."""
    return draw_losses(model, images, timesteps, noise_seeds, batch_size, device, dtype, rows, function,
                       labels).mean(axis=(1, 2))


def training_record(weights_path) -> dict:
    """The subsets table, subset and seed a model was trained on (train.TRAINING_RECORD), which the
    LDS checks against the table in use; {} for a model saved without one."""
    path = Path(weights_path).parent / TRAINING_RECORD
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return {key: record[key] for key in ("subsets_sha256", "subset", "train_seed")}


def _labels_sha256(labels: np.ndarray | None) -> str | None:
    return None if labels is None else array_sha256(labels)


def chunk_rows(n: int, per_row: int, batch_size: int) -> int:
    """Queries per resumable chunk: about 1/CHUNKS_PER_SPLIT of the split, and at least one full batch
    of (query, t, seed) triples."""
    return max(1, -(-n // CHUNKS_PER_SPLIT), -(-batch_size // per_row))


def compute_and_save(weights_path, model_spec: dict, query_paths: dict, spec: dict, out_path,
                     device: torch.device = torch.device("cpu")) -> None:
    """One store per model: an array of per-query losses for each query split, written in chunks of
    queries; a rerun after a kill computes only the chunks not yet written (storage.ResumableOutput)."""
    model = load_model(model_spec, Path(weights_path).parent)
    timesteps = ground_truth_timesteps(spec, model.scheduler.config.num_train_timesteps)
    seeds, batch_size, dtype = list(spec["noise_seeds"]), int(spec["batch_size"]), stage_dtype(spec)
    function = spec.get("function", DEFAULT_GT_FUNCTION)
    attrs = {"model_sha256": file_sha256(weights_path), "timesteps": timesteps,
             "noise_seeds": seeds, "function": function, "dtype": dtype, "device": device_name(device),
             **training_record(weights_path)}
    queries = {split: load_images(path) for split, path in query_paths.items()}
    labels = {split: load_labels(path) for split, path in query_paths.items()}
    size = {split: chunk_rows(len(images), len(timesteps) * len(seeds), batch_size)
            for split, images in queries.items()}
    identity = {**attrs, "splits": {split: {"query_sha256": array_sha256(images), "rows": len(images),
                                            "chunk_rows": size[split],
                                            "labels_sha256": _labels_sha256(labels[split])}
                                    for split, images in queries.items()}}

    def create(path):
        group = zarr.open_group(path, mode="w")
        group.attrs.update(attrs)
        for split, images in queries.items():
            array = group.create_array(split, shape=(len(images),), dtype="float64", chunks=(size[split],))
            array.attrs["query_sha256"] = identity["splits"][split]["query_sha256"]

    output = ResumableOutput(out_path, identity, create)
    group = zarr.open_group(output.partial, mode="r+")
    chunks = {f"{split}.{start // size[split]}": (split, range(start, min(len(images), start + size[split])))
              for split, images in queries.items() for start in range(0, len(images), size[split])}
    todo = output.todo(chunks)
    progress = Progress(len(chunks), "ground-truth chunks", done=len(chunks) - len(todo))
    for key in todo:
        split, rows = chunks[key]
        group[split][rows.start:rows.stop] = query_losses(model, queries[split], timesteps, seeds, batch_size,
                                                          device, dtype, rows, function, labels[split])
        output.mark_done(key)
        progress.step()
    output.commit(chunks)
