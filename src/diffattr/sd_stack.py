"""A Stable Diffusion directory: read one, build a tiny one, save it, and train its VAE.

The latent Stable-Diffusion-with-LoRA kind takes its base model (UNet, VAE, CLIP text encoder and
tokenizer, DDPM scheduler) from a local diffusers Stable Diffusion directory, the layout
`StableDiffusionPipeline.save_pretrained` writes (`model.pretrained`, e.g. lambdalabs/miniSD-diffusers).
An embedded experiment that must run on a small CPU without downloads builds a tiny base instead
(`tiny_components`), trains its VAE on the training images (`train_vae`) and saves it in that same
layout (`save_components`), so that everything downstream reads one kind of directory.

Only the standard library is imported with this module: Snakemake imports planning code in every
process, and the config check calls `check_pretrained` before any job runs. torch, diffusers and
transformers are imported inside the functions that need them.
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

# Each part of a Stable Diffusion directory: its subfolder and the files that must be there (one of each
# tuple). Weights: safetensors or, for directories published before safetensors (.bin), PyTorch's format.
PARTS = {
    "unet": (("config.json",), (".safetensors", ".bin")),
    "vae": (("config.json",), (".safetensors", ".bin")),
    "text_encoder": (("config.json",), (".safetensors", ".bin")),
    "tokenizer": (("vocab.json", "tokenizer.json"),),
    "scheduler": (("scheduler_config.json",),),
}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# SD 1.x's training schedule (its scheduler_config.json): scaled-linear betas 0.00085..0.012, T = 1000,
# epsilon prediction, no clipping of x0, timesteps offset by 1 at inference. StableDiffusionPipeline
# rewrites (with a deprecation warning) a scheduler with clip_sample true or steps_offset != 1.
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                "steps_offset": 1}

# The tiny stack's defaults, for 16x16 one-channel images (see `tiny_components`).
TINY = {
    "vae": {"in_channels": 1, "out_channels": 1, "sample_size": 16, "block_out_channels": [16, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "projection_dim": 32},
    "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
             "attention_head_dim": 8, "norm_num_groups": 8},
    "scheduler": SD_SCHEDULER,
    "words": ["a", "photo", "of", "the", "digit", "zero", "one", "two", "three", "four", "five", "six",
              "seven", "eight", "nine"],
    "max_length": 16,
}


@dataclass
class Components:
    """The parts of a Stable Diffusion model."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler


def check_pretrained(path) -> str | None:
    """The fault line of `model.pretrained` = `path` (None when it looks like a Stable Diffusion directory).

    Only looks at files (no import of torch), so the config check can call it before any job runs.
    """
    hint = (f"expected a diffusers Stable Diffusion directory with unet/, vae/, text_encoder/, tokenizer/, "
            f"scheduler/ (e.g. `huggingface-cli download lambdalabs/miniSD-diffusers --local-dir {path}`)")
    if path is None or not os.path.isdir(path):
        return f"model.pretrained: got {str(path)!r}, which is not a directory; {hint}"
    for part, needs in PARTS.items():
        folder = os.path.join(path, part)
        files = os.listdir(folder) if os.path.isdir(folder) else []
        for alternatives in needs:
            if not any(name == want or (want.startswith(".") and name.endswith(want))
                       for name in files for want in alternatives):
                what = (f"{part}/" if not files else
                        f"{part}/" + " or ".join(f"*{want}" if want.startswith(".") else want for want in alternatives))
                return f"model.pretrained: got {str(path)!r}, which has no {what}; {hint}"
    return None


