"""The ArtBench presets (the paper's text-to-image setting): the artbench source's images, the settings
against the reference code's (sail-sg/D-TRAK, ArtBench2/ArtBench5), the one-line messages for missing
data and base weights, and how fast Snakemake plans artbench2's 1 + 192 LoRA models."""
import json
import math
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from diffattr.data import load_source
from diffattr.plan import Plan
from diffattr.sd_stack import PARTS, check_pretrained
from diffattr.settings import experiment

from dry_run import REPO, copy_workflow, job_counts

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
STYLES = {"artbench2": ["post_impressionism", "ukiyo_e"],
          "artbench5": ["post_impressionism", "ukiyo_e", "romanticism", "renaissance", "baroque"]}
ARTBENCH_CLASS_SIZES = {"train": 5000, "test": 1000}  # ArtBench-10's images per style


def fake_pretrained(root):
    """Empty files with the names check_pretrained looks for: a dry run reads no weights."""
    for part, needs in PARTS.items():
        (root / part).mkdir(parents=True)
        for alternatives in needs:
            name = alternatives[0]
            (root / part / (f"model{name}" if name.startswith(".") else name)).touch()
    return root


def fake_artbench(root, styles):
    for split in ("train", "test"):
        for style in styles:
            (root / split / style).mkdir(parents=True)
    return root


def snakemake(workdir, *args):
    """Snakemake's result and its wall seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args],
                            cwd=workdir, text=True, capture_output=True)
    return result, time.perf_counter() - start


def overrides(file=None, **model_and_dataset) -> list[str]:
    """artbench2's dataset.path / model.pretrained over config.yaml's: `--config` as docs/presets-and-data.md
    has it, or (`file`, where a null must stay null: --config reads it as the text "null") a YAML
    config file written there."""
    block = {section: {key: value if value is None else str(value)} for section, (key, value) in model_and_dataset.items()}
    if file is None:
        return ["--config", "experiments=" + json.dumps({"artbench2": block})]
    file.write_text(yaml.safe_dump({"experiments": {"artbench2": block}}))
    return ["--configfile", str(file)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("artbench"))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A stand-in miniSD folder and ArtBench-10 tree (class folders only)."""
    root = tmp_path_factory.mktemp("local")
    return {"pretrained": fake_pretrained(root / "miniSD"), "data": fake_artbench(root / "artbench", STYLES["artbench5"])}


