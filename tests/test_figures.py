"""Figures drawn from synthetic tables: what each panel plots is the table's rows (the figure is
caught before it is saved), and a saved figure is a PNG and an SVG."""
import numpy as np
import pandas as pd
import pytest

from diffattr import figures

MAIN = {"timesteps": 4, "proj_dim": 64, "lambda_rule": "oracle"}


def row(method, function, lds, split, checkpoint=None, K=4, k=64):
    return {"experiment": "demo", "method": method, "function": function, "timesteps": K, "proj_dim": k,
            "checkpoint": checkpoint, "tags": None, "split": split, "lambda_rule": "oracle", "lambda": None,
            "lds": lds, "ci_low": lds - 0.05, "ci_high": lds + 0.05, "n_queries": 4, "n_subsets": 8}


@pytest.fixture
def caught(monkeypatch):
    out = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: out.update(fig=fig, path=path))
    return out


def plotted(ax) -> dict:
    """{legend label: (x, y)} of the error-bar series of an axes."""
    return {c.get_label(): tuple(np.asarray(a, dtype=float) for a in c.lines[0].get_data()) for c in ax.containers}


def test_ensembles_against_the_number_of_models(tmp_path, caught):
    rows = [row(f"D-TRAK ensemble (C={c})", "square", 0.1 * c, s) for c in (1, 2, 4) for s in ("val", "gen")]
    rows += [row(f"Datamodel (N={n})", None, 0.01 * n, s, K=None, k=None) for n in (4, 8) for s in ("val", "gen")]
    rows += [row("TRAK", "simple", 0.3, s) for s in ("val", "gen")]  # not a retraining-based method
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    figures.draw_ensembles({"table": tmp_path / "t.csv"}, {"main": MAIN}, tmp_path / "e.png")
    val = plotted(caught["fig"].axes[0])
    assert set(val) == {"D-TRAK ensemble (square)", "Datamodel"}
    np.testing.assert_allclose(val["D-TRAK ensemble (square)"][0], [1, 2, 4])
    np.testing.assert_allclose(val["D-TRAK ensemble (square)"][1], [10, 20, 40])
    np.testing.assert_allclose(val["Datamodel"][1], [4, 8])


def test_interpolation_and_checkpoints(tmp_path, caught):
    rows = [row("D-TRAK", f"interp{eta:g}", eta / 2, s) for eta in (1, 0, 0.5) for s in ("val", "gen")]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    figures.draw_interpolation({"table": tmp_path / "t.csv"}, {"main": MAIN}, tmp_path / "i.png")
    (x, y), = [v for k, v in plotted(caught["fig"].axes[0]).items() if k == "validation"]
    np.testing.assert_allclose(x, [0, 0.5, 1])
    np.testing.assert_allclose(y, [0, 25, 50])
    rows = [row("TRAK", "simple", lds, s, checkpoint) for checkpoint, lds in ((None, 0.3), ("300", 0.2), ("150", 0.1))
            for s in ("val", "gen")]
    rows += [row("TracInCP", "simple", 0.05, s, "150+300+final") for s in ("val", "gen")]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    figures.draw_checkpoints({"table": tmp_path / "t.csv"}, {"main": MAIN}, tmp_path / "c.png")
    ax = caught["fig"].axes[0]
    (x, y), = plotted(ax).values()
    np.testing.assert_allclose(y, [10, 20, 30])  # 150, 300, then the final weights
    assert [t.get_text() for t in ax.get_xticklabels()] == ["150", "300", "final"]
    assert [line.get_ydata()[0] for line in ax.lines if line.get_label() == "TracInCP"] == [5]


def test_a_saved_figure_is_a_png_and_an_svg(tmp_path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    figures.save(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:2000]
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers
