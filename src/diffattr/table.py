"""The experiment's LDS table: every (method, function, K, k, checkpoint, tags, split, lambda rule)
row in one CSV; function, K and k are empty for the pixel baselines, lambda for methods without one,
checkpoint for methods on the final weights (else the training step of the features, or the steps
TracInCP / GAS summed over), and tags (the scheme and noises tags of the feature-set name,
protocol.FeatureSet) for the default timestep scheme and one noise per timestep."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .methods import METHODS, methods_reading
from .storage import atomic_output

COLUMNS = ["experiment", "method", "function", "timesteps", "proj_dim", "checkpoint", "tags", "split",
           "lambda_rule",
           "lambda", "lds", "ci_low", "ci_high", "n_queries", "n_subsets"]


def collect(paths, experiment: str, out_path, report_path, ablations=(), main: dict | None = None) -> pd.DataFrame:
    """Gather the LDS tables at `paths`; the report links the Markdown tables of the `ablations`
    (results/<exp>/ablations/<name>.md), given by path, and opens with the `headline` rows at the
    preset's `main` setting when given ({timesteps, proj_dim, lambda_rule})."""
    table = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    table.insert(0, "experiment", experiment)
    if "tags" not in table:  # no store with tags among the inputs
        table["tags"] = float("nan")
    checkpoint = table.checkpoint.map(_text).replace("", None)  # text ('150', '150+300+final'), NaN: final
    table = table.assign(checkpoint=checkpoint)[COLUMNS].sort_values(
        ["split", "lambda_rule", "method", "function", "timesteps", "proj_dim", "checkpoint", "tags"],
        key=_sort_key, ignore_index=True)
    with atomic_output(out_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_output(report_path) as tmp:
        top = headline_report(headline(table, **main)) if main else ""
        tmp.write_text(report(table, experiment, top) + _links(ablations, Path(report_path).parent))
    return table


def report(table: pd.DataFrame, experiment: str, top: str = "") -> str:
    """A Markdown summary, after `top` (the headline): LDS (%) with its 95% interval, one column per
    (split, lambda rule); a method without lambda or without features shows blanks there, and so does a method that exists
    for one query split only (Journey-TRAK: gen) in the other split's columns."""
    cell = table.apply(lambda r: f"{100 * r.lds:.2f} [{100 * r.ci_low:.2f}, {100 * r.ci_high:.2f}]"
                       + ("" if pd.isna(r["lambda"]) else f" (lambda {r['lambda']:g})"), axis=1)
    keys = table[["method", "function", "timesteps", "proj_dim", "checkpoint", "tags"]].map(_text)
    wide = keys.assign(cell=cell, column=table.split + ", " + table.lambda_rule).pivot_table(
        index=list(keys.columns), columns="column", values="cell", aggfunc="first")
    # rows in the table's order (numeric K and k), not in the order of their text
    wide = wide.loc[pd.MultiIndex.from_frame(keys.drop_duplicates())].fillna("").reset_index()
    header = list(wide.columns)
    lines = [f"# LDS of experiment `{experiment}`", "", *([top, "## All rows", ""] if top else []),
             "LDS in percent, 95% bootstrap interval over subsets in brackets, and the chosen lambda.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# Which function a method's headline row takes when the table has several: the protocol's L_Simple for
# the methods the paper runs on it, then L_Square (the paper's D-TRAK in Table 2), else the first.
HEADLINE_FUNCTIONS = ("simple", "square")


def headline(table: pd.DataFrame, timesteps: int, proj_dim: int, lambda_rule: str) -> pd.DataFrame:
    """One row per method and query split at the preset's main setting, as the paper's Table 2: its
    K and k (or none: the similarity baselines), the final weights (TracInCP / GAS: their sum over
    the checkpoints), default tags, the lambda rule `lambda_rule` (or none). Each row is a row of
    `table`, unchanged; a method on several functions keeps the first of HEADLINE_FUNCTIONS it has.
    The influence functions join at the main K whatever their k (exact ones have k = p)."""
    keys = table[["timesteps", "proj_dim"]]
    influence = table.method.isin([METHODS[name].label for name in methods_reading("influence")])
    at_main = (keys.isna().all(axis=1) | ((keys.timesteps == timesteps) & ((keys.proj_dim == proj_dim) | influence)))
    checkpoint = table.checkpoint.map(_text)
    rows = table[at_main & (checkpoint.eq("") | checkpoint.str.contains("+", regex=False))
                 & table.tags.map(_text).eq("") & table.lambda_rule.eq(lambda_rule)]
    rank = rows.function.map(lambda f: HEADLINE_FUNCTIONS.index(f) if f in HEADLINE_FUNCTIONS else len(HEADLINE_FUNCTIONS))
    rows = rows.assign(_rank=rank).sort_values("_rank", kind="stable")
    rows = rows.drop_duplicates(["method", "split"]).drop(columns="_rank")
    order = list(dict.fromkeys(table.method))  # the full table's order of methods
    return rows.sort_values(["method", "split"], key=lambda c: c.map(order.index) if c.name == "method"
                            else c.map({"val": 0, "gen": 1}), ignore_index=True)


def headline_report(rows: pd.DataFrame) -> str:
    """The headline rows as Markdown: one line per method, val and gen columns (LDS % [95% interval])."""
    cell = lambda r: f"{100 * r.lds:.2f}" + ("" if pd.isna(r.ci_low) else
                                             f" [{100 * r.ci_low:.2f}, {100 * r.ci_high:.2f}]")
    lines = ["## Headline", "",
             "Each method at the preset's main setting (the paper's Table 2): LDS in percent, 95% interval.", "",
             "| method | function | val | gen |", "|---|---|---|---|"]
    for method, group in rows.groupby("method", sort=False):
        cells = {r.split: cell(r) for r in group.itertuples()}
        lines.append(f"| {method} | {_text(group.function.iloc[0])} | {cells.get('val', '')} | {cells.get('gen', '')} |")
    return "\n".join(lines) + "\n"


def _checkpoint_order(text) -> float:
    """Final weights first, then checkpoints by step, then sums over checkpoints."""
    return -1.0 if pd.isna(text) else float(text) if text.isdigit() else float("inf")


def _sort_key(column: pd.Series) -> pd.Series:
    """Checkpoints in `_checkpoint_order`; default tags (NaN) before any others."""
    if column.name == "checkpoint":
        return column.map(_checkpoint_order)
    return column.astype(object).fillna("") if column.name == "tags" else column


def _links(ablations, folder: Path) -> str:
    if not len(ablations):
        return ""
    return "\n## Ablations\n\n" + "".join(
        f"- [{Path(path).stem}]({Path(os.path.relpath(path, folder)).as_posix()})\n" for path in ablations)


def _text(value) -> str:
    """A table key as text: '' for NaN (a baseline has no function, K or k), 10 for 10.0."""
    if pd.isna(value):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
