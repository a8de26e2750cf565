"""Models of the experiments in config.yaml, built from their presets (random initial weights)."""
from __future__ import annotations

from pathlib import Path

import yaml

from diffattr.config import experiment
from diffattr.models import build_model

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def preset_model(name: str, seed: int = 0):
    """The preset's model in eval mode, with plain attention (the fused one has no vmap rule)."""
    from diffusers.models.attention_processor import AttnProcessor

    settings = experiment(yaml.safe_load(CONFIG.read_text()), name)
    model = build_model(settings["model"], seed)
    for module in model.unet.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    return model.train(False), settings
