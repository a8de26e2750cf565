"""Experiment settings: presets in config.yaml, resolved through `base:` inheritance and validated.

Every preset, once merged with its `base:` chain, is checked against the JSON schema
`workflow/schemas/config.schema.yaml` (`$defs/experiment`) and by `check` for the rules a schema
cannot state. Every fault becomes one line `experiments.<name>.<key>: got <value>; expected <what>`.
"""
from __future__ import annotations

import copy
import difflib
import functools
import itertools
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

FUNCTIONS = ("simple", "elbo", "square", "avg", "l1", "l2", "linf")
FUNCTION_EXPECTED = (f"one of {', '.join(FUNCTIONS)} or interp<eta> with eta in [0, 1] "
                     "(e.g. interp0.25)")
_INTERP = re.compile(r"^interp(\d*\.?\d+)$")
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# Multiple of which trak's CudaProjector (fast_jl) needs its projection dimension to be.
CUDA_PROJ_MULTIPLE = 512
# The images each source gives when dataset.image_size is not set, as (side, channels).
SOURCE_IMAGES = {"sklearn_digits": (8, 1), "cifar10": (32, 3), "celeba": (64, 3), "image_folder": (None, 3)}


class ConfigError(ValueError):
    """A config value that is not allowed; the message has one line per fault."""


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def experiment(config: dict, name: str) -> dict:
    """The settings of experiment `name`, with its `base:` chain merged in, validated."""
    settings = _merged(config.get("experiments") or {}, name)
    validate_experiment(settings, name, config.get("device", "auto"))
    return settings


def validate_config(config: dict) -> dict[str, dict]:
    """Check the whole config before any job runs: the top level with `snakemake.utils.validate`
    (which also fills in the top level's defaults, such as device: auto), then `resolve_all`."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA))
    except WorkflowError as error:
        cause = error.__context__  # validate raises while handling jsonschema's error
        if not isinstance(cause, jsonschema.ValidationError):
            raise
        raise ConfigError("\n".join(schema_error_lines(cause))) from None
    return resolve_all(config)


def resolve_all(config: dict) -> dict[str, dict]:
    """Every preset resolved and validated (bases before the presets that inherit from them, so that
    a fault is reported where it is written), and the selected `experiment` known to exist."""
    presets = config.get("experiments") or {}
    chains = {name: _chain(presets, name) for name in presets}
    resolved = {name: experiment(config, name) for name in sorted(presets, key=lambda n: len(chains[n]))}
    if config.get("experiment") not in presets:
        raise ConfigError(undefined_preset("experiment", config.get("experiment"), presets))
    return {name: resolved[name] for name in presets}


def undefined_preset(where: str, value, presets) -> str:
    return (f"{where}: got {_show(value)}; expected one of the presets under experiments: "
            f"{', '.join(presets)}")


def _chain(presets: dict, name: str) -> list[str]:
    """[name, its base, the base's base, ...]."""
    if name not in presets:
        raise ConfigError(undefined_preset("experiment", name, presets))
    chain = [name]
    while True:
        if not isinstance(presets[chain[-1]], dict):
            raise ConfigError(f"experiments.{chain[-1]}: got {_show(presets[chain[-1]])}; expected a mapping")
        if (base := presets[chain[-1]].get("base")) is None:
            break
        if base not in presets:
            raise ConfigError(undefined_preset(f"experiments.{chain[-1]}.base", base, presets))
        if base in chain:
            cycle = " -> ".join([*chain[chain.index(base):], base])
            raise ConfigError(f"experiments.{chain[-1]}.base: got {_show(base)}; expected a chain of "
                              f"bases that ends, not the cycle {cycle}")
        chain.append(base)
    return chain


def _merged(presets: dict, name: str) -> dict:
    settings: dict = {}
    for preset in reversed(_chain(presets, name)):
        own = {k: v for k, v in presets[preset].items() if k != "base"}
        settings = deep_merge(settings, coerce(own, schema()["$defs"]["experiment"]))
    return settings


def coerce(value, schema: dict):
    """`value` with the text the schema does not allow read as YAML: `--config` hands nested values
    over as strings ('6', '0.5', '[64]'), and YAML reads 1e-4 (no decimal point) as text."""
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        default = extra if isinstance(extra, dict) else {}
        return {k: coerce(v, schema.get("properties", {}).get(k, default)) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce(v, schema.get("items", {})) for v in value]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if not isinstance(value, str) or not types or "string" in types:
        return value
    try:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and "number" in types:
            parsed = float(parsed)
    except (yaml.YAMLError, ValueError):
        return value
    kinds = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None),
             "array": list, "object": dict}
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return value
    return coerce(parsed, schema) if any(isinstance(parsed, kinds[t]) for t in types) else value


