"""Random projection of gradients: trak's CudaProjector (fast_jl) on CUDA, else trak's BasicProjector
matrix computed by `BlockProjector`, which draws it once instead of on every call.

trak's BasicProjector draws its (p, k) Normal matrix in blocks of `block_size` columns, block i from
a torch generator seeded `seed + 1000 i`, and draws every block again on each `project` call: at the
default model's size that costs several times the matrix product itself. `BlockProjector` draws the
same blocks (bit for bit), in parallel threads, keeps as many as fit in `CACHE_BYTES` and draws only
the others again per call. Its features equal BasicProjector(block_size)'s.
"""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import torch
from trak.projectors import CudaProjector, ProjectionType

# Columns per block, at most: a block is the unit of drawing, caching and parallel work. It is part
# of the matrix's identity (each block has its own seed), so it depends on p only, never on memory
# or thread count: BLOCK_BYTES bounds one block, down to a single column for very large models.
MAX_BLOCK_COLUMNS = 128
BLOCK_BYTES = 128 << 20
# Blocks kept between calls; the rest are drawn again on each call (memory: one block per thread).
CACHE_BYTES = 1 << 30


def block_columns(grad_dim: int, proj_dim: int) -> int:
    return max(1, min(proj_dim, MAX_BLOCK_COLUMNS, BLOCK_BYTES // (4 * grad_dim)))


class BlockProjector:
    """grads (B, p) -> grads @ P (B, k), P trak BasicProjector's Normal matrix for `block_size`.

    `cache_bytes` bounds the memory of the blocks kept between calls; it changes speed, not values.
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, block_size: int, device: torch.device,
                 cache_bytes: int = CACHE_BYTES, threads: int | None = None):
        if not 1 <= block_size <= proj_dim:
            raise ValueError(f"block_size={block_size}: expected a value in [1, proj_dim={proj_dim}]")
        self.grad_dim, self.proj_dim, self.seed = grad_dim, proj_dim, seed
        self.block_size, self.device = block_size, torch.device(device)
        self.starts = list(range(0, proj_dim, block_size))
        # one torch thread per worker: the workers share the cores, and the sums' order stays fixed
        self.pool = ThreadPoolExecutor(threads or torch.get_num_threads(), initializer=torch.set_num_threads,
                                       initargs=(1,))
        n_cached = min(len(self.starts), cache_bytes // (4 * grad_dim * block_size))
        self.cached = list(self.pool.map(self._draw, range(n_cached)))

    def _draw(self, index: int) -> torch.Tensor:
        """Block `index` as trak draws it: (p, block_size), Normal, from seed + 1000 index (model 0)."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 1000 * index)
        block = torch.empty(self.grad_dim, self.block_size, device=self.device)
        return block.normal_(generator=generator)

    def project(self, grads: torch.Tensor, model_id: int = 0) -> torch.Tensor:
        if model_id != 0:
            raise ValueError(f"model_id={model_id}: this projector only holds model 0's matrix")
        if grads.ndim != 2 or grads.shape[1] != self.grad_dim:
            raise ValueError(f"grads must have shape (B, grad_dim={self.grad_dim}), got {tuple(grads.shape)}")
        grads = grads.to(self.device, torch.float32)
        sketch = torch.empty(len(grads), self.proj_dim, device=self.device)

        def fill(index: int) -> None:
            block = self.cached[index] if index < len(self.cached) else self._draw(index)
            start = self.starts[index]
            stop = min(self.proj_dim, start + self.block_size)
            sketch[:, start:stop] = grads @ block[:, :stop - start]

        list(self.pool.map(fill, range(len(self.starts))))
        return sketch


def make_projector(grad_dim: int, proj_dim: int, seed: int, device: torch.device, max_batch_size: int,
                   fast_jl: bool = True):
    """A projector and the attributes that identify its matrix (features of different ones never mix;
    the device it is drawn on, which also changes it, is recorded by the caller). `fast_jl`: use trak's
    CUDA kernel where it is installed and the device is a GPU (it needs k a multiple of 512)."""
    info = {"proj_dim": proj_dim, "proj_seed": seed, "proj_type": "normal", "grad_dim": grad_dim}
    if fast_jl and device.type == "cuda" and importlib.util.find_spec("fast_jl") is not None:
        props = torch.cuda.get_device_properties(device)
        # fast_jl has kernels for 8, 16 and 32 rows at a time (and loops over larger batches)
        kernel_rows = next((rows for rows in (8, 16) if max_batch_size <= rows), 32)
        projector = CudaProjector(grad_dim, proj_dim, seed, ProjectionType.normal, device, kernel_rows)
        # fast_jl's matrix depends on the SM count: the GPU kind is part of the projector's identity
        return projector, {**info, "projector": "CudaProjector", "gpu": props.name,
                           "sm_count": props.multi_processor_count, "kernel_rows": kernel_rows}
    block_size = block_columns(grad_dim, proj_dim)
    projector = BlockProjector(grad_dim, proj_dim, seed, block_size, device)
    return projector, {**info, "projector": "BasicProjector", "block_size": block_size}