def load_components(path) -> Components:
    """The parts of the Stable Diffusion directory `path`, each by its class's `from_pretrained`
    (safetensors weights when present), in eval mode with requires_grad False (a frozen base)."""
    fault = check_pretrained(path)
    if fault:
        raise FileNotFoundError(fault)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return _frozen(Components(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler")))


def _frozen(components: Components) -> Components:
    for module in (components.unet, components.vae, components.text_encoder):
        module.train(False)
        module.requires_grad_(False)
    return components


def local_tokenizer(directory, words, max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer for prompts made of `words`, written as vocab.json and merges.txt into `directory`.

    The vocabulary is CLIP's special tokens, every lowercase letter alone and word-final (`c</w>`),
    and each word's prefixes ending in the whole word (`d`, `di`, ..., `digit</w>`), with the merges that
    build them letter by letter. Whole-word tokens keep prompts short (`max_length` counts tokens, as
    SD's 77) and give each word one embedding, as CLIP's tokenizer does for common words. The single
    letters make the tokenizer total: any lowercase word tokenizes without unknown tokens and decodes
    back to itself. BPE applies the lowest-ranked merge first, so one word's merge can take a pair
    inside another word (`e v` of "even" inside "seven") and leave it in a few pieces; longer words'
    merges are ranked first, which keeps a word whole when the words it contains are shorter (the
    default words are each one token).
    `words`: strings of lowercase ascii words separated by spaces (a list of words or of prompts).
    """
    from transformers import CLIPTokenizer

    vocabulary = sorted({word for entry in words for word in entry.split()})
    bad = [word for word in vocabulary if not re.fullmatch(r"[a-z]+", word)]
    if bad:
        raise ValueError(f"words: got {bad}; expected lowercase ascii letters and spaces only")
    tokens = [BOS, EOS, *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    merges = []
    for word in sorted(vocabulary, key=lambda word: (-len(word), word)):
        pieces, built = [*word[:-1], word[-1] + "</w>"], word[0]
        for piece in pieces[1:]:
            merges.append(f"{built} {piece}")
            built += piece
            tokens.append(built)
    tokens, merges = list(dict.fromkeys(tokens)), list(dict.fromkeys(merges))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    return CLIPTokenizer.from_pretrained(directory, model_max_length=int(max_length))


def tiny_components(spec: dict, seed: int) -> Components:
    """A tiny Stable Diffusion stack built from configs, its weights random from `seed`; frozen as a
    loaded one (eval mode, requires_grad False).

    `spec` (the config's `model.base`) has blocks `vae` (AutoencoderKL arguments), `text_encoder`
    (CLIPTextConfig), `unet` (UNet2DConditionModel), `scheduler` (DDPMScheduler), `words` and
    `max_length` (the tokenizer, see `local_tokenizer`); each block's keys replace those of its
    default (`TINY`), for 16x16 one-channel images:
    - vae: block_out_channels [16, 32] (16x16 images -> 4x8x8 latents), layers_per_block 1,
      norm_num_groups 8;
    - text_encoder: hidden 32, intermediate 64, 2 layers, 2 heads; vocab_size and the bos/eos/pad ids
      are the tokenizer's, max_position_embeddings is max_length unless given larger;
    - unet: sample_size 8, 4 channels in and out, block_out_channels [32, 64], CrossAttnDownBlock2D +
      DownBlock2D / UpBlock2D + CrossAttnUpBlock2D, layers_per_block 1, attention_head_dim 8,
      norm_num_groups 8; cross_attention_dim is the text encoder's hidden size;
    - scheduler: SD 1.x's (SD_SCHEDULER); words: "a photo of the digit zero" .. "nine"; max_length 16.
    The defaults have 981,017 parameters (VAE 167,381, text encoder 20,672, UNet 792,964). Forward
    time for a batch of 64 on this project's 2-core CPU (torch 2.13, one thread / two threads): VAE
    encode 25 / 10 ms, VAE decode 34 / 20 ms, text encoder (16 tokens) 3 / 2 ms, UNet 107 / 81 ms.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = {name: {**TINY[name], **(spec.get(name) or {})} for name in ("vae", "text_encoder", "unet", "scheduler")}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = local_tokenizer(folder, spec.get("words", TINY["words"]), spec.get("max_length", TINY["max_length"]))
    text = blocks["text_encoder"]
    derived = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    for key, value in derived.items():
        if key in (spec.get("text_encoder") or {}) and text[key] != value:
            raise ValueError(f"model.base.text_encoder.{key}: got {text[key]!r}; expected {value} (the tokenizer's), "
                             "or no value")
    text.update(derived)
    text.setdefault("max_position_embeddings", tokenizer.model_max_length)
    if text["max_position_embeddings"] < tokenizer.model_max_length:
        raise ValueError(f"model.base.text_encoder.max_position_embeddings: got {text['max_position_embeddings']}; "
                         f"expected at least model.base.max_length ({tokenizer.model_max_length})")
    unet = blocks["unet"]
    unet.setdefault("cross_attention_dim", text["hidden_size"])
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise ValueError(f"model.base.unet.cross_attention_dim: got {unet['cross_attention_dim']}; expected "
                         f"{text['hidden_size']} (model.base.text_encoder.hidden_size), or no value")
    torch.manual_seed(seed)
    return _frozen(Components(
        vae=AutoencoderKL(**blocks["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        unet=UNet2DConditionModel(**unet),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**blocks["scheduler"])))


def save_components(components: Components, directory) -> None:
    """Write `components` as a diffusers Stable Diffusion directory (safetensors weights, model_index.json
    without safety checker), which `StableDiffusionPipeline.from_pretrained(directory, safety_checker=None)`
    and `load_components` read. Written under a temporary sibling and renamed when complete.

    Each part is saved by its own `save_pretrained` rather than through a StableDiffusionPipeline,
    whose constructor rewrites some scheduler configs (see SD_SCHEDULER): the directory holds exactly
    the parts given.
    """
    import diffusers

    from .storage import atomic_output

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", type(components.scheduler).__name__],
             "text_encoder": ["transformers", type(components.text_encoder).__name__],
             "tokenizer": ["transformers", type(components.tokenizer).__name__],
             "unet": ["diffusers", type(components.unet).__name__], "vae": ["diffusers", type(components.vae).__name__]}
    with atomic_output(directory) as staging:
        for part in PARTS:
            module = getattr(components, part)
            if part in ("unet", "vae", "text_encoder"):
                module.save_pretrained(staging / part, safe_serialization=True)
            else:
                module.save_pretrained(staging / part)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def train_vae(vae: AutoencoderKL, images: torch.Tensor, spec: dict, seed: int, device=None) -> pd.DataFrame:
    """Train `vae` in place on `images` (N, C, H, W) float32 in [-1, 1]; deterministic given `seed` on
    CPU. Returns the loss log (one row per step); the VAE ends frozen (eval, requires_grad False).

    `spec`: steps, batch_size, lr, weight_decay (AdamW), kl_weight (default 1e-6), grad_clip (default
    1.0). Batches are drawn epoch by epoch from a permutation of a CPU generator seeded with `seed`,
    which also draws the latents z ~ q(z|x) (`latent_dist.sample`). The loss is the mean squared error
    of the reconstruction per pixel plus kl_weight times the KL divergence of q(z|x) from N(0, I),
    summed over a latent's elements and averaged over the batch (as LDM's KL-regularized autoencoders).
    The default weight is LDM's 1e-6: the KL only keeps the latents from drifting to large scales,
    and it is already stronger here than in LDM, whose reconstruction loss is summed over the pixels.

    After training the config's scaling_factor is set to 1 / std of the latents' modes over the
    training images, the rule by which LDM and SD chose theirs (SD 1.x: 0.18215), so that diffusion
    runs on latents of unit variance.
    """
    import pandas as pd
    import torch

    device = torch.device(device or "cpu")
    steps, batch_size = int(spec["steps"]), int(spec["batch_size"])
    kl_weight, clip = float(spec.get("kl_weight", 1e-6)), float(spec.get("grad_clip", 1.0))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images = images.to(device)
    vae.to(device).train(True)
    vae.requires_grad_(True)
    params = list(vae.parameters())
    optimizer = torch.optim.AdamW(params, lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))
    order, cursor, log = torch.randperm(len(images), generator=gen), 0, []
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        x = images[order[cursor:cursor + batch_size].to(device)]
        cursor += batch_size
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=gen)).sample
        mse = (reconstruction - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        log.append((step, loss.item(), mse.item(), kl.item(), float(grad_norm)))
    vae.train(False)
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mode()
                             for i in range(0, len(images), batch_size)])
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    return pd.DataFrame(log, columns=["step", "loss", "mse", "kl", "grad_norm"])
