"""Models of the experiments in config.yaml, built from their presets (random initial weights)."""
from __future__ import annotations

from pathlib import Path

import yaml

from diffattr.settings import experiment
from diffattr.models import build_model

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def preset_settings(name: str) -> dict:
    """The preset's settings, validated and with its base chain merged in."""
    return experiment(yaml.safe_load(CONFIG.read_text()), name)


def preset_model(name: str, seed: int = 0):
    """The preset's model in eval mode, set up for vmap as featurize sets it, and the preset's settings."""
    settings = preset_settings(name)
    model = build_model(settings["model"], seed).for_per_sample_gradients()
    return model.train(False), settings
