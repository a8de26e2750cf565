"""Run the workflow's scripts in processes forked from a warm interpreter.

Importing torch and diffusers costs about 7 s per process on a small CPU, more than training one of
the embedded experiment's models. Rules therefore call `run_script` from a `run:` block: the script
runs, as Snakemake's `script:` would run it (a global `snakemake` with input, output, params,
wildcards, threads, log), in a child of a forkserver that imported the heavy modules once. Each job
still gets its own process: its own random state, its own threads (the rule's `threads`, for torch and
for BLAS), and a crash that stays its own.
Under SLURM every job is its own Snakemake process, so there the server is simply started once per job.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import runpy
import signal
import sys
import threading
import types
from types import SimpleNamespace

PRELOAD = ["torch", "diffusers.models.unets.unet_2d", "diffusers.schedulers", "zarr", "pandas",
           "scipy.stats", "sklearn.model_selection", "diffattr.data", "diffattr.featurize",
           "diffattr.generate", "diffattr.ground_truth", "diffattr.lds", "diffattr.score",
           "diffattr.subsets", "diffattr.table", "diffattr.train", "diffattr.figures", "diffattr.gallery"]

# A job computes on its rule's `threads`: torch's intra-op pool and every BLAS / OpenMP pool.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_lock = threading.Lock()
_context = None


def _forkserver():
    global _context
    with _lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        return _context


def run_script(path, input, output, params, wildcards, threads, log, resources=None, config=None):
    """Run `path` with a Snakemake-like `snakemake` global in a forked worker; raise if it fails."""
    job = SimpleNamespace(input=_plain(input), output=_plain(output), params=_plain(params),
                          wildcards=_plain(wildcards), threads=threads, log=_plain(log),
                          resources=_plain(resources), config=_plain(config or {}))
    process = _forkserver().Process(target=_child, args=(str(path), job))
    with _lock, _bare_main():
        process.start()
        _unlist(process)
    process.join()
    if process.exitcode != 0:
        where = f"; see {log[0]}" if len(log) else ""
        raise RuntimeError(f"{os.path.basename(path)} exited with code {process.exitcode}{where}")


def _unlist(process) -> None:
    """Make this thread the only one that polls `process`.

    Every `Process.start` polls all the children multiprocessing lists (`_cleanup`). A forkserver
    child's exit code is 4 bytes read once from a pipe, so when another job thread's start polls it
    while this thread's `join` does too, the second reader finds the pipe empty and multiprocessing
    reports exit code 255 for a job that succeeded (seen with a few jobs side by side).
    """
    multiprocessing.process._children.discard(process)


class Named(list):
    """A picklable stand-in for Snakemake's named lists: items by position, by attribute and by key
    (`get`, `keys`, `items`, `dict(named)`), as the scripts use them."""

    def __init__(self, items, names: dict):
        super().__init__(items)
        self.__dict__.update(names)
        self._names = tuple(names)

    def __getitem__(self, key):
        return self.__dict__[key] if isinstance(key, str) else super().__getitem__(key)

    def get(self, key, default=None):
        return self.__dict__[key] if key in self._names else default

    def keys(self):
        return list(self._names)

    def items(self):
        return [(name, self.__dict__[name]) for name in self._names]


def _plain(value):
    """Snakemake's objects as builtins (and `Named`), so a child never has to import Snakemake.

    Unpickling a Snakemake path or named list imports snakemake, whose executor plugins query
    the cluster at import time: seconds per job, more than most jobs here take.
    """
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        named = getattr(value, "_names", None)
        if named is None:
            return items if isinstance(value, list) else tuple(items)
        return Named(items, {name: _plain(getattr(value, name)) for name in named})
    return value


@contextlib.contextmanager
def _bare_main():
    """Start children with an empty __main__.

    multiprocessing makes every forkserver child re-run the parent's main script (under Snakemake,
    its console script, which imports snakemake.cli); jobs need nothing from it.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _child(path: str, job) -> None:
    _die_with_parent()
    if len(job.log):
        fd = os.open(job.log[0], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch
    from threadpoolctl import threadpool_limits

    threads = max(1, int(job.threads))
    for variable in THREAD_VARIABLES:  # BLAS and OpenMP libraries that load later read these
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):  # those loaded already (numpy's, scipy's BLAS)
            runpy.run_path(path, init_globals={"snakemake": job}, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _die_with_parent() -> None:
    """A worker outliving a killed Snakemake would keep writing: have the kernel end it too."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