# ---------------------------------------------------------------- the schema

@functools.lru_cache(maxsize=1)
def schema() -> dict:
    if not SCHEMA.is_file():
        raise FileNotFoundError(f"{SCHEMA}: the config schema is missing; diffattr reads it from the "
                                "repository it was installed from, so install with `pip install -e .` there")
    return yaml.safe_load(SCHEMA.read_text())


@functools.lru_cache(maxsize=1)
def _experiment_validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": "#/$defs/experiment", "$defs": schema()["$defs"]})


def validate_experiment(settings: dict, name: str, device: str = "auto") -> None:
    """Raise ConfigError listing every fault of a resolved preset, one line each."""
    where = f"experiments.{name}"
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: got {_show(settings)}; expected a mapping of settings")
    errors = sorted(_experiment_validator().iter_errors(settings), key=lambda e: list(map(str, e.path)))
    lines = [line for error in errors for line in schema_error_lines(error, where)]
    if lines:
        raise ConfigError("\n".join(dict.fromkeys(lines)))
    check(settings, name, device)


def schema_error_lines(error, prefix: str = "") -> list[str]:
    """One `key: got value; expected what` line per fault of a jsonschema ValidationError."""
    path = _key(prefix, error.absolute_path)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return [f"{_key(path, [k])}: got no value; expected {expected(error.schema['properties'].get(k, {}))}"
                for k in missing]
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        lines = []
        for key in (k for k in error.instance if k not in known):
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            lines.append(f"{_key(path, [key])}: got {_show(error.instance[key])}; expected no such "
                         f"key{hint}: {path.rsplit('.', 1)[-1] or 'the top level'} takes {', '.join(known)}")
        return lines
    return [f"{path}: got {_show(error.instance)}; expected {expected(error.schema)}"]


def expected(schema: dict) -> str:
    """What a schema allows, in words: 'an integer >= 1', 'a number in (0, 1)', 'one of a, b'."""
    if "enum" in schema:
        return "one of " + ", ".join(_show(v) for v in schema["enum"])
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    words = []
    for kind in types:
        if kind in ("integer", "number"):
            words.append(f"{'an integer' if kind == 'integer' else 'a number'}{_bounds(schema)}")
        elif kind == "array":
            size = schema.get("minItems"), schema.get("maxItems")
            text = (f"a list of {size[0]}" if size[0] is not None and size[0] == size[1]
                    else "a non-empty list" if size[0] == 1 else "a list")
            if "items" in schema:
                text += f" of ({expected(schema['items'])})"
            words.append(text + (" without repeats" if schema.get("uniqueItems") else ""))
        elif kind == "string":
            words.append("a string" + (f" matching {schema['pattern']}" if "pattern" in schema else ""))
        else:
            words.append({"boolean": "true or false", "object": "a mapping", "null": "null"}[kind])
    return " or ".join(words) or "a valid value"


def _bounds(schema: dict) -> str:
    low = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    high = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low[1] is not None:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high[1] is not None:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _key(prefix: str, path) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- what a schema cannot say

def cuda_projector_possible(device: str) -> bool:
    """Whether features may be projected by trak's CudaProjector: fast_jl installed, device not cpu."""
    return device != "cpu" and importlib.util.find_spec("fast_jl") is not None


