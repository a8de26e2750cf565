"""Atomic and resumable outputs, and zarr stores with their provenance attributes."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
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

    A killed job thus leaves a hidden `.name.tmp-PID`, never a plausible-looking output; the next
    writer of `path` removes such leftovers (one job writes a given output at a time).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def read_attrs(path) -> dict:
    """The attributes of a zarr array store, without reading its data."""
    return dict(zarr.open_array(path, mode="r").attrs)


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


class ResumableOutput:
    """A store written chunk by chunk under the stable hidden name `.NAME.partial`, so that a rerun
    after a kill (even kill -9) computes only the chunks not yet recorded done.

    The partial holds `_resume/identity.json` (what it was computed from: weights digest, settings,
    shapes) and one empty marker per finished chunk under `_resume/done/`, created only after the
    chunk's data is written. A partial whose identity differs from the rerun's, or that has none
    (killed while being created), is discarded. `commit` removes `_resume` and renames the partial
    onto the output, so the finished store is byte for byte what an uninterrupted run writes.
    Snakemake deletes a job's declared outputs before rerunning it; the hidden partial is not one.
    """

    def __init__(self, path, identity: dict, create, log=print):
        """`create(partial_path)` makes the empty store; `identity` must be JSON-serializable."""
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self._resume = self.partial / "_resume"
        self._done = self._resume / "done"
        identity = json.dumps(identity, sort_keys=True)
        record = self._resume / "identity.json"
        if self.partial.exists() and not (record.exists() and record.read_text() == identity):
            reason = ("it was computed from other inputs or settings" if record.exists()
                      else "it has no identity record")
            log(f"{self.path}: discarding the partial output {self.partial}: {reason}")
            _remove(self.partial)
        if not self.partial.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.partial.with_name(f"{self.partial.name}.new")  # one writer per output
            _remove(staging)
            create(staging)
            (staging / "_resume" / "done").mkdir(parents=True)
            (staging / "_resume" / "identity.json").write_text(identity)
            os.replace(staging, self.partial)
        self.log = log

    def done(self, key: str) -> bool:
        return (self._done / key).exists()

    def mark_done(self, key: str) -> None:
        (self._done / key).touch()

    def todo(self, keys) -> list:
        """The keys still to compute; says in the log how many were already done."""
        keys = list(keys)
        todo = [key for key in keys if not self.done(key)]
        if len(todo) < len(keys):
            self.log(f"{self.path}: resuming, {len(keys) - len(todo)} of {len(keys)} chunks already done "
                     f"in {self.partial}")
        return todo

    def commit(self, keys) -> None:
        """Rename the partial onto the output, once every chunk in `keys` is recorded done."""
        missing = [key for key in keys if not self.done(key)]
        if missing:
            raise RuntimeError(f"{self.partial}: chunks {missing} were never written; not renaming it "
                               f"onto {self.path}")
        shutil.rmtree(self._resume)
        _remove(self.path)
        os.replace(self.partial, self.path)
