"""Where and in what precision jobs compute: the config's `device` and each stage's `precision`.

Randomness (batch order, flips, timesteps, noise, DDIM's initial noise) is always drawn on the CPU
and moved to the device, so a model trained or sampled on a GPU sees the same draws as on a CPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the precisions computed under autocast


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else CPU), `cpu`, `cuda` or `cuda:N`."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: '{name}' is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: '{name}' is not supported; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: '{name}' asked for, but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use device=auto or cpu")
    return device


def device_name(device: torch.device) -> str:
    """What the device is, for provenance: 'cpu' or the GPU's product name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@contextlib.contextmanager
def precision(name: str, device: torch.device):
    """Compute inside the block in `fp32` (the paper's setting), `tf32` (fp32 storage, TensorFloat-32
    matmuls and convolutions on Ampere or newer GPUs; plain fp32 elsewhere), `bf16` or `fp16` (autocast;
    fp16 on a GPU only, where its gradients need a scaler: diffattr.train)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision: '{name}' is not one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"precision: fp16 needs a CUDA device, not {device}; use bf16 or fp32 there")
    if name in AUTOCAST:
        with torch.autocast(device.type, dtype=AUTOCAST[name]):
            yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
