"""The report's figures, drawn with matplotlib (Agg) from the experiment's outputs: each `draw_<name>`
takes the figure job's inputs and params (diffattr.figure_plan) and writes a PNG and an SVG beside it.
A new figure is a `draw_` function here and an entry in figure_plan's `figures`, `inputs` and `caption`
(the counterfactual one: `params` and `caption`, drawn by the counterfactual rule)."""
from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .protocol import parse_function  # noqa: E402
from .storage import atomic_output  # noqa: E402
from .table import _text, headline  # noqa: E402

SPLITS = {"val": "validation", "gen": "generated"}
COLORS = {"val": "tab:blue", "gen": "tab:orange"}


def paper_lds() -> pd.DataFrame:
    """The paper's Table 2 (src/diffattr/data/paper_lds.csv, its source in its first line)."""
    text = resources.files("diffattr").joinpath("data/paper_lds.csv").read_text()
    return pd.read_csv(io.StringIO(text), comment="#")


def save(fig, png_path) -> None:
    """Write `fig` to `png_path` and to the SVG beside it, each atomically."""
    for path, fmt in ((Path(png_path), "png"), (Path(png_path).with_suffix(".svg"), "svg")):
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    plt.close(fig)


def read_table(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"checkpoint": str, "tags": str})


def _interval(rows: pd.DataFrame) -> np.ndarray:
    """(2, n) error-bar lengths below and above each LDS (%), zero where a row has no interval."""
    low = (rows.lds - rows.ci_low).fillna(0.0).clip(lower=0) * 100
    high = (rows.ci_high - rows.lds).fillna(0.0).clip(lower=0) * 100
    return np.vstack([low.to_numpy(), high.to_numpy()])


def draw_headline(inputs: dict, params: dict, out) -> None:
    """LDS per method (rows) with its interval, val and gen side by side; the paper's value beside it."""
    rows = headline(read_table(inputs["table"]), **params["main"])
    methods = list(dict.fromkeys(rows.method))
    paper = paper_lds()
    paper = paper[(paper.preset == params["experiment"])
                  & (paper.timesteps.isna() | (paper.timesteps == params["main"]["timesteps"]))]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.2))
    y = np.arange(len(methods))
    for offset, split in ((-0.17, "val"), (0.17, "gen")):
        part = rows[rows.split == split]
        at = y[[methods.index(m) for m in part.method]] + offset
        ax.errorbar(part.lds * 100, at, xerr=_interval(part), fmt="o", color=COLORS[split], capsize=3,
                    label=f"{SPLITS[split]} (ours)")
        mine = paper[paper.split == split]
        mine = mine[mine.method.isin(methods)]
        if len(mine):
            ax.errorbar(mine.lds, y[[methods.index(m) for m in mine.method]] + offset, xerr=mine.sd, fmt="D",
                        mfc="none", color=COLORS[split], capsize=2, label=f"{SPLITS[split]} (paper, Table 2)")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, methods)
    ax.invert_yaxis()
    ax.set_xlabel("LDS (%)")
    ax.set_title(f"{params['experiment']}: LDS at K={params['main']['timesteps']}, k={params['main']['proj_dim']}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    save(fig, out)


def _kernel_rows(table: pd.DataFrame, main: dict) -> pd.DataFrame:
    """TRAK / D-TRAK rows of the final weights, default tags, the main lambda rule."""
    return table[table.method.isin(["TRAK", "D-TRAK"]) & table.checkpoint.map(_text).eq("")
                 & table.tags.map(_text).eq("") & table.lambda_rule.eq(main["lambda_rule"])]


def draw_functions(inputs: dict, params: dict, out) -> None:
    """Heatmap of LDS (%) per function x K at the main k, one panel per query split (Table 1)."""
    rows = _kernel_rows(read_table(inputs["table"]), params["main"])
    rows = rows[(rows.proj_dim == params["main"]["proj_dim"]) & ~rows.function.str.startswith("interp")]
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.5 * rows.function.nunique() + 1.8))
    for ax, split in zip(axes, SPLITS):
        grid = rows[rows.split == split].pivot_table(index="function", columns="timesteps", values="lds",
                                                     sort=False) * 100
        image = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [f"K={int(k)}" for k in grid.columns])
        ax.set_yticks(range(grid.shape[0]), grid.index)
        ax.set_title(SPLITS[split])
        fig.colorbar(image, ax=ax, label="LDS (%)")
    save(fig, out)


