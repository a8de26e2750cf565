"""End to end: the `tiny-retrain` experiment (tiny plus a pool of 4 retrained models), its
retraining-based rows, and their stores recomputed from the pool's features and outputs (~1 minute)."""
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from diffattr.settings import experiment, retrain_settings
from diffattr.ensemble import ensemble_predictions
from diffattr.lds import ground_truth_matrix
from diffattr.methods import read_predictions
from diffattr.retrain import empirical_if
from diffattr.protocol import lambda_grid
from diffattr.storage import read_array
from diffattr.subsets import membership_matrix

from dry_run import REPO, copy_workflow

pytestmark = pytest.mark.workflow
EXPERIMENT = "tiny-retrain"


@pytest.fixture(scope="module")
def spec():
    return experiment(yaml.safe_load((REPO / "config.yaml").read_text()), EXPERIMENT)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("retrain"))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", f"results/lds_{EXPERIMENT}.csv"],
                            cwd=workdir, text=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir / "results" / EXPERIMENT


def test_table_has_the_retraining_based_rows(root, spec):
    table = pd.read_csv(root.parent / f"lds_{EXPERIMENT}.csv")
    retrain, grid = retrain_settings(spec), spec["featurize"]
    rules = spec["lds"]["lambda_rules"]
    ensembles = {(f"{'TRAK' if f == 'simple' else 'D-TRAK'} ensemble (C={c})", f, split, rule)
                 for f in grid["functions"] for c in retrain["ensembles"] for split in ("val", "gen") for rule in rules}
    pool = {(f"{name} (N={n})", "", split, rule) for name in ("Empirical IF", "Datamodel")
            for n in retrain["n_models"] for split in ("val", "gen") for rule in rules}
    rows = table[table.method.str.contains("ensemble|Empirical|Datamodel")]
    got = list(zip(rows.method, rows.function.fillna(""), rows.split, rows.lambda_rule))
    assert len(got) == len(set(got)) and set(got) == ensembles | pool
    lambdas = lambda_grid(spec["score"]["lambda_exponents"])
    with_lambda = rows.method.str.contains("ensemble")
    assert all(any(math.isclose(value, g) for g in lambdas) for value in rows["lambda"][with_lambda])
    assert rows["lambda"][~with_lambda].isna().all() and rows.lds.between(-1, 1).all()


def test_stores_are_the_pools_features_and_outputs_scored(root, spec):
    retrain = retrain_settings(spec)
    lds_masks = membership_matrix(pd.read_csv(root / "subsets.csv"), spec["dataset"]["n_train"])
    pool_table = pd.read_csv(root / "retrain" / "subsets.csv")
    lds_seeds = set(pd.read_csv(root / "subsets.csv").seed)
    assert lds_seeds.isdisjoint(pool_table.seed) and pool_table.subset.nunique() == retrain["pool"]
    models = [f"s{j:03d}-r{retrain['train_seed']}" for j in range(retrain["pool"])]

    c = max(retrain["ensembles"])
    store = root / "scores" / f"square_K{spec['featurize']['timesteps'][0]}_k{spec['featurize']['proj_dims'][0]}_ens{c}"
    predictions, attrs = read_predictions(store / "val.zarr")
    preds, lambdas = predictions["trak_ens"]
    folder = root / "features" / "retrain"
    features = [tuple(read_array(folder / m / store.name.rsplit("_ens", 1)[0] / split)[0]
                      for split in ("train.zarr", "val.zarr")) for m in models[:c]]
    np.testing.assert_allclose(preds, ensemble_predictions(features, lds_masks, lambdas), rtol=1e-6)
    assert attrs["models"] == c and len(set(attrs["model_sha256"])) == c

    n = max(retrain["n_models"])
    outputs, _ = ground_truth_matrix({m: root / "ground_truth" / "retrain" / f"{m}.zarr" for m in models[:n]},
                                     "gen", n)
    pool_masks = membership_matrix(pool_table, spec["dataset"]["n_train"])[:n]
    predictions, attrs = read_predictions(root / "scores" / f"retrain_n{n}" / "gen.zarr")
    preds = predictions["empirical_if"][0]
    np.testing.assert_allclose(preds[0], -empirical_if(outputs.T, pool_masks) @ lds_masks.T, rtol=1e-9)
    assert attrs["output_timesteps"] == list(range(0, 1000, 1000 // retrain["timesteps"]))[:retrain["timesteps"]]
