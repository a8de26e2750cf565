"""The method registry (diffattr.methods): a method is one entry there, which the planner, the score
jobs, the LDS and the table read; no other file names it."""
import numpy as np
import pandas as pd
import yaml

from diffattr.lds import lds_table
from diffattr.methods import METHODS, Method, read_predictions
from diffattr.plan import Plan
from diffattr.score import score_split, subset_predictions
from diffattr.settings import deep_merge, resolve_all
from diffattr.storage import array_sha256, write_array
from diffattr.subsets import membership_matrix
from diffattr.table import collect

from dry_run import REPO
from test_provenance import MODELS, QUERIES, subsets_csv, write_truth  # noqa: F401 (a fixture)

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
FEATURES = {"model_sha256": "a" * 64, "function": "square", "K": 4, "timesteps": [0, 250, 500, 750],
            "scheme": "uniform", "noise_seed": 0, "dtype": "float32", "device": "cpu",
            "projector": "BasicProjector", "proj_dim": 5, "proj_seed": 42, "proj_type": "normal",
            "grad_dim": 99, "block_size": 8}


def test_a_method_defined_here_is_planned_scored_and_in_the_table(monkeypatch, subsets_csv, tmp_path):
    # a method the workflow does not have: a third of TRAK's kernel scores
    monkeypatch.setitem(METHODS, "third_trak", Method("Third TRAK", "features", True, lambda job: job.kernel(None) / 3))
    # planned: a preset may list it, and the score job of every feature set and split computes it
    config = deep_merge(CONFIG, {"experiments": {"tiny": {"score": {"methods": ["trak", "third_trak"]}}}})
    plan = Plan("tiny", resolve_all(config)["tiny"])
    assert plan.methods("features") == ["trak", "third_trak"]
    assert all(plan.scored(fset, split) == ["trak", "third_trak"]
               for fset in plan.feature_sets for split in ("val", "gen"))
    assert plan.jobs()["score"] == Plan("tiny", resolve_all(CONFIG)["tiny"]).jobs()["score"]

    # scored, from the same features as TRAK, into the same store
    rng = np.random.default_rng(0)
    x, xq = rng.normal(size=(12, 5)), rng.normal(size=(3, 5))
    write_array(tmp_path / "train.zarr", x.astype(np.float32), {**FEATURES, "query_sha256": "t" * 64})
    write_array(tmp_path / "val.zarr", xq.astype(np.float32), {**FEATURES, "query_sha256": array_sha256(QUERIES)})
    out = tmp_path / "scores" / "val.zarr"
    score_split(tmp_path / "train.zarr", tmp_path / "val.zarr", subsets_csv,
                {"lambda_exponents": [-1, 1], "methods": plan.methods("features")}, out, "val")
    predictions, _ = read_predictions(out)
    masks = membership_matrix(pd.read_csv(subsets_csv), 12)
    lambdas = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
    expected = subset_predictions(x.astype(np.float32), xq.astype(np.float32), masks, lambdas) / 3
    np.testing.assert_allclose(predictions["third_trak"][0], expected, rtol=1e-10)
    np.testing.assert_allclose(predictions["third_trak"][1], lambdas)

    # in the LDS table and the experiment's table, under its own label
    truth = {name: tmp_path / "gt" / f"{name}.zarr" for name in MODELS}
    for k, (name, path) in enumerate(truth.items()):
        write_truth(path, rng.normal(size=3), f"{k:02d}" * 32, array_sha256(QUERIES))
    spec = {"lambda_rules": ["oracle"], "confidence": 0.95, "bootstrap_resamples": 50, "heldout_seed": 0}
    lds_table(out, subsets_csv, truth, "val", spec, tmp_path / "lds.csv")
    table = collect([tmp_path / "lds.csv"], "tiny", tmp_path / "table.csv", tmp_path / "table.md")
    assert set(table.method) == {"D-TRAK", "Third TRAK"}
    assert "| Third TRAK | square | 4 | 5 |" in (tmp_path / "table.md").read_text()
