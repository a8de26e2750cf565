"""Atomic outputs and zarr stores with their provenance attributes."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import zarr


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A killed job thus leaves a hidden `.name.tmp-PID`, never a plausible-looking output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not (tmp.exists() or tmp.is_symlink()):
        raise FileNotFoundError(f"the writer of {path} finished without writing {tmp}")
    _remove(path)
    os.replace(tmp, path)


def write_array(path, data: np.ndarray, attrs: dict) -> None:
    """Write one array as a zarr store (array at the root, one chunk), atomically."""
    data = np.asarray(data)
    with atomic_output(path) as tmp:
        arr = zarr.create_array(tmp, shape=data.shape, dtype=data.dtype, chunks=data.shape or ())
        arr[...] = data
        arr.attrs.update(attrs)


def read_array(path) -> tuple[np.ndarray, dict]:
    arr = zarr.open_array(path, mode="r")
    return arr[...], dict(arr.attrs)


def read_member(path, name: str) -> tuple[np.ndarray, dict]:
    """Array `name` of a zarr group, with the group's attributes updated by the array's own."""
    group = zarr.open_group(path, mode="r")
    return group[name][...], {**group.attrs, **group[name].attrs}


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path) -> str:
    return file_digest(path, "sha256")


def array_sha256(data: np.ndarray) -> str:
    """Content hash of an array (dtype, shape and bytes): identifies a query set in provenance."""
    data = np.ascontiguousarray(data)
    digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()
