"""The counterfactual figure drawn from a constructed images store, table and medians: each panel
shows the stored image of its target and remover at the chosen removed count, titled with that row's
metrics, and the medians panel plots the medians.csv rows in the removers' order."""
import numpy as np
import pandas as pd
import pytest
import zarr

from diffattr import figures

REMOVERS = [{"name": "trak_square_K4_k64_oracle", "label": "D-TRAK"}, {"name": "random", "label": "Random"}]


@pytest.fixture
def caught(monkeypatch):
    out = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: out.update(fig=fig, path=path))
    return out


def test_panels_are_the_stored_images_with_their_metrics(tmp_path, caught):
    rng = np.random.default_rng(0)
    shape = (3, 3, 4, 4)  # 3 targets of 3 x 4 x 4
    store = zarr.open_group(str(tmp_path / "images.zarr"), mode="w")
    store.attrs["gen_indices"] = [7, 2, 5]
    store.create_array("original", data=rng.uniform(-1, 1, shape).astype(np.float32))
    rows, medians = [], []
    for r, remover in enumerate(REMOVERS):
        for removed in (5, 9):  # the figure shows 9 only
            store.create_array(f"regenerated/{remover['name']}_n{removed}",
                               data=rng.uniform(-1, 1, shape).astype(np.float32))
            rows += [{"target": j, "remover": remover["name"], "method": remover["label"], "removed": removed,
                      "l2": 10 * r + j + removed / 100, "clip_cosine": 0.5 + 0.1 * j - 0.01 * r + removed / 1000}
                     for j in range(3)]
            medians += [{"method": remover["label"], "remover": remover["name"], "removed": removed, "metric": m,
                         "median": 1.0 + r + removed + (m == "l2"), "ci_low": 0.5 + r + removed,
                         "ci_high": 2.0 + r + removed + (m == "l2"), "n_targets": 3} for m in ("l2", "clip_cosine")]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame(medians).to_csv(tmp_path / "m.csv", index=False)
    figures.draw_counterfactual({"table": tmp_path / "t.csv", "medians": tmp_path / "m.csv",
                                 "images": tmp_path / "images.zarr"},
                                {"targets": 2, "removed": 9, "removers": REMOVERS}, tmp_path / "c.png")
    grid, bars = caught["fig"].subfigs
    panels = np.array(grid.axes).reshape(2, 3)  # 2 of the 3 targets; the original, then each remover
    for j in range(2):
        np.testing.assert_array_equal(panels[j, 0].images[0].get_array(), figures._display(store["original"][j]))
        assert f"gen {[7, 2][j]}" in panels[j, 0].get_ylabel()
        for ax, (r, remover) in zip(panels[j, 1:], enumerate(REMOVERS)):
            np.testing.assert_array_equal(ax.images[0].get_array(),
                                          figures._display(store[f"regenerated/{remover['name']}_n9"][j]))
            l2, cosine = 10 * r + j + 0.09, 0.5 + 0.1 * j - 0.01 * r + 0.009
            assert ax.get_title() == f"{remover['label']}\nL2 {l2:.3g}, CLIP {cosine:.4f}"
    l2_ax, clip_ax = bars.axes
    x, y = (np.asarray(a, dtype=float) for a in l2_ax.containers[0].lines[0].get_data())
    np.testing.assert_allclose(x, [11, 12])  # D-TRAK's median L2 at 9 removed, then Random's
    np.testing.assert_allclose(y, [0, 1])
    assert [t.get_text() for t in l2_ax.get_yticklabels()] == ["D-TRAK", "Random"]
    np.testing.assert_allclose(np.asarray(clip_ax.containers[0].lines[0].get_data()[0], dtype=float), [10, 11])
