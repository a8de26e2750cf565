"""Random projection of gradients with trak's projectors (CudaProjector with fast_jl, else BasicProjector)."""
from __future__ import annotations

import importlib.util

import torch
from trak.projectors import BasicProjector, CudaProjector, ProjectionType

# BasicProjector regenerates its matrix per block on every call unless one block holds it all:
# keep up to this many bytes of matrix so that, at our sizes, it is drawn once per job.
MATRIX_BYTES = 1 << 30


def make_projector(grad_dim: int, proj_dim: int, seed: int, device: torch.device, max_batch_size: int):
    """A trak projector and the attributes that identify its matrix (never mix different ones)."""
    info = {"proj_dim": proj_dim, "proj_seed": seed, "proj_type": "normal", "grad_dim": grad_dim}
    if device.type == "cuda" and importlib.util.find_spec("fast_jl") is not None:
        props = torch.cuda.get_device_properties(device)
        projector = CudaProjector(grad_dim, proj_dim, seed, ProjectionType.normal, device, max_batch_size)
        # fast_jl's matrix depends on the SM count: the GPU kind is part of the projector's identity
        return projector, {**info, "projector": "CudaProjector", "gpu": props.name,
                           "sm_count": props.multi_processor_count}
    block_size = max(1, min(proj_dim, MATRIX_BYTES // (4 * grad_dim)))
    projector = BasicProjector(grad_dim, proj_dim, seed, ProjectionType.normal, device, block_size=block_size)
    return projector, {**info, "projector": "BasicProjector", "block_size": block_size}
