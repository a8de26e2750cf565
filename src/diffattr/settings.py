"""Experiment settings: presets in config.yaml, resolved through `base:` inheritance and validated.

Every preset, once merged with its `base:` chain, is checked against the JSON schema
`workflow/schemas/config.schema.yaml` (`$defs/experiment`), by `check` for the rules a schema
cannot state, and by `library_blocks.library_block_faults` for the model blocks passed on to a library class
(model.unet to diffusers' UNet2DModel, ...), held to that class's signature and built on the meta
device. Every fault becomes one line `experiments.<name>.<key>: got <value>; expected <what>`.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import math
from pathlib import Path

import yaml

from .methods import METHODS, READS, methods_reading
from .messages import schema_error_lines, show
from .protocol import FUNCTION_EXPECTED, FeatureSet, lambda_grid, parse_function, stage_dtype

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# Multiple of which trak's CudaProjector (fast_jl) needs its projection dimension to be.
CUDA_PROJ_MULTIPLE = 512
# The images each source gives when dataset.image_size is not set, as (side, channels).
SOURCE_IMAGES = {"sklearn_digits": (8, 1), "cifar10": (32, 3), "celeba": (64, 3), "image_folder": (None, 3),
                 "artbench": (256, 3)}


# train.compile with train.channels_last: refused (diffattr.train's docstring), in the config and by train.train
COMPILE_WITH_CHANNELS_LAST = (
    "train.compile: got true with train.channels_last true; expected at most one of the two: torch 2.13's "
    "inductor computed wrong gradients for the UNet's channels-last convolutions (tests/test_train_speed.py)")


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


def experiment(config: dict, name: str, libraries: bool = True) -> dict:
    """The settings of experiment `name`, with its `base:` chain merged in, validated (`libraries`:
    also the model blocks passed to library classes, which imports torch and diffusers)."""
    settings = _merged(config.get("experiments") or {}, name)
    validate_experiment(settings, name, config.get("device", "auto"), libraries)
    return settings


def validate_config(config: dict, libraries: bool = True) -> dict[str, dict]:
    """Check the whole config before any job runs: the top level with `snakemake.utils.validate`
    (which also fills in the top level's defaults, such as device: auto), then `resolve_all`.
    `libraries`: also hold the model blocks to the library classes they are passed to (imports
    torch and diffusers, seconds; rules/common.smk does it in the main Snakemake process only,
    not in each job's, which runs on the config the main process checked)."""
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
    return resolve_all(config, libraries)


def resolve_all(config: dict, libraries: bool = True) -> dict[str, dict]:
    """Every preset resolved and validated (bases before the presets that inherit from them, so that
    a fault is reported where it is written), and the selected `experiment` known to exist and
    possible on the config's device (`_check_device`)."""
    presets = config.get("experiments") or {}
    chains = {name: _chain(presets, name) for name in presets}
    resolved = {name: experiment(config, name, libraries) for name in sorted(presets, key=lambda n: len(chains[n]))}
    selected = config.get("experiment")
    if selected not in presets:
        raise ConfigError(undefined_preset("experiment", selected, presets))
    faults = _check_device(resolved[selected], config.get("device", "auto"), libraries)
    if faults:
        raise ConfigError("\n".join(f"experiments.{selected}.{fault}" for fault in faults))
    return {name: resolved[name] for name in presets}


def _check_device(settings: dict, device: str, libraries: bool = True) -> list[str]:
    """What the device rules out: fp16 training off a CUDA GPU. Held for the selected experiment
    only: every preset is resolved on every run, a GPU preset's on a CPU too (a target of another
    preset meets device.precision's refusal when its training starts). `device: auto` is resolved
    when `libraries` (torch imported); a job's process runs on what the main one checked."""
    dtype = stage_dtype(settings["train"])
    if dtype != "fp16" or device not in ("cpu", "auto"):
        return []
    if device == "auto":
        if not libraries:
            return []
        from .device import resolve_device

        if resolve_device(device).type != "cpu":
            return []
        device = "auto, where torch sees no CUDA GPU"
    return [f"train.dtype: got {show(dtype)}; expected fp32, tf32 or bf16 on device {device}: fp16 training "
            "needs a CUDA GPU"]


def undefined_preset(where: str, value, presets) -> str:
    return (f"{where}: got {show(value)}; expected one of the presets under experiments: "
            f"{', '.join(presets)}")


def _chain(presets: dict, name: str) -> list[str]:
    """[name, its base, the base's base, ...]."""
    if name not in presets:
        raise ConfigError(undefined_preset("experiment", name, presets))
    chain = [name]
    while True:
        if not isinstance(presets[chain[-1]], dict):
            raise ConfigError(f"experiments.{chain[-1]}: got {show(presets[chain[-1]])}; expected a mapping")
        if (base := presets[chain[-1]].get("base")) is None:
            break
        if base not in presets:
            raise ConfigError(undefined_preset(f"experiments.{chain[-1]}.base", base, presets))
        if base in chain:
            cycle = " -> ".join([*chain[chain.index(base):], base])
            raise ConfigError(f"experiments.{chain[-1]}.base: got {show(base)}; expected a chain of "
                              f"bases that ends, not the cycle {cycle}")
        chain.append(base)
    return chain


def _merged(presets: dict, name: str) -> dict:
    """A preset's settings over its bases'; a model block that names another kind replaces the base's
    whole block, one that names none keeps the base's kind and is merged into it."""
    settings: dict = {}
    for preset in reversed(_chain(presets, name)):
        own = coerce({k: v for k, v in presets[preset].items() if k != "base"}, schema()["$defs"]["experiment"])
        inherited = (settings.get("model") or {}).get("kind", "pixel_ddpm")
        if "model" in settings and "model" in own and (own["model"] or {}).get("kind", inherited) != inherited:
            settings = {k: v for k, v in settings.items() if k != "model"}  # another kind: none of the base's blocks
        settings = deep_merge(settings, own)
    return settings


# How the untyped keys of an open block (additionalProperties: true: model.unet and model.scheduler,
# a library class's keyword arguments) are read from text: as whatever YAML reads other than text, so
# that `--config` gives UNet2DModel freq_shift 1, not '1'; text that YAML reads as text stays text.
OPEN_VALUE: dict = {"type": ["integer", "number", "boolean", "null", "array", "object"]}
OPEN_VALUE.update(items=OPEN_VALUE, additionalProperties=OPEN_VALUE)


def coerce(value, schema: dict):
    """`value` with the text the schema does not allow read as YAML: `--config` hands nested values
    over as strings ('6', '0.5', '[64]'), and YAML reads 1e-4 (no decimal point) as text."""
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        default = extra if isinstance(extra, dict) else OPEN_VALUE if extra is True else {}
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


def validate_experiment(settings: dict, name: str, device: str = "auto", libraries: bool = True) -> None:
    """Raise ConfigError listing every fault of a resolved preset, one line each."""
    where = f"experiments.{name}"
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: got {show(settings)}; expected a mapping of settings")
    errors = sorted(_experiment_validator().iter_errors(settings), key=lambda e: list(map(str, e.path)))
    lines = [line for error in errors for line in schema_error_lines(error, where)]
    if lines:
        raise ConfigError("\n".join(dict.fromkeys(lines)))
    check(settings, name, device, libraries)


# ---------------------------------------------------------------- what a schema cannot say

def cuda_projector_possible(device: str) -> bool:
    """Whether features may be projected by trak's CudaProjector: fast_jl installed, device not cpu."""
    return device != "cpu" and importlib.util.find_spec("fast_jl") is not None


def num_train_timesteps(settings: dict) -> int:
    """T of the experiment's DDPM scheduler (the protocol's 1000 unless model.scheduler says otherwise)."""
    model = settings["model"]
    scheduler = model.get("scheduler") or (model.get("base") or {}).get("scheduler") or {}
    return int(scheduler.get("num_train_timesteps", 1000))


def check(settings: dict, name: str, device: str = "auto", libraries: bool = True) -> None:
    """The rules between keys that the schema cannot state, and (`libraries`) the model blocks
    passed to library classes held to those classes (`library_block_faults`); one line per fault."""
    where = f"experiments.{name}"
    faults = []
    model, featurize = settings["model"], settings["featurize"]
    T = num_train_timesteps(settings)
    within_T = f"at most T = {T} (model.scheduler.num_train_timesteps)"
    grids = {"featurize": featurize, **{f"featurize.extra_grids[{j}]": grid
                                        for j, grid in enumerate(featurize.get("extra_grids", []))}}
    for key, grid in grids.items():
        for i, function in enumerate(grid["functions"]):
            try:
                parse_function(function)
            except ValueError:
                faults.append(f"{key}.functions[{i}]: got {show(function)}; expected {FUNCTION_EXPECTED}")
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
        faults.append(f"score.lambda_exponents: got {show([low, high])}; expected [low, high] with low <= high")
    if "heldout" in settings["lds"]["lambda_rules"] and settings["subsets"]["m"] < 4:
        faults.append(f"subsets.m: got {settings['subsets']['m']}; expected at least 4 for the heldout "
                      "lambda rule (it selects on half of the subsets and reports on the other half)")
    if settings["train"].get("compile") is True and settings["train"].get("channels_last") is True:
        faults.append(COMPILE_WITH_CHANNELS_LAST)
    faults += _check_method_names(settings)
    if model.get("kind", "pixel_ddpm") == "pixel_ddpm":
        faults += _check_unet(settings["dataset"], model["unet"])
    if libraries:  # a block with a fault above is not built: the build would only say it again
        from .library_blocks import library_block_faults  # imports torch only when called

        faults += library_block_faults(model, {fault.split(":")[0].split(".")[1].split("[")[0]
                                               for fault in faults if fault.startswith("model.")})
    faults += _check_text_conditioning(settings)
    faults += _check_retrain(settings, within_T, T)
    faults += _check_counterfactual(settings)
    faults += _check_clip(settings["score"])
    faults += _check_ablations(settings, T)
    if faults:
        raise ConfigError("\n".join(f"{where}.{fault}" for fault in faults))


def _lists(*values) -> bool:
    """Whether each value is a list: a value of another type is the schema's fault, reported there."""
    return all(isinstance(value, list) for value in values)


def _check_text_conditioning(settings: dict) -> list[str]:
    """A latent_lora model's prompts and base against the data; guidance and caption dropout only for it."""
    model, faults = settings["model"], []
    if model.get("kind", "pixel_ddpm") != "latent_lora":
        for key in ("generate.guidance_scale", "train.caption_dropout"):
            section, leaf = key.split(".")
            if settings[section].get(leaf, 0 if leaf == "caption_dropout" else 1) != (0 if leaf == "caption_dropout" else 1):
                faults.append(f"{key}: got {settings[section][leaf]}; expected "
                              f"{0 if leaf == 'caption_dropout' else 1} for model.kind "
                              f"{show(model.get('kind', 'pixel_ddpm'))} (it has no prompts)")
        return faults
    classes = settings["dataset"].get("classes")
    if _lists(classes, model.get("prompts")) and len(model["prompts"]) != len(classes):
        faults.append(f"model.prompts: got {len(model['prompts'])} prompts; expected one per class of "
                      f"dataset.classes ({len(classes)})")
    if model.get("pretrained") is None and "base" not in model:
        faults.append("model.base: got no value; expected the recipe of the base the workflow trains when "
                      "model.pretrained is null (or set model.pretrained to a diffusers Stable Diffusion folder)")
    if isinstance(model.get("base"), dict):
        base = model["base"]
        if model.get("pretrained") is not None:
            faults.append(f"model.base: got a recipe; expected none when model.pretrained is set "
                          f"({show(model['pretrained'])}): the base is that folder")
        base_classes = (base.get("dataset") or {}).get("classes") if isinstance(base.get("dataset"), dict) else None
        if _lists(base_classes, base.get("prompts")) and len(base["prompts"]) != len(base_classes):
            faults.append(f"model.base.prompts: got {len(base['prompts'])} prompts; expected one per class of "
                          f"model.base.dataset.classes ({len(base_classes)})")
        if isinstance(base.get("unet_train"), dict) and "steps" not in base["unet_train"]:
            faults.append("model.base.unet_train.steps: got no value; expected the base UNet's training steps")
    return faults


def _check_retrain(settings: dict, within_T: str, T: int) -> list[str]:
    """The retraining pool: outputs within T, a ridge grid in order, subsets apart from the LDS ones."""
    if "retrain" not in settings:
        return []
    spec, faults = retrain_settings(settings), []
    if spec["timesteps"] > T:
        faults.append(f"retrain.timesteps: got {spec['timesteps']}; expected {within_T}")
    low, high = spec["datamodel_alpha_exponents"]
    if low > high:
        faults.append(f"retrain.datamodel_alpha_exponents: got {show([low, high])}; expected [low, high] "
                      "with low <= high")
    lds = settings["subsets"]
    shared = sorted({lds["seed"] + 2 * j for j in range(lds["m"])}
                    & {spec["seed"] + 2 * j for j in range(spec["pool"])})
    if shared:
        faults.append(f"retrain.seed: got {spec['seed']}; expected a seed whose pool subsets (seeds "
                      f"{spec['seed']} + 2j, j < {spec['pool']}) share none with the LDS subsets' (subsets.seed "
                      f"{lds['seed']} + 2j, j < {lds['m']}), e.g. {lds['seed'] + 1}; both draw seed {shared[0]}")
    return faults


def _with_defaults(settings: dict, section: str) -> dict:
    """A copy of the preset's `section` (empty when absent) with the schema's defaults filled in."""
    properties = schema()["$defs"]["experiment"]["properties"][section]["properties"]
    spec = {key: copy.deepcopy(p["default"]) for key, p in properties.items() if "default" in p}
    spec.update(copy.deepcopy(settings.get(section) or {}))
    return spec


def influence_settings(settings: dict) -> dict | None:
    """The preset's `influence:` block completed by the schema's defaults; None without one."""
    return _with_defaults(settings, "influence") if settings.get("influence") else None


def retrain_settings(settings: dict) -> dict:
    """The preset's `retrain` section with the schema's defaults filled in (timesteps and noise seeds
    of the outputs default to the ground truth's), plus `pool`: how many models to train, the largest
    ensemble or model count (0 without retraining-based methods)."""
    spec = _with_defaults(settings, "retrain")
    for key in ("timesteps", "noise_seeds"):
        spec.setdefault(key, copy.deepcopy(settings["ground_truth"][key]))
    spec.setdefault("methods", list(methods_reading("outputs")))
    spec["pool"] = max([0, *spec["ensembles"], *spec["n_models"]])
    return spec


def counterfactual_settings(settings: dict) -> dict | None:
    """The preset's `counterfactual` section with the schema's defaults filled in; None without one."""
    if not settings.get("counterfactual"):
        return None
    spec = _with_defaults(settings, "counterfactual")
    spec["methods"] = [{"lambda_rule": "oracle", **entry} for entry in spec["methods"]]
    return spec


def _check_counterfactual(settings: dict) -> list[str]:
    """Targets within the generation set, removed counts within the train split, each remover random
    or a method on gradient features (with a feature set it applies to on generated queries and, for
    a method with lambda, a lambda rule the LDS uses). That the feature set is the experiment's is
    the planner's check (diffattr.plan.Plan.counterfactual)."""
    spec = counterfactual_settings(settings)
    if spec is None:
        return []
    faults, n_gen, n_train = [], settings["generate"]["n"], settings["dataset"]["n_train"]
    if spec["targets"] >= n_gen:
        faults.append(f"counterfactual.targets: got {spec['targets']}; expected fewer than the {n_gen} generated "
                      "images (generate.n), which the targets are drawn from")
    for i, k in enumerate(spec["removed"]):
        if k > n_train:
            faults.append(f"counterfactual.removed[{i}]: got {k}; expected at most dataset.n_train = {n_train}")
    known = ("random", *methods_reading("features"))
    for i, entry in enumerate(spec["methods"]):
        where, name = f"counterfactual.methods[{i}]", entry["method"]
        if name not in known:
            faults.append(f"{where}.method: got {show(name)}; expected one of {', '.join(show(k) for k in known)}")
            continue
        if name == "random":
            if "features" in entry:
                faults.append(f"{where}.features: got {show(entry['features'])}; expected none for random")
            continue
        if "features" not in entry:
            faults.append(f"{where}.features: got no value; expected the feature set {name} is scored on, "
                          "e.g. square_K10_k512")
            continue
        try:
            fset = FeatureSet.parse(entry["features"])
        except ValueError as error:
            faults.append(f"{where}.features: got {show(entry['features'])}; {error}")
            continue
        if not METHODS[name].applies(fset, "gen"):
            faults.append(f"{where}.features: got {show(entry['features'])}; expected a feature set {name} is "
                          "scored on for generated queries")
        if METHODS[name].uses_lambda and entry["lambda_rule"] not in settings["lds"]["lambda_rules"]:
            faults.append(f"{where}.lambda_rule: got {show(entry['lambda_rule'])}; expected one of "
                          f"lds.lambda_rules {show(settings['lds']['lambda_rules'])}")
    return faults


def _check_checkpoints(train: dict, grids: dict) -> list[str]:
    """Kept steps ascending within the full model's training; a grid's checkpoints among them."""
    faults = []
    kept, full = train.get("keep_checkpoints", []), train["full_steps"]
    if kept != sorted(kept):
        faults.append(f"train.keep_checkpoints: got {show(kept)}; expected steps in ascending order")
    for i, step in enumerate(kept):
        if step > full:
            faults.append(f"train.keep_checkpoints[{i}]: got {step}; expected a step at most "
                          f"train.full_steps = {full}")
    earlier = [step for step in kept if step < full]
    for key, grid in grids.items():
        for i, step in enumerate(grid.get("checkpoints", [])):
            if step not in earlier:
                faults.append(f"{key}.checkpoints[{i}]: got {step}; expected one of train.keep_checkpoints "
                              f"below train.full_steps = {full} ({show(earlier)}); the final weights' "
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
                          f"of model.unet.block_out_channels {show(levels)}")
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
        return [f"score.clip.architecture: got {show(architecture)}; expected null, since "
                f"score.clip.pretrained names a model directory (its config.json is the architecture)"]
    if pretrained is not None and not (Path(pretrained) / "config.json").is_file():
        return [f"score.clip.pretrained: got {show(pretrained)}, which is not a model directory with a "
                f"config.json (working directory {Path.cwd()}); expected a local Hugging Face CLIP model "
                "directory (save_pretrained layout), or null for randomly initialized weights"]
    heads, width = (architecture or {}).get("num_attention_heads", 12), (architecture or {}).get("hidden_size", 768)
    if width % heads:
        return [f"score.clip.architecture.num_attention_heads: got {heads}; expected a divisor of "
                f"score.clip.architecture.hidden_size {width}"]
    return []


def _check_ablations(settings: dict, T: int) -> list[str]:
    """Each ablation names a new table, fixes or sweeps function, K and k, and sweeps valid values."""
    faults, names = [], set()
    methods = score_methods(settings["score"], "methods")
    for j, ablation in enumerate(settings.get("ablations", [])):
        key = f"ablations[{j}]"
        if ablation["name"] in names:
            faults.append(f"{key}.name: got {show(ablation['name'])}; expected a name no other ablation has")
        names.add(ablation["name"])
        sweep, at = ablation["sweep"], ablation.get("at", {})
        for both in sorted(set(sweep) & set(at)):
            faults.append(f"{key}.at.{both}: got {show(at[both])}; expected it in sweep or in at, not both")
        for missing in [k for k in ("function", "K", "k") if k not in sweep and k not in at]:
            faults.append(f"{key}.at.{missing}: got no value; expected it fixed here or swept in {key}.sweep")
        default = "" if "methods" in ablation else " (the default)"
        for name in [m for m in ablation.get("methods", ["trak"]) if m not in methods]:
            faults.append(f"{key}.methods: got {show(name)}{default}; expected methods the preset scores "
                          f"(score.methods): {', '.join(methods)}")
        if "lambda" in sweep:
            for name in [m for m in ablation.get("methods", ["trak"]) if not METHODS[m].uses_lambda]:
                faults.append(f"{key}.methods: got {show(name)}; expected methods with a lambda for a "
                              "lambda sweep")
            grid = lambda_grid(settings["score"]["lambda_exponents"])
            for value in [v for v in as_list(sweep["lambda"]) if v != "grid" and float(v) not in grid]:
                faults.append(f"{key}.sweep.lambda: got {show(value)}; expected values of the lambda grid "
                              f"(score.lambda_exponents) or grid")
        for where, leaf, value in ((f"{key}.{part}.{leaf}", leaf, value)
                                   for part, values in (("at", at), ("sweep", sweep))
                                   for leaf, value in values.items()):
            for i, item in enumerate(as_list(value)):
                place = f"{where}[{i}]" if isinstance(value, list) else where
                if leaf in ("function", "gt_function"):
                    try:
                        parse_function(str(item))
                    except ValueError:
                        faults.append(f"{place}: got {show(item)}; expected {FUNCTION_EXPECTED}")
                if leaf == "K" and item > T:
                    faults.append(f"{place}: got K = {item}; expected K at most T = {T} "
                                  "(model.scheduler.num_train_timesteps)")
    return faults


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def score_methods(score: dict, key: str) -> list[str]:
    """`score.methods` (methods on the gradient features), `score.baselines` (similarity baselines) or
    `score.trajectory_methods` (over training checkpoints) of a preset. Left out, the methods lists
    name every registered method of their kind (diffattr.methods.READS), the baselines the schema's
    default."""
    if key in score:
        return [str(name) for name in score[key]]
    if key == "baselines":
        return list(schema()["$defs"]["experiment"]["properties"]["score"]["properties"][key]["default"])
    return list(methods_reading(*(reads for reads, where in READS.items() if where == ("score", key))))


def _check_method_names(settings: dict) -> list[str]:
    """Every method a config list names is a registered method of a kind that list holds."""
    faults = []
    for section, key in dict.fromkeys(READS.values()):
        if (section, key) == ("retrain", "ensembles"):  # sizes, not names
            continue
        names = score_methods(settings["score"], key) if section == "score" else retrain_settings(settings)[key]
        known = methods_reading(*(reads for reads, where in READS.items() if where == (section, key)))
        for i, name in enumerate(names):
            if name not in known:
                faults.append(f"{section}.{key}[{i}]: got {show(name)}; expected one of "
                              f"{', '.join(show(k) for k in known)}")
    return faults
