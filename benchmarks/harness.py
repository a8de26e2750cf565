"""What every benchmark shares: timing (median of repeats), the relative difference, the table."""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch


def median_time(fn, repeats: int):
    """(median seconds over `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        result = fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timing holds the computation and not only its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def max_rel_diff(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the output's scale (0 when equal)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"outputs differ in shape: ours {ours.shape}, reference {ref.shape}")
    scale = np.abs(ref).max()
    if not np.isfinite(scale) or scale == 0:
        raise ValueError("reference output is zero or not finite: the comparison would be vacuous")
    return float(np.abs(ours - ref).max() / scale)


def row(engine: str, case: str, ours_s: float, ref_s: float, diff: float, tol: float, note: str = "") -> dict:
    return {"engine": engine, "case": case, "ours_s": ours_s, "ref_s": ref_s, "ratio": ref_s / ours_s,
            "max_rel_diff": diff, "tol": tol, "ok": bool(diff <= tol), "note": note}


def table(rows) -> str:
    """Markdown table of benchmark rows."""
    lines = ["| engine | case | ours (s) | reference (s) | ratio | max rel. diff | tolerance | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['max_rel_diff']:.1e}" + ("" if r["ok"] else " FAIL")
        lines.append(f"| {r['engine']} | {r['case']} | {r['ours_s']:.3g} | {r['ref_s']:.3g} | "
                     f"{r['ratio']:.1f}x | {diff} | {r['tol']:.0e} | {r['note']} |")
    return "\n".join(lines)