def check(settings: dict, name: str, device: str = "auto") -> None:
    """The rules between keys that the schema cannot state; one line per fault."""
    where = f"experiments.{name}"
    faults = []
    model, featurize = settings["model"], settings["featurize"]
    T = int((model.get("scheduler") or {}).get("num_train_timesteps", 1000))
    within_T = f"at most T = {T} (model.scheduler.num_train_timesteps)"
    grids = {"featurize": featurize, **{f"featurize.extra_grids[{j}]": grid
                                        for j, grid in enumerate(featurize.get("extra_grids", []))}}
    for key, grid in grids.items():
        for i, function in enumerate(grid["functions"]):
            try:
                parse_function(function)
            except ValueError:
                faults.append(f"{key}.functions[{i}]: got {_show(function)}; expected {FUNCTION_EXPECTED}")
        for i, k in enumerate(grid["timesteps"]):
            if k > T:
                faults.append(f"{key}.timesteps[{i}]: got K = {k}; expected K {within_T}")
    faults += _check_checkpoints(settings["train"], grids)
    for key in ("ground_truth.timesteps", "generate.steps"):
        section, leaf = key.split(".")
        if settings[section][leaf] > T:
            faults.append(f"{key}: got {settings[section][leaf]}; expected {within_T}")
    if cuda_projector_possible(device):
        for key, i, k in ((key, i, k) for key, grid in grids.items() for i, k in enumerate(grid["proj_dims"])):
            if k % CUDA_PROJ_MULTIPLE:
                faults.append(
                    f"{key}.proj_dims[{i}]: got {k}; expected a multiple of {CUDA_PROJ_MULTIPLE}, "
                    f"which trak's CudaProjector (fast_jl, used on device {device!r}) needs; "
                    "or set device: cpu (BasicProjector takes any positive integer)")
    low, high = settings["score"]["lambda_exponents"]
    if low > high:
        faults.append(f"score.lambda_exponents: got {_show([low, high])}; expected [low, high] with low <= high")
    if "heldout" in settings["lds"]["lambda_rules"] and settings["subsets"]["m"] < 4:
        faults.append(f"subsets.m: got {settings['subsets']['m']}; expected at least 4 for the heldout "
                      "lambda rule (it selects on half of the subsets and reports on the other half)")
    faults += _check_unet(settings["dataset"], model["unet"])
    faults += _check_retrain(settings, within_T, T)
    faults += _check_clip(settings["score"])
    faults += _check_ablations(settings, T)
    if faults:
        raise ConfigError("\n".join(f"{where}.{fault}" for fault in faults))


def _check_retrain(settings: dict, within_T: str, T: int) -> list[str]:
    """The retraining pool: outputs within T, a ridge grid in order, subsets apart from the LDS ones."""
    if "retrain" not in settings:
        return []
    spec, faults = retrain_settings(settings), []
    if spec["timesteps"] > T:
        faults.append(f"retrain.timesteps: got {spec['timesteps']}; expected {within_T}")
    low, high = spec["datamodel_alpha_exponents"]
    if low > high:
        faults.append(f"retrain.datamodel_alpha_exponents: got {_show([low, high])}; expected [low, high] "
                      "with low <= high")
    lds = settings["subsets"]
    shared = sorted({lds["seed"] + 2 * j for j in range(lds["m"])}
                    & {spec["seed"] + 2 * j for j in range(spec["pool"])})
    if shared:
        faults.append(f"retrain.seed: got {spec['seed']}; expected a seed whose pool subsets (seeds "
                      f"{spec['seed']} + 2j, j < {spec['pool']}) share none with the LDS subsets' (subsets.seed "
                      f"{lds['seed']} + 2j, j < {lds['m']}), e.g. {lds['seed'] + 1}; both draw seed {shared[0]}")
    return faults


def retrain_settings(settings: dict) -> dict:
    """The preset's `retrain` section with the schema's defaults filled in (timesteps and noise seeds
    of the outputs default to the ground truth's), plus `pool`: how many models to train, the largest
    ensemble or model count (0 without retraining-based methods)."""
    properties = schema()["$defs"]["experiment"]["properties"]["retrain"]["properties"]
    spec = {key: copy.deepcopy(p["default"]) for key, p in properties.items() if "default" in p}
    spec.update(copy.deepcopy(settings.get("retrain") or {}))
    for key in ("timesteps", "noise_seeds"):
        spec.setdefault(key, copy.deepcopy(settings["ground_truth"][key]))
    spec["pool"] = max([0, *spec["ensembles"], *spec["n_models"]])
    return spec


