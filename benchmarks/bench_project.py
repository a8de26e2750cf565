"""Projection of one feature job's gradients (rows in batches, as `featurize.features` calls it):
ours (`make_projector`: trak BasicProjector's matrix drawn once) against trak's BasicProjector with
the same matrix (same block size), which draws the matrix again on every call. Construction included."""
from __future__ import annotations

import torch
from trak.projectors import BasicProjector, ProjectionType

from diffattr.featurize import gradient_dim
from diffattr.project import make_projector
from harness import max_rel_diff, median_time, row
from presets import preset_model

SEED, TOL = 42, 1e-5  # float32 sums over p terms, in another order than trak's threads
CPU = torch.device("cpu")
# (preset whose model gives p, k, rows, batch, repeats): the default train split (400) in batches of 50
FULL = [("default", 4096, 400, 50, 3)]
TINY = [("tiny", 64, 12, 5, 1)]


def project_all(projector, grads, batch) -> torch.Tensor:
    return torch.cat([projector.project(grads[s:s + batch], model_id=0) for s in range(0, len(grads), batch)])


def run(full: bool) -> list[dict]:
    rows = []
    for preset, k, n, batch, repeats in FULL if full else TINY:
        p = gradient_dim(preset_model(preset)[0])
        grads = torch.randn(n, p, generator=torch.Generator().manual_seed(0))

        def ours():
            projector, info = make_projector(p, k, SEED, CPU, batch)
            return project_all(projector, grads, batch), info["block_size"]

        ours_s, (out, block_size) = median_time(ours, repeats)

        def reference():
            projector = BasicProjector(p, k, SEED, ProjectionType.normal, CPU, block_size=block_size)
            return project_all(projector, grads, batch)

        ref_s, ref = median_time(reference, repeats)
        rows.append(row("project", f"{preset} p={p} k={k} rows={n} batch={batch}", ours_s, ref_s,
                        max_rel_diff(out.numpy(), ref.numpy()), TOL, f"trak block_size={block_size}"))
    return rows
