"""Experiment settings: presets in config.yaml, resolved through `base:` inheritance."""
from __future__ import annotations

import copy
import itertools
import re

FUNCTIONS = ("simple", "elbo", "square", "avg", "l1", "l2", "linf")
_INTERP = re.compile(r"^interp(\d*\.?\d+)$")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def experiment(config: dict, name: str) -> dict:
    """The settings of experiment `name`, with its `base:` chain merged in."""
    presets = config.get("experiments", {})
    if name not in presets:
        raise KeyError(
            f"experiment '{name}' is not defined under 'experiments' in the config; "
            f"defined: {', '.join(sorted(presets))}"
        )
    chain, seen = [], set()
    while name is not None:
        if name in seen:
            raise ValueError(f"experiments.{name}.base: inheritance cycle through {sorted(seen)}")
        if name not in presets:
            raise KeyError(f"experiments.{chain[-1]}.base names '{name}', which is not defined")
        seen.add(name)
        chain.append(name)
        name = presets[name].get("base")
    settings: dict = {}
    for preset in reversed(chain):
        settings = deep_merge(settings, {k: v for k, v in presets[preset].items() if k != "base"})
    check(settings, chain[0])
    return settings


def check(settings: dict, name: str) -> None:
    """Catch the settings that would only fail deep inside a job, before any job starts."""
    where = f"experiments.{name}"
    try:
        subsets, featurize = settings["subsets"], settings["featurize"]
        if not 0 < float(subsets["alpha"]) < 1:
            raise ValueError(f"subsets.alpha={subsets['alpha']}: expected a value in (0, 1)")
        if int(subsets["m"]) < 2:
            raise ValueError(f"subsets.m={subsets['m']}: the LDS needs at least 2 subsets")
        for function, k, _ in feature_sets(featurize):
            parse_function(function)
            select_timesteps(k, featurize["scheme"])
        select_timesteps(int(settings["ground_truth"]["timesteps"]), "uniform")
    except KeyError as missing:
        raise KeyError(f"{where}: missing setting {missing}") from None
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def feature_sets(featurize: dict) -> list[tuple[str, int, int]]:
    """(function, K, k) of every feature store, in config order: the grid functions x timesteps x
    proj_dims, then the grid of each entry of `extra_grids` (the paper's function table at k = 4096,
    say), each combination once."""
    sets: dict[tuple[str, int, int], None] = {}
    for grid in [featurize, *featurize.get("extra_grids", [])]:
        for combination in itertools.product(grid["functions"], grid["timesteps"], grid["proj_dims"]):
            function, k, dim = combination
            sets[(str(function), int(k), int(dim))] = None
    return list(sets)


def parse_function(name: str) -> tuple[str, float | None]:
    """'square' -> ('square', None); 'interp0.25' -> ('interp', 0.25)."""
    if name in FUNCTIONS:
        return name, None
    match = _INTERP.match(name)
    if match and 0.0 <= float(match.group(1)) <= 1.0:
        return "interp", float(match.group(1))
    raise ValueError(
        f"unknown model-output function '{name}': expected one of {', '.join(FUNCTIONS)} "
        "or interp<eta> with eta in [0, 1] (e.g. interp0.25)"
    )


def select_timesteps(k: int, scheme: str, num_train_timesteps: int = 1000) -> list[int]:
    """The protocol's timestep selections: uniform range(0, T, T // K) or cumulative range(K)."""
    if not 1 <= k <= num_train_timesteps:
        raise ValueError(f"number of timesteps K={k} must be in [1, {num_train_timesteps}]")
    if scheme == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // k))[:k]
    if scheme == "cumulative":
        return list(range(k))
    raise ValueError(f"timestep scheme '{scheme}': expected 'uniform' or 'cumulative'")