def _check_checkpoints(train: dict, grids: dict) -> list[str]:
    """Kept steps ascending within the full model's training; a grid's checkpoints among them."""
    faults = []
    kept, full = train.get("keep_checkpoints", []), train["full_steps"]
    if kept != sorted(kept):
        faults.append(f"train.keep_checkpoints: got {_show(kept)}; expected steps in ascending order")
    for i, step in enumerate(kept):
        if step > full:
            faults.append(f"train.keep_checkpoints[{i}]: got {step}; expected a step at most "
                          f"train.full_steps = {full}")
    earlier = [step for step in kept if step < full]
    for key, grid in grids.items():
        for i, step in enumerate(grid.get("checkpoints", [])):
            if step not in earlier:
                faults.append(f"{key}.checkpoints[{i}]: got {step}; expected one of train.keep_checkpoints "
                              f"below train.full_steps = {full} ({_show(earlier)}); the final weights' "
                              "features are the grid's own")
    return faults


def _check_unet(dataset: dict, unet: dict) -> list[str]:
    """The UNet fits the images: side, channels, one block type per level, GroupNorm groups."""
    faults = []
    side, channels = SOURCE_IMAGES[dataset["source"]]
    side = dataset.get("image_size") or side
    if side is not None and unet["sample_size"] != side:
        faults.append(f"model.unet.sample_size: got {unet['sample_size']}; expected {side}, the side of "
                      f"the dataset's images (dataset.image_size)")
    for key in ("in_channels", "out_channels"):
        if key in unet and unet[key] != channels:
            faults.append(f"model.unet.{key}: got {unet[key]}; expected {channels}, the channels of "
                          f"{dataset['source']} images")
    levels = unet.get("block_out_channels")
    if levels is not None:
        for key in ("down_block_types", "up_block_types"):
            if key in unet and len(unet[key]) != len(levels):
                faults.append(f"model.unet.{key}: got {len(unet[key])} blocks; expected {len(levels)}, "
                              "one per entry of model.unet.block_out_channels")
        groups = unet.get("norm_num_groups", 32)
        if any(c % groups for c in levels):
            faults.append(f"model.unet.norm_num_groups: got {groups}; expected a divisor of every entry "
                          f"of model.unet.block_out_channels {_show(levels)}")
    return faults


def _check_clip(score: dict) -> list[str]:
    """The CLIP baselines have an image encoder: a model directory that exists (relative paths are
    read from the working directory, as the workflow's jobs read them), or an architecture to
    initialize randomly, not both."""
    clip_baselines = [name for name in score_methods(score, "baselines") if name.startswith("clip_")]
    clip = score.get("clip")
    if not clip_baselines:
        return []
    if clip is None:
        return [f"score.clip: got no value; expected a mapping {{pretrained, architecture}} (score.baselines "
                f"lists {', '.join(clip_baselines)})"]
    pretrained, architecture = clip.get("pretrained"), clip.get("architecture")
    if pretrained is None and architecture is None:
        return ["score.clip.architecture: got null; expected the CLIPVisionConfig of the randomly "
                "initialized model ({} for ViT-B/32's), since score.clip.pretrained is null"]
    if pretrained is not None and architecture is not None:
        return [f"score.clip.architecture: got {_show(architecture)}; expected null, since "
                f"score.clip.pretrained names a model directory (its config.json is the architecture)"]
    if pretrained is not None and not (Path(pretrained) / "config.json").is_file():
        return [f"score.clip.pretrained: got {_show(pretrained)}, which is not a model directory with a "
                f"config.json (working directory {Path.cwd()}); expected a local Hugging Face CLIP model "
                "directory (save_pretrained layout), or null for randomly initialized weights"]
    heads, width = (architecture or {}).get("num_attention_heads", 12), (architecture or {}).get("hidden_size", 768)
    if width % heads:
        return [f"score.clip.architecture.num_attention_heads: got {heads}; expected a divisor of "
                f"score.clip.architecture.hidden_size {width}"]
    return []


