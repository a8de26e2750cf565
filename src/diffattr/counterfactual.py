"""Counterfactual evaluation (the paper's Sec. 5.3): for a generated target, remove the training images
a method ranks most influential, retrain, regenerate from the target's own generator seed and measure
how far the image moves. This module holds what needs no torch: the removers, the target choice, the
removal sets and the statistics; regeneration and the metrics are in `counterfactual_eval`.

Following sail-sg/D-TRAK (CIFAR2/methods/04_if/get_indices_gen.ipynb): the targets are the test part
of `train_test_split(range(n_generated), test_size=targets, random_state=seed)`, in its order; the
removed images are the top k of the target's score row (highest score first). We break ties by
train position (the reference's argsort does not fix their order) and draw the random baseline's
scores per target from its own seed. docs/methods.md (Counterfactual evaluation) lists the other
differences.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .methods import METHODS, label
from .protocol import FeatureSet

RANDOM = "random"
METRICS = ("l2", "clip_cosine", "loss_change")


@dataclass(frozen=True)
class Remover:
    """How the removed images of a target are chosen: `random`, or the scores of a method on gradient
    features (diffattr.methods, reads 'features') of feature set `features`, at the lambda its
    `lambda_rule` chose for the LDS on generated queries."""
    method: str
    features: FeatureSet | None = None
    lambda_rule: str = "oracle"

    @property
    def uses_lambda(self) -> bool:
        return self.method != RANDOM and METHODS[self.method].uses_lambda

    @property
    def name(self) -> str:
        """The removal set's name in paths: random, <method>_<features>[_<lambda rule>]."""
        if self.method == RANDOM:
            return RANDOM
        name = f"{self.method}_{self.features.name}"
        return f"{name}_{self.lambda_rule}" if self.uses_lambda else name

    @property
    def label(self) -> str:
        """The table's name: Random, or the LDS table's (TRAK on simple, D-TRAK on other functions)."""
        return "Random" if self.method == RANDOM else label(self.method, self.features.function)


def removers(spec: dict) -> list[Remover]:
    """The removers of a resolved `counterfactual` section, in config order."""
    out = []
    for entry in spec["methods"]:
        if entry["method"] == RANDOM:
            out.append(Remover(RANDOM))
        else:
            out.append(Remover(entry["method"], FeatureSet.parse(entry["features"]),
                               entry.get("lambda_rule", "oracle")))
    return out


def removal_name(remover: Remover, removed: int) -> str:
    """A removal set's name: <remover>_n<removed count>."""
    return f"{remover.name}_n{int(removed)}"


def target_indices(n_generated: int, targets: int, seed: int) -> list[int]:
    """The generated images that are targets, as the reference chooses them: the test part of
    sklearn's train_test_split(range(n_generated), test_size=targets, random_state=seed), in order."""
    from sklearn.model_selection import train_test_split  # only the jobs that need it pay the import

    _, chosen = train_test_split(range(int(n_generated)), test_size=int(targets), random_state=int(seed))
    return [int(i) for i in chosen]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, highest first; equal scores by ascending position."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not 0 <= k <= len(scores) or not np.all(np.isfinite(scores)):
        raise ValueError(f"top_k needs finite scores (n,) and 0 <= k <= n; got shape {scores.shape}, k={k}")
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


def random_scores(n: int, seed: int, target: int) -> np.ndarray:
    """The random baseline's scores of target j: uniform draws from generator (seed, j)."""
    return np.random.default_rng([int(seed), int(target)]).random(int(n))


def removal_tables(scores: np.ndarray, removed: int, gen_indices):
    """From the (targets, n) score rows: the kept images of each target as a subsets table (subset =
    target j, train_position), which training reads as the LDS subsets, and the removed ones
    (target, gen_index, rank, train_position, score)."""
    import pandas as pd  # not imported by the planner

    kept, gone = [], []
    n = scores.shape[1]
    for j, (row, gen_index) in enumerate(zip(scores, gen_indices, strict=True)):
        top = top_k(row, removed)
        keep = np.setdiff1d(np.arange(n), top)
        kept.append(pd.DataFrame({"subset": j, "train_position": keep}))
        gone.append(pd.DataFrame({"target": j, "gen_index": int(gen_index), "rank": np.arange(len(top)),
                                  "train_position": top, "score": row[top]}))
    return pd.concat(kept, ignore_index=True), pd.concat(gone, ignore_index=True)


