"""CLIP image embeddings of a split's images, for the CLIP similarity baselines (clip_dot, clip_cos).

CLIP always embeds images as a viewer sees them: the real images of train and val, and the decoded
generated images, whatever the diffusion model's kind (pixel or latent). The model is Hugging Face
transformers' `CLIPVisionModelWithProjection` (embeddings: `image_embeds`, unnormalized), with the
weights of a local model directory (`save_pretrained` layout, e.g. a snapshot of
openai/clip-vit-base-patch32) or, when `pretrained` is null, randomly initialized from `seed` with the
configured `architecture` (a `CLIPVisionConfig`). A random-init model is named so in every output
(`clip_weights: random-init`, and the LDS table's label), since its similarities say nothing about
semantic closeness.

Not open_clip: it imports torchvision, which has no CPU build on PyPI, and PyPI's CUDA build of
torchvision beside the CPU torch wheel breaks diffusers' import.

Preprocessing is CLIP's (CLIPImageProcessor, in torch): images in [-1, 1] are mapped to [0, 1], a grey
channel is repeated to RGB, the image is resized to the processor's shortest edge as PIL resizes
(antialiased kernel, horizontal then vertical pass, each clipped to [0, 1]), center-cropped to the
model's input and normalized with the processor's mean and std; without the rounding to 8-bit
pixels (tests/test_clip.py compares the two).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import load_images
from .device import device_name, precision
from .methods import RANDOM_INIT
from .provenance import ProvenanceError, require_finite, require_present, require_same
from .storage import array_sha256, file_sha256, read_array, write_array

# What makes two embedding stores comparable: the same architecture, weights and preprocessing.
CLIP_KEYS = ("clip_config", "clip_weights", "clip_seed", "clip_preprocess")
REQUIRED_KEYS = ("images_sha256", "clip_config", "clip_weights", "clip_preprocess")
# The CLIPVisionConfig entries that define the network (recorded in `clip_config`).
ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "num_channels", "image_size", "patch_size", "hidden_act",
                     "layer_norm_eps")
WEIGHT_FILES = ("*.safetensors", "*.bin")
# PIL resampling codes of a preprocessor_config.json, as torch interpolation modes.
RESAMPLE = {2: "bilinear", 3: "bicubic"}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def load_clip(spec: dict):
    """(CLIPVisionModelWithProjection in eval mode on the CPU, its provenance attributes) from
    `score.clip`: the `pretrained` directory's weights, or random ones from `architecture` and `seed`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pretrained, seed = spec.get("pretrained"), int(spec.get("seed", 0))
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a random init depends on the seed only
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**(spec.get("architecture") or {})))
        weights, preprocessor = RANDOM_INIT, {}
    else:
        model, info = CLIPVisionModelWithProjection.from_pretrained(pretrained, output_loading_info=True)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(f"score.clip.pretrained: {pretrained} holds no weights for {len(missing)} of "
                             f"the CLIP vision model's tensors (e.g. {', '.join(missing[:3])}); expected "
                             "the directory of a CLIP model (CLIPModel or CLIPVisionModelWithProjection)")
        weights, preprocessor = weights_sha256(pretrained), _preprocessor_config(pretrained)
    config = model.config.to_dict()
    attrs = {"clip_config": {key: config[key] for key in ARCHITECTURE_KEYS},
             "clip_weights": weights, "clip_pretrained": None if pretrained is None else str(pretrained),
             "clip_seed": seed if pretrained is None else None,
             "clip_preprocess": preprocessing(preprocessor, int(config["image_size"]))}
    return model.eval(), attrs