def draw_interpolation(inputs: dict, params: dict, out) -> None:
    """LDS (%) of D-TRAK on interp<eta> against eta, with intervals (the paper's Figure 1)."""
    rows = _kernel_rows(read_table(inputs["table"]), params["main"])
    rows = rows[rows.function.str.startswith("interp")]
    rows = rows.assign(eta=rows.function.map(lambda f: parse_function(f)[1])).sort_values("eta")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split in SPLITS:
        part = rows[rows.split == split]
        ax.errorbar(part.eta, part.lds * 100, yerr=_interval(part), marker="o", capsize=3, color=COLORS[split],
                    label=SPLITS[split])
    ax.set_xlabel("eta (0: L_Square, 0.5: TRAK up to a factor, 1: the other end)")
    ax.set_ylabel("LDS (%)")
    ax.legend()
    save(fig, out)


def draw_lambda(inputs: dict, params: dict, out) -> None:
    """LDS (%) against lambda per kernel method, one panel per (feature set, split); the lambdas the
    table chose marked: oracle (circle) and held-out (cross)."""
    table = read_table(inputs["table"])
    curves = pd.concat([pd.read_csv(p) for p in inputs["curves"]], ignore_index=True).dropna(subset=["lambda"])
    panels = list(curves.groupby(["function", "split"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, ((function, split), curve) in zip(axes[0], panels):
        for i, (method, part) in enumerate(curve.groupby("method", sort=False)):
            color = f"C{i}"
            ax.plot(part["lambda"], part.lds * 100, color=color, label=method)
            chosen = table[(table.method == method) & (table.function == function) & (table.split == split)
                           & table.checkpoint.map(_text).eq("") & table.tags.map(_text).eq("")
                           & (table.proj_dim == params["main"]["proj_dim"])
                           & (table.timesteps == params["main"]["timesteps"])]
            for rule, marker in (("oracle", "o"), ("heldout", "x")):
                for lam in chosen[chosen.lambda_rule == rule]["lambda"]:
                    at = part.iloc[(part["lambda"] - lam).abs().argmin()]
                    ax.plot([lam], [at.lds * 100], marker=marker, color=color, ms=8, mfc="none", ls="")
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_ylabel("LDS (%)")
        ax.set_title(f"{function}, {SPLITS[split]}")
        ax.legend(fontsize=7, title="o oracle, x held-out", title_fontsize=7)
    save(fig, out)


def draw_checkpoints(inputs: dict, params: dict, out) -> None:
    """LDS (%) of TRAK / D-TRAK per kept checkpoint and the final weights; TracInCP and GAS as lines."""
    table = read_table(inputs["table"])
    table = table[(table.lambda_rule == params["main"]["lambda_rule"]) & table.tags.map(_text).eq("")]
    steps = table.checkpoint.map(_text)
    kept = sorted({int(s) for s in steps if s.isdigit()})
    at = {**{str(step): i for i, step in enumerate(kept)}, "": len(kept)}  # the final weights last
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, split in zip(axes, SPLITS):
        part = table[table.split == split]
        kernel = part[part.method.isin(["TRAK", "D-TRAK"]) & part.checkpoint.map(_text).isin(at)]
        for i, ((method, function, k, count), rows) in enumerate(kernel.groupby(
                ["method", "function", "proj_dim", "timesteps"], sort=False)):
            if rows.checkpoint.map(_text).eq("").all():
                continue  # a feature set without kept checkpoints
            rows = rows.assign(x=rows.checkpoint.map(_text).map(at)).sort_values("x")
            ax.errorbar(rows.x, rows.lds * 100, yerr=_interval(rows), marker="o", capsize=3, color=f"C{i}",
                        label=f"{method} ({function}, K={int(count)}, k={int(k)})")
        for j, method in enumerate(["TracInCP", "GAS"]):
            for lds in part[part.method == method].lds:
                ax.axhline(lds * 100, color=f"C{j + 5}", ls="--", label=method)
        ax.set_xticks(range(len(kept) + 1), [*map(str, kept), "final"])
        ax.set_xlabel("training step of the features")
        ax.set_ylabel("LDS (%)")
        ax.set_title(SPLITS[split])
        ax.legend(fontsize=7)
    save(fig, out)


def draw_ensembles(inputs: dict, params: dict, out) -> None:
    """LDS (%) against the number of retrained models (C or N in the method's name)."""
    table = read_table(inputs["table"])
    table = table[table.lambda_rule == params["main"]["lambda_rule"]]
    count = table.method.str.extract(r"\((?:C|N)=(\d+)\)$")[0]
    rows = table[count.notna()].assign(models=count.dropna().astype(int),
                                       family=table.method.str.replace(r" \((?:C|N)=\d+\)$", "", regex=True))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, split in zip(axes, SPLITS):
        for i, ((family, function), part) in enumerate(rows[rows.split == split].groupby(
                ["family", rows.function.map(_text)], sort=False)):
            part = part.sort_values("models")
            ax.errorbar(part.models, part.lds * 100, yerr=_interval(part), marker="o", capsize=3, color=f"C{i}",
                        label=family + (f" ({function})" if function else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of models")
        ax.set_ylabel("LDS (%)")
        ax.set_title(SPLITS[split])
        ax.legend(fontsize=7)
    save(fig, out)


def _display(image: np.ndarray) -> np.ndarray:
    """An image of a store ((C, H, W) in [-1, 1]) as (H, W, 3) in [0, 1]."""
    image = np.clip((np.asarray(image, dtype=np.float32) + 1) / 2, 0, 1)
    return np.repeat(image, 3, axis=0).transpose(1, 2, 0) if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _strip(images, gap: int) -> np.ndarray:
    """Images side by side, `gap` white pixels between them (and a double gap after the first)."""
    height = images[0].shape[0]
    parts = []
    for i, image in enumerate(images):
        parts += [image, np.ones((height, gap * (2 if i == 0 else 1), 3), np.float32)]
    return np.concatenate(parts[:-1], axis=1)


def draw_gallery(query_images: np.ndarray, train_images: np.ndarray, galleries: list[list], out) -> None:
    """`galleries[q]`: gallery.Entry per method for query q. Per query and method two rows, each one
    strip of images: the query then its proponents, the query then its opponents, each training
    image with its position and score."""
    top = len(galleries[0][0].proponents)
    rows = [(q, entry, kind) for q, entries in enumerate(galleries) for entry in entries for kind in ("+", "-")]
    size = train_images.shape[-1]
    gap = max(1, size // 8)
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * (top + 1) + 1.5, 1.25 * len(rows)), squeeze=False)
    for (q, entry, kind), ax in zip(rows, axes[:, 0]):
        positions, scores = ((entry.proponents, entry.proponent_scores) if kind == "+"
                             else (entry.opponents, entry.opponent_scores))
        ax.imshow(_strip([_display(query_images[q]), *(_display(train_images[i]) for i in positions)], gap),
                  interpolation="nearest")
        centers = [size / 2 + j * (size + gap) + (gap if j else 0) for j in range(top + 1)]
        ax.set_xticks(centers, [f"query {q}", *(f"#{i}\n{score:.3g}" for i, score in zip(positions, scores))],
                      fontsize=7)
        ax.set_yticks([])
        ax.tick_params(length=0)
        ax.set_ylabel(f"{entry.label}\n{'proponents' if kind == '+' else 'opponents'}", fontsize=7)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.tight_layout()
    save(fig, out)


def _image(ax, image: np.ndarray) -> None:
    """One image of a store without axes."""
    ax.imshow(_display(image), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_losses(inputs: dict, params: dict, out) -> None:
    """Training loss per step: the full model and a sample of LDS models, with moving averages."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    logs = [("full model", inputs["full"])] + [(Path(p).parent.name, p) for p in inputs["lds"]]
    for i, (name, path) in enumerate(logs):
        log = pd.read_csv(path)
        window = max(1, len(log) // 20)
        ax.plot(log.step, log.loss, color=f"C{i}", alpha=0.25, lw=0.7)
        ax.plot(log.step, log.loss.rolling(window, min_periods=1).mean(), color=f"C{i}", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    save(fig, out)


def draw_samples(inputs: dict, params: dict, out) -> None:
    """The generated queries in a grid (at most 64)."""
    from .data import load_images
    images = load_images(inputs["images"])[:64]
    columns = min(8, len(images))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, image) in zip(axes.flat, enumerate(images)):
        _image(ax, image)
        ax.axis("on")
        ax.set_xlabel(f"gen {i}", fontsize=6)
    fig.tight_layout()
    save(fig, out)


def draw_counterfactual(inputs: dict, params: dict, out) -> None:
    """Per target (rows, the first params['targets']) the full model's image, then each remover's
    regeneration at params['removed'] titled with its L2 and CLIP cosine; below, each remover's median
    L2 and CLIP cosine with its bootstrap interval (inputs: the counterfactual rule's table, medians
    and images store)."""
    import zarr
    table = pd.read_csv(inputs["table"]).set_index(["remover", "removed", "target"])
    medians = pd.read_csv(inputs["medians"])
    store = zarr.open_group(str(inputs["images"]), mode="r")
    removers, removed, targets = params["removers"], params["removed"], range(params["targets"])
    height = 0.3 * len(removers) + 1.0  # the medians' panels
    fig = plt.figure(figsize=(1.5 * (len(removers) + 1) + 1.0, 1.6 * len(targets) + height), layout="constrained")
    grid, bars = fig.subfigures(2, 1, height_ratios=[1.6 * len(targets), height])
    axes = grid.subplots(len(targets), len(removers) + 1, squeeze=False)
    for j, row in zip(targets, axes):
        _image(row[0], store["original"][j])
        row[0].set_title("original" if j == 0 else "", fontsize=7)
        row[0].set_ylabel(f"target {j}\n(gen {store.attrs['gen_indices'][j]})", fontsize=7)
        for ax, remover in zip(row[1:], removers):
            _image(ax, store[f"regenerated/{remover['name']}_n{removed}"][j])
            metrics = table.loc[(remover["name"], removed, j)]
            ax.set_title(f"{remover['label']}\nL2 {metrics.l2:.3g}, CLIP {metrics.clip_cosine:.4f}", fontsize=7)
    for ax, metric, name in zip(bars.subplots(1, 2), ("l2", "clip_cosine"), ("L2", "CLIP cosine")):
        rows = medians[(medians.removed == removed) & (medians.metric == metric)].set_index("remover")
        rows = rows.loc[[r["name"] for r in removers]]
        ax.errorbar(rows["median"], np.arange(len(rows)), fmt="o", capsize=3,
                    xerr=np.vstack([rows["median"] - rows.ci_low, rows.ci_high - rows["median"]]).clip(min=0))
        ax.set_yticks(np.arange(len(rows)), [r["label"] for r in removers], fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.xaxis.set_major_locator(plt.MaxNLocator(3))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(f"median {name} over {int(rows.n_targets.iloc[0])} targets", fontsize=7)
    save(fig, out)


def draw(name: str, inputs: dict, params: dict, out) -> None:
    """Figure `name` (diffattr.figure_plan.figures) from its job's inputs and params, to `out` (.png)."""
    if name.startswith("gallery_"):
        from .data import load_images
        from .gallery import build
        split = name.removeprefix("gallery_")
        draw_gallery(load_images(inputs["query_images"]), load_images(inputs["train_images"]),
                     build(inputs, params, split), out)
    else:
        DRAW[name](inputs, params, out)


DRAW = {"headline": draw_headline, "functions": draw_functions, "interpolation": draw_interpolation,
        "lambda": draw_lambda, "checkpoints": draw_checkpoints, "ensembles": draw_ensembles,
        "losses": draw_losses, "samples": draw_samples, "counterfactual": draw_counterfactual}