def chosen_lambda_index(lds_table, remover: Remover, grid) -> int:
    """The index in the lambda `grid` of the lambda the LDS table chose for the remover's method under
    its lambda rule (the table of its feature set on generated queries)."""
    rows = lds_table[(lds_table["method"] == remover.label) & (lds_table["lambda_rule"] == remover.lambda_rule)
                     & (lds_table["split"] == "gen")]
    if len(rows) != 1:
        raise ValueError(f"the LDS table has {len(rows)} rows of {remover.label} under lambda rule "
                         f"{remover.lambda_rule} on gen queries; expected one")
    match = np.flatnonzero(np.isclose(np.asarray(grid, dtype=np.float64), float(rows["lambda"].iloc[0]), rtol=1e-9))
    if len(match) != 1:
        raise ValueError(f"lambda {rows['lambda'].iloc[0]} of the LDS table is not in the grid {list(grid)}")
    return int(match[0])


# ---------------------------------------------------------------- statistics over targets

def median_interval(values, confidence: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """(median, low, high): the median over targets with a percentile bootstrap interval."""
    from scipy import stats  # imported by the jobs, not by the planner

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return float(np.median(values)), float(np.median(values)), float(np.median(values))
    ci = stats.bootstrap((values,), np.median, n_resamples=int(resamples), confidence_level=float(confidence),
                         method="percentile", rng=np.random.default_rng(int(seed))).confidence_interval
    return float(np.median(values)), float(ci.low), float(ci.high)


def paired_test(a, b) -> tuple[float, float, float]:
    """(median of a - b, Wilcoxon signed-rank statistic, two-sided p) over paired targets; p = 1 when
    every difference is 0."""
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if np.all(diff == 0):
        return 0.0, 0.0, 1.0
    result = stats.wilcoxon(diff)
    return float(np.median(diff)), float(result.statistic), float(result.pvalue)


def summarize(table, confidence: float, resamples: int, seed: int):
    """(medians, paired tests) of a counterfactual table (one row per target, remover and removed
    count). Medians: per (remover, removed, metric) with the bootstrap interval. Tests: per removed
    count and metric, each remover against Random, and D-TRAK against TRAK (every pair of those
    labels), paired by target."""
    import pandas as pd

    medians, tests = [], []
    for (name, removed), rows in table.groupby(["remover", "removed"], sort=False):
        for metric in METRICS:
            median, low, high = median_interval(rows[metric], confidence, resamples, seed)
            medians.append({"method": rows["method"].iloc[0], "remover": name, "removed": removed,
                            "metric": metric, "median": median, "ci_low": low, "ci_high": high,
                            "n_targets": len(rows)})
    for removed, rows in table.groupby("removed", sort=False):
        by = {name: group.set_index("target") for name, group in rows.groupby("remover", sort=False)}
        labels = {name: group["method"].iloc[0] for name, group in by.items()}
        pairs = [(a, RANDOM) for a in by if a != RANDOM and RANDOM in by]
        pairs += [(a, b) for a in by for b in by if labels[a] == "D-TRAK" and labels[b] == "TRAK"]
        for a, b in pairs:
            common = by[a].index.intersection(by[b].index)
            for metric in METRICS:
                diff, statistic, p = paired_test(by[a].loc[common, metric], by[b].loc[common, metric])
                tests.append({"method": labels[a], "remover": a, "against": labels[b], "against_remover": b,
                              "removed": removed, "metric": metric, "median_difference": diff,
                              "wilcoxon": statistic, "p_value": p, "n_targets": len(common)})
    return pd.DataFrame(medians), pd.DataFrame(tests)


def summary_markdown(experiment: str, medians, tests, notes: list[str]) -> str:
    """The readable summary: the medians with their intervals, the paired tests, and `notes`."""
    lines = [f"# Counterfactual evaluation: {experiment}", "", *notes, "",
             "| method | remover | removed | metric | median | interval | targets |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.remover} | {r.removed} | {r.metric} | {r.median:.4g} | "
              f"[{r.ci_low:.4g}, {r.ci_high:.4g}] | {r.n_targets} |" for r in medians.itertuples()]
    lines += ["", "Paired Wilcoxon signed-rank tests over targets (two-sided); difference = method - against.", "",
              "| method | against | removed | metric | median difference | W | p | targets |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.method} ({r.remover}) | {r.against} ({r.against_remover}) | {r.removed} | {r.metric} | "
              f"{r.median_difference:.4g} | {r.wilcoxon:.4g} | {r.p_value:.3g} | {r.n_targets} |"
              for r in tests.itertuples()]
    return "\n".join(lines) + "\n"
