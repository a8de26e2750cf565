"""Models of the experiments in config.yaml, built from their presets (random initial weights)."""
from __future__ import annotations

from pathlib import Path

import yaml

from diffattr.settings import deep_merge, experiment
from diffattr.models import build_model

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def preset_settings(name: str, overrides: dict | None = None) -> dict:
    """The preset's settings, validated and with its base chain merged in; `overrides` ({section:
    {key: value}}) merged into the preset's own block first, so they are validated with it."""
    config = yaml.safe_load(CONFIG.read_text())
    if overrides and name in config.get("experiments", {}):
        config["experiments"][name] = deep_merge(config["experiments"][name], overrides)
    return experiment(config, name)


def parse_overrides(assignments: list[str]) -> dict:
    """`section.key=value` strings (a YAML value: `train.compile=true`) as nested overrides."""
    overrides: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key or "" in key.split("."):
            raise SystemExit(f"--set {assignment}: expected SECTION.KEY=VALUE (e.g. train.dtype=bf16)")
        *sections, last = key.split(".")
        node = overrides
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = yaml.safe_load(value)
    return overrides


def preset_model(name: str, seed: int = 0):
    """The preset's model in eval mode, set up for vmap as featurize sets it, and the preset's settings."""
    settings = preset_settings(name)
    model = build_model(settings["model"], seed).for_per_sample_gradients()
    return model.train(False), settings
