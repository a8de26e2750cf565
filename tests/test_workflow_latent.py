"""End to end on the latent kind: `sd-tiny` (sd-digits at its smallest) from nothing to the table, the
base trained by the workflow, the LDS models LoRA-finetuned from it, every stage reading latents."""
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from diffattr.data import load_labels
from diffattr.plan import Plan
from diffattr.settings import resolve_all
from diffattr.storage import read_array, read_attrs

from dry_run import REPO, copy_workflow

EXPERIMENT = "sd-tiny"

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import yaml

    root = copy_workflow(tmp_path_factory.mktemp("latent"))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--config", f"experiment={EXPERIMENT}"],
                            cwd=root, text=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise AssertionError(f"the {EXPERIMENT} run failed:\n{result.stdout}\n{result.stderr}")
    settings = resolve_all(yaml.safe_load((REPO / "config.yaml").read_text()), libraries=False)[EXPERIMENT]
    return root, Plan(EXPERIMENT, settings)


def test_table_has_trak_and_dtrak_on_both_query_splits(run):
    root, plan = run
    table = pd.read_csv(root / f"results/lds_{EXPERIMENT}.csv")
    main = table[(table.timesteps == plan.main["timesteps"]) & (table.proj_dim == plan.main["proj_dim"])]
    for method in ("TRAK", "D-TRAK", "TracInCP", "Journey-TRAK"):
        rows = main[main.method == method]
        assert set(rows.split) == ({"gen"} if method == "Journey-TRAK" else {"val", "gen"}), method
        assert all(math.isfinite(v) for v in rows.lds), rows
    assert {"Raw pixel (cos)", "CLIP (cos, random-init)", "TRAK ensemble (C=2)", "D-TRAK ensemble (C=2)",
            "Empirical IF (N=4)", "Datamodel (N=4)", "K-FAC influence", "EK-FAC influence"} <= set(table.method)


def test_models_read_latents_and_baselines_read_decoded_images(run):
    root, plan = run
    images = read_array(root / plan.images("train"))[0]
    latents = read_array(root / plan.samples("train"))[0]
    assert latents.shape[0] == images.shape[0] and latents.shape[1] == 4 and latents.shape[2] < images.shape[2]
    np.testing.assert_array_equal(load_labels(root / plan.samples("train")), load_labels(root / plan.images("train")))
    generated = read_array(root / plan.samples("gen"))[0]
    decoded = read_array(root / plan.images("gen"))[0]
    assert generated.shape[1:] == latents.shape[1:] and decoded.shape[1:] == images.shape[1:]
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert read_attrs(root / plan.samples("train"))["flipped"] is False


def test_an_lds_model_is_its_lora_not_a_copy_of_the_base(run):
    root, plan = run
    lora = root / plan.weights(f"results/{EXPERIMENT}/models/lds/{plan.lds_models[0]}")
    base_unet = next((root / plan.base() / "unet").glob("*.safetensors"))
    assert lora.stat().st_size < base_unet.stat().st_size / 5


def test_counterfactual_target_compares_decoded_images(run):
    """results/counterfactual_sd-tiny.csv: retrained LoRA models regenerate the targets, whose decoded
    images (not latents) the L2 and CLIP metrics compare."""
    root, plan = run
    target = f"results/counterfactual_{EXPERIMENT}.csv"
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", target], cwd=root, text=True,
                            capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    table = pd.read_csv(root / target)
    assert len(table) == len(plan.removals) * plan.counterfactual["targets"]
    assert np.isfinite(table[["l2", "clip_cosine", "loss_change"]].to_numpy()).all()
    regenerated = read_array(root / f"results/{EXPERIMENT}/counterfactual/regenerated/full.zarr")[0]
    assert regenerated.shape[1:] == read_array(root / plan.images("train"))[0].shape[1:]