def weights_sha256(directory) -> str:
    """One digest of a model directory's weight files (names and contents)."""
    files = sorted({path for pattern in WEIGHT_FILES for path in Path(directory).glob(pattern)})
    if not files:
        raise ValueError(f"score.clip.pretrained: {directory} holds no weight file ({', '.join(WEIGHT_FILES)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def _preprocessor_config(directory) -> dict:
    path = Path(directory) / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def preprocessing(preprocessor: dict, image_size: int) -> dict:
    """Resize, crop, mean and std of a CLIPImageProcessor config (CLIP's defaults where it is silent)."""
    size = preprocessor.get("size", {"shortest_edge": image_size})
    crop = preprocessor.get("crop_size", {"height": image_size, "width": image_size})
    resize = int(size["shortest_edge"] if isinstance(size, dict) else size)
    crop = [int(crop["height"]), int(crop["width"])] if isinstance(crop, dict) else [int(crop), int(crop)]
    resample = int(preprocessor.get("resample", 3))
    if resample not in RESAMPLE or crop != [image_size, image_size] or resize < image_size:
        raise ValueError(f"CLIP preprocessing: resample {resample}, shortest edge {resize}, crop {crop}; "
                         f"expected resample 2 or 3 and a crop of the model's {image_size} x {image_size} "
                         "input from a resize at least that large")
    return {"resize": resize, "crop": crop, "interpolation": RESAMPLE[resample],
            "mean": [float(v) for v in preprocessor.get("image_mean", OPENAI_CLIP_MEAN)],
            "std": [float(v) for v in preprocessor.get("image_std", OPENAI_CLIP_STD)]}


def preprocess(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Images (N, 1 or 3, H, W) in [-1, 1] -> the model's input (N, 3, *crop), normalized."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"CLIP embeds images of shape (N, 1 or 3, H, W); got {tuple(images.shape)}")
    x = ((images.float() + 1) / 2).expand(-1, 3, -1, -1)
    height, width = x.shape[2:]
    scale = cfg["resize"] / min(height, width)  # shortest edge to `resize`, as CLIPImageProcessor rounds
    height, width = (cfg["resize"], int(width * scale)) if height <= width else (int(height * scale), cfg["resize"])
    for size in ((x.shape[2], width), (height, width)):  # PIL: rows, then columns, each clipped
        x = F.interpolate(x, size=size, mode=cfg["interpolation"], align_corners=False, antialias=True).clamp(0, 1)
    top, left = (height - cfg["crop"][0]) // 2, (width - cfg["crop"][1]) // 2
    x = x[:, :, top:top + cfg["crop"][0], left:left + cfg["crop"][1]]
    mean = torch.tensor(cfg["mean"], dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(cfg["std"], dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def embed(model, images: np.ndarray, cfg: dict, batch_size: int, device: torch.device) -> np.ndarray:
    """Image embeddings (N, projection_dim) float32, unnormalized, computed in fp32."""
    model = model.to(device)
    out = [np.zeros((0, model.config.projection_dim), np.float32)]
    with precision("fp32", device):
        for start in range(0, len(images), batch_size):
            batch = preprocess(torch.from_numpy(images[start:start + batch_size]).to(device), cfg)
            out.append(model(pixel_values=batch).image_embeds.float().cpu().numpy())
    return np.concatenate(out)


def embed_split(images_path, spec: dict, out_path, device: torch.device, batch_size: int = 64) -> None:
    """The CLIP embeddings of one split's images, with their provenance, as one zarr array."""
    images = load_images(images_path)
    require_finite(str(images_path), images)
    model, attrs = load_clip(spec)
    embeddings = embed(model, images, attrs["clip_preprocess"], batch_size, device)
    require_finite(f"the CLIP embeddings of {images_path}", embeddings)
    write_array(out_path, embeddings, {**attrs, "images_sha256": array_sha256(images),
                                       "device": device_name(device)})


def read_embeddings(train_path, query_path) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Train and query embeddings, refused unless both record their provenance, agree on the model,
    weights and preprocessing, and hold finite (n, d) rows."""
    stores = []
    for path in (train_path, query_path):
        embeddings, attrs = read_array(path)
        require_present(REQUIRED_KEYS, (str(path), attrs), "diffattr's CLIP embedding")
        if embeddings.ndim != 2:
            raise ProvenanceError(f"{path}: embeddings of shape {embeddings.shape}; expected (images, dim)")
        require_finite(str(path), embeddings)
        stores.append((embeddings, attrs))
    require_same(CLIP_KEYS, (str(train_path), stores[0][1]), (str(query_path), stores[1][1]))
    return stores[0][0], stores[1][0], stores[0][1], stores[1][1]