SCHEMES = ("uniform", "cumulative")
# A feature-set name: `{function}_K{K}_k{k}`, then each tag only where it differs from the default, in
# this order: `_cumulative` (timestep scheme; default uniform), `_e{N}` (noises per timestep; default 1),
# `_step{S}` (the features of the full model's kept training checkpoint at step S; default the final
# weights).
_FEATURE_SET = re.compile(r"(?P<function>[a-z0-9.]+)_K(?P<K>\d+)_k(?P<k>\d+)(?P<cumulative>_cumulative)?"
                          r"(?:_e(?P<noises>\d+))?(?:_step(?P<step>\d+))?")
# The same names as Snakemake wildcard constraints (which must not hold named groups of their own):
# FEATURE_SET for the final weights' sets, FEATURE_SET_ANY for those of kept checkpoints too.
FEATURE_SET_ANY = re.sub(r"\(\?P<\w+>", "(?:", _FEATURE_SET.pattern)
FEATURE_SET = FEATURE_SET_ANY.removesuffix(r"(?:_step(?:\d+))?")


@dataclass(frozen=True)
class FeatureSet:
    """One feature store's settings: model-output function, K timesteps, projection dimension k,
    timestep scheme, noises per timestep and training step of the weights (None: the final ones).
    `name` and `parse` are each other's inverse."""
    function: str
    K: int
    k: int
    scheme: str = "uniform"
    noises: int = 1
    step: int | None = None

    def __post_init__(self):
        parse_function(self.function)
        if self.scheme not in SCHEMES:
            raise ValueError(f"timestep scheme {self.scheme!r}: expected one of {', '.join(SCHEMES)}")
        for key in ("K", "k", "noises"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"feature set {key}: got {getattr(self, key)!r}; expected an integer >= 1")
        if self.step is not None and (not isinstance(self.step, int) or self.step < 0):
            raise ValueError(f"feature set step: got {self.step!r}; expected an integer >= 0 or None")

    @property
    def name(self) -> str:
        return (f"{self.function}_K{self.K}_k{self.k}" + ("_cumulative" if self.scheme == "cumulative" else "")
                + (f"_e{self.noises}" if self.noises != 1 else "") + ("" if self.step is None else f"_step{self.step}"))

    @property
    def tags(self) -> str:
        """The name's tags without the leading '_' ('' for the defaults, 'cumulative_e2', ...)."""
        return self.name[len(f"{self.function}_K{self.K}_k{self.k}") + 1:]

    @classmethod
    def parse(cls, name: str) -> "FeatureSet":
        """The feature set named `name`; refused unless `name` is exactly its canonical name."""
        match = _FEATURE_SET.fullmatch(name)
        try:
            fset = match and cls(match["function"], int(match["K"]), int(match["k"]),
                                 "cumulative" if match["cumulative"] else "uniform",
                                 int(match["noises"] or 1), None if match["step"] is None else int(match["step"]))
        except ValueError:
            fset = None
        if not fset or fset.name != name:
            raise ValueError(f"feature set name {name!r}: expected {{function}}_K{{K}}_k{{k}}, then "
                             "_cumulative for cumulative timesteps, _e{N} for N > 1 noises per timestep and "
                             "_step{S} for a kept training checkpoint's weights, in this order "
                             "(e.g. square_K10_k512_cumulative_e2 or square_K10_k512_step100)")
        return fset


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def feature_sets(featurize: dict, ablations=()) -> list[FeatureSet]:
    """Every feature store of an experiment, each once, in config order: the featurize block's grid
    and that of each entry of its `extra_grids` (the paper's function table at k = 4096, say), each
    functions x timesteps x proj_dims x scheme x noises (an extra grid's scheme and noises default to
    the block's), then the sets that the `ablations` sweep over and the grids lack."""
    sets: dict[FeatureSet, None] = {}
    for grid in [featurize, *featurize.get("extra_grids", [])]:
        schemes = _as_list(grid.get("scheme", featurize.get("scheme", "uniform")))
        noises = _as_list(grid.get("noises", featurize.get("noises", 1)))
        for function, K, k, scheme, n in itertools.product(grid["functions"], grid["timesteps"],
                                                           grid["proj_dims"], schemes, noises):
            sets[FeatureSet(str(function), int(K), int(k), str(scheme), int(n))] = None
    for ablation in ablations:
        sets.update(dict.fromkeys(point.features for point in ablation_points(ablation)))
    return list(sets)


