"""Which figures each preset draws (only those its outputs allow), what they read, their captions."""
import pytest
import yaml

from diffattr.figure_plan import caption, figures, gallery_methods, inputs, params
from diffattr.plan import Plan, path
from diffattr.settings import experiment

from dry_run import REPO

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def plan(preset, **overrides):
    from diffattr.settings import deep_merge
    return Plan(preset, experiment(deep_merge(CONFIG, {"experiments": {preset: overrides}}), preset))


def test_figures_follow_the_outputs():
    assert figures(plan("default")) == ["headline", "functions", "interpolation", "lambda", "checkpoints",
                                        "gallery_val", "gallery_gen", "losses", "samples"]
    # tiny: no interp functions (no Fig. 1); tiny-retrain adds the ensembles
    assert "interpolation" not in figures(plan("tiny")) and "ensembles" not in figures(plan("tiny"))
    assert "ensembles" in figures(plan("tiny-retrain"))
    one_function = plan("tiny", featurize={"functions": ["square"], "extra_grids": []}, ablations=[])
    assert figures(one_function) == ["headline", "lambda", "gallery_val", "gallery_gen", "losses", "samples"]
    # no gallery where its (n, n) singleton masks would not fit
    assert not any(name.startswith("gallery") for name in figures(plan("cifar10")))
    assert "gallery_val" in figures(plan("cifar2"))


def test_gallery_methods_and_inputs():
    default = plan("default")
    shown = [(m, None if f is None else f.name) for m, f in gallery_methods(default, "val")]
    assert shown == [("trak", "simple_K10_k512"), ("trak", "square_K10_k512"), ("das", "avg_K10_k512"),
                     ("pixel_cos", None)]
    got = inputs(default, "gallery_val")
    assert got["m1_train"] == path("features", experiment="default", fset="square_K10_k512", split="train")
    assert got["m2_residual"].endswith("features/avg_K10_k512/train_residual.zarr")
    assert got["m3_query"] == default.images("val")
    assert [m["label"] for m in params(default, "gallery_val")["methods"]] == ["TRAK", "D-TRAK", "DAS",
                                                                               "Raw pixel (cos)"]
    curves = inputs(default, "lambda")["curves"]
    assert [c.rsplit("/", 1)[1] for c in curves] == [f"{f}_K10_k512_{s}.lambdas.csv" for f in ("simple", "square")
                                                     for s in ("val", "gen")]


@pytest.mark.parametrize("name", ["headline", "lambda", "gallery_gen", "losses", "samples"])
def test_captions_name_the_settings(name):
    text = caption(plan("default"), name)
    assert "K = 10 timesteps, k = 512 projections" in text and "24 subsets x 3 training seeds" in text
    assert "oracle" in text


def test_the_counterfactual_figure_is_the_counterfactual_targets_only():
    cifar2 = plan("cifar2")
    assert "counterfactual" not in figures(cifar2)  # drawn by rule counterfactual, not by `rule all`
    got = params(cifar2, "counterfactual")
    assert (got["targets"], got["removed"]) == (6, 1000)
    assert [r["label"] for r in got["removers"]] == ["Random", "TRAK", "D-TRAK"]
    assert got["removers"][0]["name"] == "random"
    text = got["caption"]
    assert "first 6 of 60" in text and "top 1000" in text and "Random, TRAK, D-TRAK" in text
    assert "random-init" in text
