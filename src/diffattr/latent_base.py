"""The embedded latent experiment's base model, which the workflow trains itself (no weights can be
downloaded): a tiny Stable Diffusion stack built from configs (diffattr.sd_stack), its VAE and then its
UNet trained on one part of the data (digits 0-4, say, each with its prompt), written as a diffusers
Stable Diffusion folder. The LDS models are then LoRA-finetuned from it on the rest of the data: the
shape of miniSD LoRA-finetuned on ArtBench, at a size a CPU trains in minutes.

The `model.base` block: `dataset` (keys over the experiment's dataset block: the base's classes and
n images), `prompts` (one per base class), `seed`, the stack's blocks (`vae`, `text_encoder`, `unet`,
`scheduler`, `max_length`; sd_stack.tiny_components), `vae_train` (sd_stack.train_vae) and
`unet_train` (diffattr.train's keys, `steps` among them: the whole UNet trained, as the base's
pretraining). The tokenizer's words are those of the base's and the experiment's prompts.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import load_source
from .device import precision
from .latent import LatentLoRA, vae_latents


def base_images(dataset: dict, base: dict) -> tuple[np.ndarray, np.ndarray]:
    """The base's training images and labels: its `dataset` keys over the experiment's, every image of
    the classes it names (a partitioned source: of its train split)."""
    images, labels = load_source({**dataset, **base["dataset"]})
    if isinstance(images, dict):  # a partitioned source: {"train": (images, labels), "test": ...}
        images, labels = images["train"]
    return images, labels


def build_base(model_spec: dict, dataset: dict, out_dir, device: torch.device = torch.device("cpu")) -> None:
    """Train the base of `model_spec["base"]` and write it to `out_dir` (written whole or not at all)."""
    from .sd_stack import save_components, tiny_components, train_vae
    from .train import train

    base = model_spec["base"]
    seed = int(base.get("seed", 0))
    images, labels = base_images(dataset, base)
    words = sorted({word for prompt in [*base["prompts"], *model_spec["prompts"]] for word in prompt.split()})
    blocks = {key: base[key] for key in ("vae", "text_encoder", "unet", "scheduler", "max_length") if key in base}
    components = tiny_components({**blocks, "words": words}, seed)
    pixels = torch.from_numpy(images)
    vae_log = train_vae(components.vae, pixels, base["vae_train"], seed, device)
    vae = components.vae.to(device).eval()
    with precision("fp32", device):
        latents = torch.cat([vae_latents(vae, pixels[i:i + 256].to(device)).cpu() for i in range(0, len(pixels), 256)])
        mirrored = torch.cat([vae_latents(vae, pixels[i:i + 256].flip(-1).to(device)).cpu()
                              for i in range(0, len(pixels), 256)])
    model = LatentLoRA(components, base["prompts"], lora=None)
    spec = {"hflip": True, **base["unet_train"]}
    unet_log = train(model, latents, torch.from_numpy(labels), spec, seed, device,
                     flipped=mirrored if spec["hflip"] else None)
    model.to(torch.device("cpu"))
    for what, log in (("VAE", vae_log), ("UNet", unet_log)):
        print(f"base {what}: loss {log['loss'].iloc[:10].mean():.4g} over the first 10 steps, "
              f"{log['loss'].iloc[-10:].mean():.4g} over the last 10", flush=True)
    save_components(components, out_dir)  # written whole or not at all
