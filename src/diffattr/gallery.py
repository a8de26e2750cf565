"""Attribution galleries: for a few queries, the training images a method scores highest (its top
proponents) and lowest (its top opponents).

The scores come from the method registry itself (diffattr.methods): a method's predictions over
subsets are pred[z, j] = -sum_{i in subset j} S(z, i), so its predictions over the n singleton
subsets {i} are -S(z, i), one per training image. The reference code (sail-sg/D-TRAK) ranks
training images by the same score matrix; it forms S directly, we go through the registry so that a
gallery shows exactly the scores whose LDS the table reports, at the lambda the table chose.
The n x n singleton masks make this a score job over n subsets: cheap for a handful of queries and
the CPU presets; for 50000 training images it needs memory of the order of n^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data import load_images
from .figure_plan import GALLERY_QUERIES, GALLERY_TOP
from .methods import METHODS
from .score import read_feature_pair, read_residuals, singleton_scores
from .table import _text


@dataclass(frozen=True)
class Entry:
    """One method's gallery for one query: training positions and scores, best first."""
    label: str
    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def rank(scores: np.ndarray, label: str, top: int = GALLERY_TOP) -> list[Entry]:
    """Per query row of `scores` (m, n): the `top` highest-scoring training positions (proponents,
    highest first) and the `top` lowest (opponents, lowest first); ties by position."""
    entries = []
    for row in np.asarray(scores):
        order = np.lexsort((np.arange(len(row)), -row))  # descending score, then ascending position
        worst = np.lexsort((np.arange(len(row)), row))
        entries.append(Entry(label, order[:top], row[order[:top]], worst[:top], row[worst[:top]]))
    return entries


def method_scores(method: str, inputs: dict, rows, lam: float | None) -> np.ndarray:
    """Scores of `method` for query `rows`, from the gallery job's `inputs` for it: {'train',
    'query'} image stores for a pixel method; feature stores, and 'residual' for DAS, otherwise."""
    if METHODS[method].reads == "pixels":
        return singleton_scores(method, load_images(inputs["train"]), load_images(inputs["query"])[rows])
    train, query, train_attrs, _ = read_feature_pair(inputs["train"], inputs["query"])
    query = query[rows]
    extras = {}
    if "residual" in inputs:
        extras["residual"] = read_residuals(inputs["residual"], inputs["train"], train_attrs, len(train))
    return singleton_scores(method, train, query, lam, extras)


def chosen_lambda(table: pd.DataFrame, label: str, function: str | None, split: str, main: dict) -> float | None:
    """The lambda the LDS table chose for method `label` on `function` at the main setting (None for
    a method without lambda)."""
    rows = table[(table.method == label) & (table.split == split) & (table.lambda_rule == main["lambda_rule"])
                 & table.checkpoint.map(_text).eq("") & table.tags.map(_text).eq("")]
    if function is not None:
        rows = rows[(rows.function == function) & (rows.timesteps == main["timesteps"])
                    & (rows.proj_dim == main["proj_dim"])]
    if len(rows) != 1:
        raise ValueError(f"the LDS table has {len(rows)} rows of {label} ({function}, {split}) at the main "
                         f"setting {main}; expected one")
    lam = rows["lambda"].iloc[0]
    return None if pd.isna(lam) else float(lam)


def build(inputs: dict, params: dict, split: str) -> list[list[Entry]]:
    """The gallery of query `split` from a figure job's `inputs` (the table; per method m<i>_train,
    m<i>_query and m<i>_residual) and `params` (methods, main setting): per query, one Entry per
    method, scored at the lambda the table chose."""
    table = pd.read_csv(inputs["table"], dtype={"checkpoint": str, "tags": str})
    queries = np.arange(min(GALLERY_QUERIES, len(load_images(inputs["query_images"]))))
    per_method = []
    for i, spec in enumerate(params["methods"]):
        lam = chosen_lambda(table, spec["label"], spec["function"], split, params["main"])
        own = {key.split("_", 1)[1]: value for key, value in inputs.items() if key.startswith(f"m{i}_")}
        per_method.append(rank(method_scores(spec["method"], own, queries, lam), spec["label"]))
    return [[entries[q] for entries in per_method] for q in queries]