def checkpoint_feature_sets(featurize: dict) -> list[tuple[str, int, int, int]]:
    """(function, K, k, step) of every feature store of a kept training checkpoint: each grid's
    (function, K, k) at each step of its `checkpoints`, each combination once, in config order."""
    sets: dict[tuple[str, int, int, int], None] = {}
    for grid in [featurize, *featurize.get("extra_grids", [])]:
        for function, k, dim, step in itertools.product(grid["functions"], grid["timesteps"],
                                                        grid["proj_dims"], grid.get("checkpoints", [])):
            sets[(str(function), int(k), int(dim), int(step))] = None
    return list(sets)


def trajectories(featurize: dict) -> dict[tuple[str, int, int], list[int]]:
    """{(function, K, k): its checkpoint steps, ascending}: the (function, K, k) of every grid that
    lists `checkpoints`, with the union of the steps listed for it (TracInCP sums over these and
    the final weights)."""
    out: dict[tuple[str, int, int], set[int]] = {}
    for function, k, dim, step in checkpoint_feature_sets(featurize):
        out.setdefault((function, k, dim), set()).add(step)
    return {key: sorted(steps) for key, steps in out.items()}


def feature_set_name(function: str, K: int, k: int, step: int | None = None) -> str:
    """'square', 10, 512, 100 -> 'square_K10_k512_step100' (default scheme and noises; no tag for the
    final weights)."""
    return FeatureSet(str(function), int(K), int(k), step=None if step is None else int(step)).name


def parse_feature_set(name: str) -> tuple[str, int, int, int | None]:
    """'square_K10_k512_step100' -> ('square', 10, 512, 100); step None for the final weights.
    FeatureSet.parse gives the scheme and noises too."""
    fset = FeatureSet.parse(name)
    return fset.function, fset.K, fset.k, fset.step


# ---------------------------------------------------------------- ablations

# The ground truth's model-output function in the protocol (L_Simple): its stores and LDS tables keep
# their usual paths; another one (an ablation's gt_function) gets its own (rules/ground_truth.smk).
DEFAULT_GT_FUNCTION = "simple"
# The values of what an ablation may leave out of `sweep:` and `at:` (function, K and k it may not).
ABLATION_DEFAULTS = {"scheme": "uniform", "noises": 1, "gt_function": DEFAULT_GT_FUNCTION}


@dataclass(frozen=True)
class AblationPoint:
    """One point of an ablation's sweep: the swept values (lambda aside), the feature set and the
    ground-truth function they select."""
    values: tuple[tuple[str, object], ...]
    features: FeatureSet
    gt_function: str


def ablation_points(ablation: dict) -> list[AblationPoint]:
    """The product of the ablation's `sweep` lists (in their order; a `lambda` sweep selects rows of
    each point's per-lambda table instead), each completed by `at` and ABLATION_DEFAULTS."""
    swept = {key: _as_list(values) for key, values in ablation["sweep"].items() if key != "lambda"}
    points = []
    for combination in itertools.product(*swept.values()):
        values = dict(zip(swept, combination))
        chosen = {**ABLATION_DEFAULTS, **ablation.get("at", {}), **values}
        fset = FeatureSet(str(chosen["function"]), int(chosen["K"]), int(chosen["k"]), str(chosen["scheme"]),
                          int(chosen["noises"]))
        points.append(AblationPoint(tuple(values.items()), fset, str(chosen["gt_function"])))
    return points


