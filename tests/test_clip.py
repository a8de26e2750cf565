"""CLIP baselines: embeddings against a per-image loop with PIL's resampling written out, CLIP's own
image processor, predictions against a double loop, a ranking known by construction, provenance,
labels and config errors."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffattr.baseline import baseline_split
from diffattr.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, embed_split, preprocess, preprocessing
from diffattr.settings import ConfigError, deep_merge, resolve_all
from diffattr.methods import label, read_predictions
from diffattr.provenance import ProvenanceError
from diffattr.storage import array_sha256, file_sha256, read_array, write_array
from diffattr.subsets import make_subsets, membership_matrix

from dry_run import REPO
from test_baseline import baseline_lds, baseline_predictions

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
TINY_CLIP = CONFIG["experiments"]["default"]["score"]["clip"]
ARCHITECTURE = TINY_CLIP["architecture"]
N = 10


def spec(**change):
    return {**copy.deepcopy(TINY_CLIP), **change}


def images(rng, n, channels, side):
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, channels, 4, 4)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear").numpy()


def embed_store(path, data, clip_spec):
    write_array(path.with_suffix(".images.zarr"), data, {})
    embed_split(path.with_suffix(".images.zarr"), clip_spec, path, torch.device("cpu"), batch_size=3)
    return read_array(path)


def pil_bicubic(n_in: int, n_out: int) -> np.ndarray:
    """PIL's antialiased bicubic resampling (a = -0.5) as an (n_out, n_in) matrix, one output pixel
    at a time (Pillow's precompute_coeffs)."""
    def cubic(x, a=-0.5):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    matrix = np.zeros((n_out, n_in))
    for out in range(n_out):
        center = (out + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        weights = [cubic((i - center + 0.5) / max(scale, 1.0)) for i in range(lo, hi)]
        matrix[out, lo:hi] = np.array(weights) / sum(weights)
    return matrix


def reference_embeddings(model, data, size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """One image at a time: [-1, 1] -> [0, 1] RGB, PIL's resize as matrices (rows, clip, columns,
    clip), normalize, then the model's `image_embeds`."""
    rows = []
    for image in np.asarray(data, np.float64):
        x = np.broadcast_to((image + 1) / 2, (3, *image.shape[1:]))
        x = np.clip(x @ pil_bicubic(x.shape[2], size).T, 0, 1)
        x = np.clip(pil_bicubic(x.shape[1], size) @ x, 0, 1)
        x = (x - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
        with torch.no_grad():
            rows.append(model(pixel_values=torch.tensor(x[None], dtype=torch.float32)).image_embeds[0].numpy())
    return np.stack(rows)


def tiny_model(seed, cls=CLIPVisionModelWithProjection, config=None):
    torch.manual_seed(seed)
    return cls(config or CLIPVisionConfig(**ARCHITECTURE)).eval()


@pytest.mark.parametrize("channels,side", [(1, 8), (3, 16), (3, 64)])
def test_embeddings_equal_a_per_image_loop(tmp_path, channels, side):
    data = images(np.random.default_rng(channels + side), 7, channels, side)
    embeddings, attrs = embed_store(tmp_path / "e.zarr", data, spec(seed=5))
    np.testing.assert_allclose(embeddings, reference_embeddings(tiny_model(5), data, 32), rtol=1e-4, atol=1e-5)
    assert embeddings.shape == (7, 32) and embeddings.dtype == np.float32
    assert attrs["images_sha256"] == array_sha256(data)
    assert attrs["clip_weights"] == "random-init" and attrs["clip_seed"] == 5 and attrs["clip_pretrained"] is None
    assert {k: attrs["clip_config"][k] for k in ARCHITECTURE} == ARCHITECTURE
    assert attrs["clip_preprocess"] == {"resize": 32, "crop": [32, 32], "interpolation": "bicubic",
                                        "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    other, _ = embed_store(tmp_path / "f.zarr", data, spec(seed=6))  # another seed is another model
    assert not np.allclose(other, embeddings, atol=1e-3)


def test_preprocessing_is_clips_image_processor_up_to_8_bit_rounding():
    """transformers' CLIP image processor (PIL) on 8-bit sharp-edged digits, against ours on the same
    pixels as floats; and a resize larger than the crop (shortest edge 40, center crop 32)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pixels = np.rint(load_digits().images[:6] / 16 * 255).astype(np.uint8)
    floats = torch.from_numpy(pixels[:, None].astype(np.float32) / 127.5 - 1)
    for resize in (32, 40):
        processor = CLIPImageProcessorPil(size={"shortest_edge": resize}, crop_size={"height": 32, "width": 32})
        theirs = processor([Image.fromarray(p).convert("RGB") for p in pixels], return_tensors="pt").pixel_values
        ours = preprocess(floats, preprocessing(processor.to_dict(), 32))
        assert ours.shape == theirs.shape == (6, 3, 32, 32)
        # PIL rounds to 8 bits after each pass (the first rounding is then filtered again, with the
        # bicubic kernel's absolute weights summing to more than 1): at most 1.5 levels, over the std
        assert (ours - theirs).abs().max() < 1.5 / 255 / min(OPENAI_CLIP_STD)
        assert (ours - theirs).abs().mean() < 0.5 / 255 / min(OPENAI_CLIP_STD)


def test_a_pretrained_directory_is_loaded(tmp_path):
    """A CLIPModel saved with save_pretrained (another seed's weights, its own mean and std): its
    vision tower and projection are what embeds, its preprocessor config is applied."""
    data = images(np.random.default_rng(0), 4, 3, 16)
    config = CLIPConfig(vision_config=ARCHITECTURE, projection_dim=32,
                        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 8})
    full = tiny_model(9, CLIPModel, config)
    full.save_pretrained(tmp_path / "clip")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    embeddings, attrs = embed_store(tmp_path / "e.zarr", data, spec(pretrained=str(tmp_path / "clip"),
                                                                     architecture=None))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**ARCHITECTURE)).eval()
    vision.vision_model.load_state_dict(full.vision_model.state_dict())
    vision.visual_projection.load_state_dict(full.visual_projection.state_dict())
    np.testing.assert_allclose(embeddings, reference_embeddings(vision, data, 32, mean, std), rtol=1e-4, atol=1e-5)
    weights = tmp_path / "clip" / "model.safetensors"
    assert attrs["clip_weights"] not in (None, "random-init", file_sha256(weights)) and attrs["clip_seed"] is None
    assert attrs["clip_preprocess"]["mean"] == mean and attrs["clip_pretrained"] == str(tmp_path / "clip")
    weights.write_bytes(weights.read_bytes())  # same bytes, same digest
    assert embed_store(tmp_path / "g.zarr", data, spec(pretrained=str(tmp_path / "clip"),
                                                        architecture=None))[1]["clip_weights"] == attrs["clip_weights"]


def test_a_directory_without_every_weight_is_refused(tmp_path):
    """A CLIPVisionModel (no projection) is not completed with a random projection."""
    from transformers import CLIPVisionModel

    tiny_model(0, CLIPVisionModel).save_pretrained(tmp_path / "vision")
    # transformers 5.24 maps the vision tower's names and misses only the projection; 5.17 maps none
    with pytest.raises(ValueError, match=r"score.clip.pretrained: .*vision holds no weights for \d+ of the CLIP "
                                         r"vision model's tensors \(e.g. [a-z_.]+"):
        embed_store(tmp_path / "e.zarr", images(np.random.default_rng(0), 2, 1, 8),
                    spec(pretrained=str(tmp_path / "vision"), architecture=None))
    assert not (tmp_path / "e.zarr").exists()


@pytest.fixture
def clip_stores(tmp_path):
    """Embedding stores of N train images and 3 queries: query 0 is a copy of train image 3."""
    rng = np.random.default_rng(1)
    train = images(rng, N, 3, 8)
    query = np.concatenate([train[3:4], images(rng, 2, 3, 8)])
    embed_store(tmp_path / "train.zarr", train, spec())
    embed_store(tmp_path / "val.zarr", query, spec())
    subsets = tmp_path / "subsets.csv"
    make_subsets(np.arange(N) % 2, 6, 0.5, 42).to_csv(subsets, index=False)
    return tmp_path / "train.zarr", tmp_path / "val.zarr", subsets, train, query


@pytest.mark.parametrize("baseline", ["clip_dot", "clip_cos"])
def test_predictions_equal_a_double_loop(baseline, clip_stores, tmp_path):
    train_path, query_path, subsets, _, _ = clip_stores
    preds, attrs, _ = baseline_predictions(clip_stores, baseline, tmp_path)
    assert preds.shape == (1, 3, 6)
    e, eq = read_array(train_path)[0].astype(np.float64), read_array(query_path)[0].astype(np.float64)
    masks = membership_matrix(pd.read_csv(subsets), N)
    for z in range(3):
        score = [eq[z] @ e[i] / (np.linalg.norm(eq[z]) * np.linalg.norm(e[i]) if baseline == "clip_cos" else 1)
                 for i in range(N)]
        expected = [-sum(score[i] for i in range(N) if masks[j, i]) for j in range(6)]
        np.testing.assert_allclose(preds[0, z], expected, rtol=1e-10)
    assert attrs["clip_weights"] == "random-init" and attrs["clip_config"]["hidden_size"] == 32


def test_query_equal_to_a_train_image_ranks_it_first_under_cosine(clip_stores, tmp_path):
    """With singleton subsets, -pred is the score of each train image: the copied image has cos 1."""
    train_path, query_path, _, _, _ = clip_stores
    singletons = tmp_path / "singletons.csv"
    pd.DataFrame({"subset": range(N), "seed": 0, "train_position": range(N)}).to_csv(singletons, index=False)
    baseline_split(train_path, query_path, singletons, "clip_cos", tmp_path / "cos.zarr")
    scores = -read_predictions(tmp_path / "cos.zarr")[0]["clip_cos"][0][0]
    assert np.argmax(scores[0]) == 3 and scores[0, 3] == pytest.approx(1.0, abs=1e-6)
    assert np.sort(scores[0])[-2] < 1 - 1e-4


def test_stores_of_other_models_or_without_provenance_are_refused(clip_stores, tmp_path):
    train_path, query_path, subsets, _, query = clip_stores
    embed_store(tmp_path / "seed1.zarr", query, spec(seed=1))
    with pytest.raises(ProvenanceError, match=r"cannot be combined; they differ in clip_seed: 0 vs 1"):
        baseline_split(train_path, tmp_path / "seed1.zarr", subsets, "clip_dot", tmp_path / "out.zarr")
    write_array(tmp_path / "bare.zarr", np.ones((3, 32), np.float32), {})
    with pytest.raises(ProvenanceError, match=r"bare.zarr records no images_sha256, clip_config, .*CLIP embedding"):
        baseline_split(train_path, tmp_path / "bare.zarr", subsets, "clip_cos", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_random_init_is_in_the_lds_table_label(clip_stores, tmp_path):
    rows = baseline_lds(clip_stores, "clip_cos", tmp_path)[0]
    assert set(rows.method) == {"CLIP (cos, random-init)"} and rows["lambda"].isna().all()


def test_labels():
    assert label("clip_dot", clip_weights="random-init") == "CLIP (dot, random-init)"
    assert label("clip_cos", clip_weights="ab12" * 16) == "CLIP (cos)"
    assert label("pixel_cos", clip_weights="random-init") == "Raw pixel (cos)"


def with_clip(clip: dict) -> dict:
    """config.yaml with the default preset's score.clip replaced by `clip`."""
    config = copy.deepcopy(CONFIG)
    config["experiments"]["default"]["score"]["clip"] = clip
    return config


@pytest.mark.parametrize("clip,line", [
    (None, "experiments.default.score.clip: got no value; expected a mapping {pretrained, architecture} "
           "(score.baselines lists clip_dot, clip_cos)"),
    ({"pretrained": None}, "experiments.default.score.clip.architecture: got null; expected the CLIPVisionConfig "
                           "of the randomly initialized model ({} for ViT-B/32's), since score.clip.pretrained is null"),
    ({"pretrained": ".", "architecture": {}}, "experiments.default.score.clip.architecture: got {}; expected null, "
                                              "since score.clip.pretrained names a model directory"),
    ({"pretrained": None, "architecture": {"hidden_size": 30, "num_attention_heads": 4}},
     "experiments.default.score.clip.architecture.num_attention_heads: got 4; expected a divisor of "
     "score.clip.architecture.hidden_size 30"),
    ({"pretrained": None, "architecture": {"num_hidden_layer": 2}},
     "experiments.default.score.clip.architecture.num_hidden_layer: got 2; expected no such key (did you mean "
     "num_hidden_layers?)"),
    ({"pretrained": None, "architecture": {}, "seed": -1},
     "experiments.default.score.clip.seed: got -1; expected an integer >= 0"),
    ({"architecture": {}}, "experiments.default.score.clip.pretrained: got no value; expected a string or null"),
])
def test_malformed_clip_settings(clip, line):
    config = with_clip(clip)
    if clip is None:
        del config["experiments"]["default"]["score"]["clip"]
    with pytest.raises(ConfigError) as error:
        resolve_all(config)
    assert str(error.value).startswith(line)


def test_clip_settings_are_needed_only_by_the_clip_baselines():
    config = with_clip(None)
    del config["experiments"]["default"]["score"]["clip"]
    config["experiments"]["default"]["score"]["baselines"] = ["pixel_dot"]
    for preset in config["experiments"].values():  # presets based on default that list CLIP baselines
        score = preset.get("score") or {}
        if "clip" not in score and "baselines" in score:
            score["baselines"] = [name for name in score["baselines"] if not name.startswith("clip")]
    resolve_all(config)


def test_a_pretrained_path_must_be_a_model_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = with_clip({"pretrained": "clip-vit-base-patch32", "architecture": None})
    with pytest.raises(ConfigError) as error:
        resolve_all(config)
    assert str(error.value) == (
        'experiments.default.score.clip.pretrained: got "clip-vit-base-patch32", which is not a model directory '
        f"with a config.json (working directory {tmp_path}); expected a local Hugging Face CLIP model directory "
        "(save_pretrained layout), or null for randomly initialized weights")
    (tmp_path / "clip-vit-base-patch32").mkdir()
    (tmp_path / "clip-vit-base-patch32" / "config.json").write_text("{}")
    resolve_all(config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("architecture", [ARCHITECTURE, {}], ids=["tiny", "ViT-B-32"])
def test_embeddings_on_a_gpu_equal_the_cpus(architecture):
    """fp32 on the GPU (no TF32 in the patch convolution or the matmuls) agrees with the CPU to
    float32 rounding."""
    from diffattr.clip import embed, load_clip

    data = images(np.random.default_rng(0), 8, 3, 32)
    model, attrs = load_clip(spec(architecture=architecture))
    cpu = embed(model, data, attrs["clip_preprocess"], 4, torch.device("cpu"))
    gpu = embed(model, data, attrs["clip_preprocess"], 4, torch.device("cuda"))
    assert np.abs(gpu - cpu).max() / np.abs(cpu).max() < 1e-4