def write_image(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # png: lossless


def test_artbench_images_are_the_references_resize_and_center_crop(tmp_path):
    """The reference's Resize(256) + CenterCrop(256), written out: the short side scaled to 256
    (bilinear), then the central 256 x 256. On the release's 256 x 256 images: the file's pixels."""
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)        # short side 256 already: no resize
    large = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    write_image(tmp_path / "train" / "ukiyo_e" / "a.png", square)
    write_image(tmp_path / "train" / "ukiyo_e" / "b.png", wide)
    write_image(tmp_path / "train" / "ukiyo_e" / "c.png", large)
    write_image(tmp_path / "test" / "ukiyo_e" / "d.png", square[::-1])
    parts = load_source({"source": "artbench", "path": str(tmp_path), "classes": ["ukiyo_e"]})
    resized = np.asarray(Image.fromarray(large).resize((256, 256), Image.BILINEAR))
    expected = np.stack([square, wide[:, 32:288], resized])  # left offset round((320 - 256) / 2)
    images, labels = parts["train"]
    np.testing.assert_array_equal(np.rint((images + 1) * 127.5).astype(np.uint8), expected.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(labels, [0, 0, 0])
    np.testing.assert_array_equal(np.rint((parts["test"][0] + 1) * 127.5).astype(np.uint8),
                                  square[None, ::-1].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("preset", ["artbench2", "artbench5"])
def test_presets_are_the_references_settings(preset):
    """Each number from the reference's scripts and notebooks, recomputed here (/tmp notes: ArtBench5's
    train_text_to_image_lora.py, run_train.sh, 00_EDA.ipynb, gen/eval/grad scripts)."""
    spec = experiment(CONFIG, preset, libraries=False)
    data, model, train = spec["dataset"], spec["model"], spec["train"]
    styles = STYLES[preset]
    assert (data["source"], data["classes"], data["image_size"], data["split_seed"]) == ("artbench", styles, 256, 42)
    assert data["n_train"] == 2500 * len(styles) and data["n_val"] == 1000  # half the train images; 1000 queries
    assert data["n_train"] <= ARTBENCH_CLASS_SIZES["train"] * len(styles)
    assert data["n_val"] // len(styles) == {2: 500, 5: 200}[len(styles)]
    assert model["prompts"] == ["a {} painting".format(s.replace("_", " ").lower()) for s in styles]
    assert (model["kind"], model["lora"]["rank"], model["attention_dropout"]) == ("latent_lora", 128, 0.1)
    assert model["pretrained"] == "models/miniSD-diffusers"
    assert (train["batch_size"], train["lr"], train["weight_decay"], train["grad_clip"]) == (64, 3e-4, 1e-6, 1.0)
    assert (train["warmup_fraction"], train["hflip"], train["caption_dropout"]) == (0.1, True, 0.1)
    assert train["dtype"] == "fp16"  # run_train.sh: accelerate launch --mixed_precision="fp16"
    assert train["full_steps"] == math.ceil(100 * data["n_train"] / 64)
    assert train["lds_steps"] == math.ceil(100 * data["n_train"] * spec["subsets"]["alpha"] / 64)
    assert (spec["subsets"]["m"], spec["subsets"]["train_seeds"], spec["subsets"]["alpha"]) == (64, [0, 1, 2], 0.5)
    gen = spec["generate"]
    assert (gen["n"], gen["steps"], gen["eta"], gen["guidance_scale"], gen["seed"]) == (1000, 50, 0.0, 7.5, 0)
    assert (spec["ground_truth"]["timesteps"], spec["ground_truth"]["noise_seeds"]) == (1000, [0, 1, 2])
    featurize = spec["featurize"]
    assert (featurize["functions"], featurize["timesteps"], featurize["proj_dims"]) == (["simple", "square"], [10, 100], [32768])
    cifar2 = experiment(CONFIG, "cifar2", libraries=False)
    assert spec["threads"] == cifar2["threads"]
    assert all(spec[stage]["dtype"] == cifar2[stage]["dtype"] for stage in ("generate", "ground_truth"))
    jobs = {rule: len(out) for rule, out in Plan(preset, spec).jobs().items()}
    assert (jobs["train_full"], jobs["train_lds"], jobs.get("train_retrain", 0)) == (1, 192, 0)


def test_artbench2_plans_its_models_in_seconds(workdir, local):
    """The dry run of results/lds_artbench2.csv has the planner's jobs, 1 + 192 LoRA models among them.
    Its planning (the dry run's time beyond `--list-rules`, which plans nothing: Snakemake's start and
    the config check, which imports torch and diffusers, are every run's) takes at most 10 s."""
    args = overrides(dataset=("path", local["data"]), model=("pretrained", local["pretrained"]))
    nothing, start_only = snakemake(workdir, "--list-rules", *args)
    assert nothing.returncode == 0 and "train_lds" in nothing.stdout
    result, seconds = snakemake(workdir, "-n", "results/lds_artbench2.csv", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    config = {**CONFIG, "experiments": {**CONFIG["experiments"], "artbench2": {
        **CONFIG["experiments"]["artbench2"],
        "dataset": {**CONFIG["experiments"]["artbench2"]["dataset"], "path": str(local["data"])},
        "model": {**CONFIG["experiments"]["artbench2"]["model"], "pretrained": str(local["pretrained"])}}}}
    planned = {rule: len(out) for rule, out in Plan("artbench2", experiment(config, "artbench2", libraries=False)).jobs().items()
               if rule != "figure"}
    assert counts == planned
    assert {rule: counts[rule] for rule in ("train_full", "train_lds", "ground_truth", "encode", "encode_flipped",
                                            "decode_generated", "generate", "dataset", "subsets")} == {
        "train_full": 1, "train_lds": 192, "ground_truth": 192, "encode": 2, "encode_flipped": 1,
        "decode_generated": 1, "generate": 1, "dataset": 1, "subsets": 1}
    assert "base" not in counts  # a set model.pretrained: the workflow builds no base
    print(f"dry run {seconds:.1f} s, of which start and config check {start_only:.1f} s")
    assert seconds - start_only <= 10


def error_lines(result, key: str) -> list[str]:
    """The lines of the run's output that name `key`, and the line after each."""
    lines = (result.stdout + result.stderr).splitlines()
    return [(line, lines[i + 1]) for i, line in enumerate(lines) if key in line and "Traceback" not in line]


@pytest.mark.parametrize("where", ["nowhere", None])
def test_missing_data_is_one_line_naming_the_key(workdir, local, tmp_path, where):
    path = where and tmp_path / where
    result, _ = snakemake(workdir, "-n", "results/lds_artbench2.csv",
                          *overrides(tmp_path / "paths.yaml", dataset=("path", path),
                                     model=("pretrained", local["pretrained"])))
    assert result.returncode != 0
    [(line, after)] = error_lines(result, "experiments.artbench2.dataset.path")
    assert line.startswith(f"  FileNotFoundError: experiments.artbench2.dataset.path: "
                           f"{'got null' if path is None else f'{path} does not exist'}; expected ")
    assert "artbench-10-imagefolder-split.tar" in line and "https://github.com/liaopeiyuan/artbench" in line
    assert "train/<style>/" in line and after == "Wildcards:"  # one line: the next is Snakemake's
    assert "Job stats" not in result.stdout  # before any job


def test_missing_weights_are_one_line_naming_the_key(workdir, local, tmp_path):
    missing = tmp_path / "miniSD"
    assert check_pretrained(missing) is not None and check_pretrained(local["pretrained"]) is None
    result, _ = snakemake(workdir, "-n", "results/lds_artbench2.csv",
                          *overrides(dataset=("path", local["data"]), model=("pretrained", missing)))
    assert result.returncode != 0
    [(line, after)] = error_lines(result, "experiments.artbench2.model.pretrained")
    assert line == f"  FileNotFoundError: experiments.artbench2.{check_pretrained(missing)}"
    assert "huggingface-cli download lambdalabs/miniSD-diffusers" in line and after == "Wildcards:"
    assert "Job stats" not in result.stdout


def test_the_lora_slurm_layer_groups_lds_trainings_and_keeps_the_profiles_groups(workdir, local):
    """`--profile slurm --profile slurm/lora` plans artbench2's 192 LDS trainings as 48 groups of 4 and
    its 192 ground truths as 96 groups of 2, as the real profile alone groups them."""
    real, lora = (yaml.safe_load((REPO / name / "config.yaml").read_text()) for name in ("slurm", "slurm/lora"))
    for key in ("groups", "group-components"):
        assert {rule: v for rule, v in lora[key].items() if rule != "train_lds"} == real[key]
    shutil.copytree(REPO / "slurm", workdir / "slurm", dirs_exist_ok=True)
    args = overrides(dataset=("path", local["data"]), model=("pretrained", local["pretrained"]))
    result, _ = snakemake(workdir, "--profile", "slurm", "--profile", "slurm/lora", "-n", "results/lds_artbench2.csv", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    groups = re.findall(r"Group job (\w+) \(jobs in lexicogr. order\):", result.stdout)
    assert (groups.count("train_lds"), groups.count("ground_truth"), len(groups)) == (192 // 4, 192 // 2, 48 + 96)