def _check_ablations(settings: dict, T: int) -> list[str]:
    """Each ablation names a new table, fixes or sweeps function, K and k, and sweeps valid values."""
    faults, names = [], set()
    methods = score_methods(settings["score"], "methods")
    for j, ablation in enumerate(settings.get("ablations", [])):
        key = f"ablations[{j}]"
        if ablation["name"] in names:
            faults.append(f"{key}.name: got {_show(ablation['name'])}; expected a name no other ablation has")
        names.add(ablation["name"])
        sweep, at = ablation["sweep"], ablation.get("at", {})
        for both in sorted(set(sweep) & set(at)):
            faults.append(f"{key}.at.{both}: got {_show(at[both])}; expected it in sweep or in at, not both")
        for missing in [k for k in ("function", "K", "k") if k not in sweep and k not in at]:
            faults.append(f"{key}.at.{missing}: got no value; expected it fixed here or swept in {key}.sweep")
        default = "" if "methods" in ablation else " (the default)"
        for name in [m for m in ablation.get("methods", ["trak"]) if m not in methods]:
            faults.append(f"{key}.methods: got {_show(name)}{default}; expected methods the preset scores "
                          f"(score.methods): {', '.join(methods)}")
        if "lambda" in sweep:
            from .methods import METHODS
            from .score import lambda_grid

            for name in [m for m in ablation.get("methods", ["trak"]) if not METHODS[m].uses_lambda]:
                faults.append(f"{key}.methods: got {_show(name)}; expected methods with a lambda for a "
                              "lambda sweep")
            low, high = settings["score"]["lambda_exponents"]
            grid = lambda_grid(range(int(low), int(high) + 1))
            for value in [v for v in _as_list(sweep["lambda"]) if v != "grid" and float(v) not in grid]:
                faults.append(f"{key}.sweep.lambda: got {_show(value)}; expected values of the lambda grid "
                              f"(score.lambda_exponents) or grid")
        for where, leaf, value in ((f"{key}.{part}.{leaf}", leaf, value)
                                   for part, values in (("at", at), ("sweep", sweep))
                                   for leaf, value in values.items()):
            for i, item in enumerate(_as_list(value)):
                place = f"{where}[{i}]" if isinstance(value, list) else where
                if leaf in ("function", "gt_function"):
                    try:
                        parse_function(str(item))
                    except ValueError:
                        faults.append(f"{place}: got {_show(item)}; expected {FUNCTION_EXPECTED}")
                if leaf == "K" and item > T:
                    faults.append(f"{place}: got K = {item}; expected K at most T = {T} "
                                  "(model.scheduler.num_train_timesteps)")
    return faults


def score_methods(score: dict, key: str) -> list[str]:
    """`score.methods` (methods on the gradient features), `score.baselines` (pixel baselines) or
    `score.trajectory_methods` (over training checkpoints) of a preset, the schema's default where the
    preset leaves it out."""
    default = schema()["$defs"]["experiment"]["properties"]["score"]["properties"][key]["default"]
    return [str(name) for name in score.get(key, default)]


def parse_function(name: str) -> tuple[str, float | None]:
    """'square' -> ('square', None); 'interp0.25' -> ('interp', 0.25)."""
    if name in FUNCTIONS:
        return name, None
    match = _INTERP.match(name)
    if match and 0.0 <= float(match.group(1)) <= 1.0:
        return "interp", float(match.group(1))
    raise ValueError(f"unknown model-output function '{name}': expected {FUNCTION_EXPECTED}")


def select_timesteps(k: int, scheme: str, num_train_timesteps: int = 1000) -> list[int]:
    """The protocol's timestep selections: uniform range(0, T, T // K) or cumulative range(K)."""
    if not 1 <= k <= num_train_timesteps:
        raise ValueError(f"number of timesteps K={k} must be in [1, {num_train_timesteps}]")
    if scheme == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // k))[:k]
    if scheme == "cumulative":
        return list(range(k))
    raise ValueError(f"timestep scheme '{scheme}': expected 'uniform' or 'cumulative'")
