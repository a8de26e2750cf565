"""Ablation tables: one named sweep of a preset's `ablations:` (plan.ablation_points), its LDS
gathered from the LDS tables of the feature sets and ground truths it sweeps over.

A sweep without `lambda` reads each point's LDS table (`results/<exp>/lds/<set>_<split>.csv`, the
lambda chosen by each rule, with its interval); a `lambda` sweep reads the per-lambda tables
(`<set>_<split>.lambdas.csv`: the LDS over all subsets at each lambda, none chosen). The output is a
CSV (one row per point, method, split and lambda rule or lambda) and a Markdown table per method.
No plot: matplotlib is not among the workflow's dependencies.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .methods import METHODS, label
from .storage import atomic_output


def collect(spec: dict, entries, out_path, report_path, experiment: str) -> pd.DataFrame:
    """The ablation `spec`'s table from `entries`, a list of (swept values, split, LDS table path)
    with the swept values as a dict (lambda aside) of one point of `plan.ablation_points`."""
    lambdas = spec["sweep"].get("lambda")
    keys = [key for key in spec["sweep"] if key != "lambda"]
    rows = []
    for values, split, path in entries:
        table = pd.read_csv(path)
        for method in spec.get("methods", ["trak"]):
            name = label(method, table.function.iloc[0] if len(table) else None)
            picked = table[table.method == name]
            if picked.empty:
                raise ValueError(f"{path} holds no rows of method {method!r} ({name}); it holds "
                                 f"{', '.join(table.method.unique())}: add it to score.methods")
            if lambdas is not None and lambdas != "grid":
                picked = picked[np.isin(picked["lambda"], np.asarray(lambdas, dtype=np.float64))]
            columns = ["lambda", "lds"] if lambdas is not None else [
                "lambda_rule", "lambda", "lds", "ci_low", "ci_high"]
            for row in picked[columns].to_dict("records"):
                rows.append({**values, "method": method, "label": name, "split": split, **row})
    table = pd.DataFrame(rows)
    with atomic_output(out_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_output(report_path) as tmp:
        tmp.write_text(report(table, spec, keys, experiment))
    return table


def report(table: pd.DataFrame, spec: dict, keys: list[str], experiment: str) -> str:
    """Markdown: one table per method, a row per point of the sweep (and per lambda in a lambda
    sweep), a column per split (and lambda rule), LDS in percent."""
    by_lambda = "lambda" in spec["sweep"]
    index = [*keys, "lambda"] if by_lambda else keys
    lines = [f"# Ablation `{spec['name']}` of experiment `{experiment}`", "",
             f"Swept: {', '.join(spec['sweep'])}; fixed: "
             + (", ".join(f"{key} {value}" for key, value in spec.get("at", {}).items()) or "nothing")
             + " (defaults: scheme uniform, noises 1, ground truth L_Simple).", "",
             "LDS in percent over all subsets at each lambda, none chosen." if by_lambda else
             "LDS in percent, 95% bootstrap interval over subsets in brackets, and the chosen lambda.", ""]
    for method in spec.get("methods", ["trak"]):
        part = table[table.method == method]
        cell = part.apply(lambda r: f"{100 * r.lds:.2f}" if by_lambda else
                          f"{100 * r.lds:.2f} [{100 * r.ci_low:.2f}, {100 * r.ci_high:.2f}]"
                          + ("" if pd.isna(r["lambda"]) else f" (lambda {r['lambda']:g})"), axis=1)
        column = part.split if by_lambda else part.split + ", " + part.lambda_rule
        text = part[index].map(_text)
        wide = text.assign(cell=cell, column=column).pivot_table(
            index=index, columns="column", values="cell", aggfunc="first", sort=False)
        wide = wide.loc[pd.MultiIndex.from_frame(text.drop_duplicates()) if len(index) > 1
                        else text[index[0]].drop_duplicates()].reset_index()
        header = list(wide.columns)
        lines += [f"## {METHODS[method].label} (`{method}`)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
