"""The config's model blocks that a model kind passes to a library class as keyword arguments
(model.unet -> diffusers' UNet2DModel, ...), held to that class before any job runs."""
from __future__ import annotations

import functools
import json
import re

from .messages import key_path, schema_error_lines, show, unknown_key
from .settings import as_list


def library_block_faults(model: dict, built: bool | set = True) -> list[str]:
    """Faults of the `model:` block: a kind of diffattr.models.KINDS, no block the kind does not take,
    and each block it passes to a library class as keyword arguments (its `config_blocks`, e.g.
    model.unet -> diffusers' UNet2DModel) held to that class; one line each,
    `model.<block>.<key>: got ...; expected ...`. A new kind is checked by its KINDS entry alone.

    How, and why this way: the schema types only the common keys of these blocks (they stay open
    to the class's every argument), so each block is held to the class itself, in two steps.
    1. Its signature (`inspect.signature`), turned into a JSON schema (`annotation_schema`) and
       checked with jsonschema, so that an unknown key gets the schema's did-you-mean line and a
       wrong type (int, float accepting ints, bool not an int, str, Literal, X | None, tuple[X, ...],
       unions of these) the same `expected ...` words as every other key. This is cheap and names
       the key exactly, but says nothing of values a type allows and the class refuses.
    2. If the signature passes, and `built` allows (False, or a set of blocks not to build: those
       with faults already reported, which a build would only repeat), the class is built with the
       kind's arguments on the meta device (`with torch.device("meta")`: the modules and their shapes,
       no memory, 20-100 ms for the presets' UNets), which catches unknown block or activation
       names, negative sizes and whatever else its constructor refuses. Its error is put on the key
       that causes it: the key whose removal (the class's default) makes the build pass, else the
       key whose text value (or a negative number) the error quotes, else the block.
    torch, diffusers and diffattr.models are imported here, not with this module (every Snakemake
    process imports it; importing them costs seconds): the first call in a process pays the import.
    The faults of each distinct block are cached for the process (`_block_faults`).
    """
    from .models import KINDS

    name = model.get("kind", "pixel_ddpm")
    if name not in KINDS:
        return [f"model.kind: got {show(name)}; expected one of {', '.join(show(k) for k in KINDS)}"]
    kind = KINDS[name]
    takes = ["kind", *kind.config_blocks, *kind.config_keys]
    faults = [unknown_key(f"model.{block}", model[block], name, takes) for block in model if block not in takes]
    for block in kind.config_blocks:  # a dotted name is a block inside another: base.vae
        spec = model
        for part in block.split("."):
            spec = spec.get(part) if isinstance(spec, dict) else None
        if not isinstance(spec, dict):  # absent, or the schema reports it
            continue
        build = built if isinstance(built, bool) else block.split(".")[0] not in built
        faults += _block_faults(kind, block, json.dumps(spec, sort_keys=True), build)
    return faults


@functools.lru_cache(maxsize=None)
def _block_faults(kind, block: str, spec_json: str, build: bool) -> tuple[str, ...]:
    """The fault lines of one block (`spec_json`: its JSON, keys sorted), once per process."""
    spec = json.loads(spec_json)
    where = f"model.{block}"
    library = kind.config_blocks[block]
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(signature_schema(library)).iter_errors(spec),
                    key=lambda e: list(map(str, e.path)))
    lines = [line.replace(f"{block} takes", f"{block} ({library.__name__}) takes", 1)
             for error in errors for line in schema_error_lines(error, where)]
    if lines or not build:
        return tuple(dict.fromkeys(lines))
    error = _build_error(library, kind.block_arguments(block, spec))
    if error is None:
        return ()
    said = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{library.__name__} accepts (it raised {type(error).__name__}{': ' + said if said else ''})"
    culprits = [key for key in spec if _build_error(library, kind.block_arguments(
        block, {k: v for k, v in spec.items() if k != key})) is None]
    if culprits:
        return tuple(f"{where}.{key}: got {show(spec[key])}; expected a value {text}" for key in culprits)
    quoted = _quoted_in(str(error), spec)
    if quoted:
        path, value = quoted
        return (f"{key_path(where, path)}: got {show(value)}; expected a value {text}",)
    return (f"{where}: got {show(spec)}; expected arguments {text}",)


def _build_error(library, arguments: dict) -> Exception | None:
    """What building `library(**arguments)` raises (None if nothing): on the meta device for a torch
    module, which allocates nothing."""
    import torch

    try:
        if isinstance(library, type) and issubclass(library, torch.nn.Module):
            with torch.device("meta"):
                library(**arguments)
        else:
            library(**arguments)
    except Exception as error:  # noqa: BLE001: any refusal of the class is the config's fault
        return error
    return None


def _quoted_in(message: str, spec: dict):
    """(path, value) of the one text value, or else negative number, of `spec` (lists walked into)
    that the error message quotes as a word; None if none or several."""
    leaves = [([key], value) for key, value in spec.items() if not isinstance(value, list)]
    leaves += [([key, i], item) for key, value in spec.items() if isinstance(value, list)
               for i, item in enumerate(value)]
    for wanted in (lambda v: isinstance(v, str) and v, lambda v: isinstance(v, (int, float))
                   and not isinstance(v, bool) and v < 0):
        hits = [(path, value) for path, value in leaves if wanted(value)
                and re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message)]
        if len(hits) == 1:
            return hits[0]
    return None


def signature_schema(library) -> dict:
    """A JSON schema of the keyword arguments `library(...)` takes: its parameters, each typed by
    its annotation (`annotation_schema`), nothing else (unless it takes **kwargs)."""
    import inspect

    try:
        parameters = inspect.signature(library, eval_str=True).parameters
    except (NameError, TypeError, SyntaxError):
        parameters = inspect.signature(library).parameters
    named = {name: p for name, p in parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"}
    open_ = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    return {"type": "object", "additionalProperties": open_,
            "properties": {name: annotation_schema(p.annotation) for name, p in named.items()}}


def annotation_schema(annotation) -> dict:
    """A JSON schema of the config values (YAML: null, bool, int, float, str, list, mapping) that
    fit a parameter's annotation. A float takes ints (jsonschema's number); bool is no int; a
    tuple or list is a YAML list; an annotation it cannot read (a class such as numpy.ndarray, a
    callable) allows anything, which leaves the value to the build."""
    import collections.abc
    import inspect
    import types
    import typing

    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return {}
    if annotation is None or annotation is type(None):
        return {"type": "null"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}
    if annotation in simple:
        return {"type": simple[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [annotation_schema(a) for a in args]
        if any(m == {} for m in members):
            return {}
        if all(set(m) == {"type"} for m in members):
            return {"type": list(dict.fromkeys(t for m in members for t in as_list(m["type"])))}
        return {"anyOf": members}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (tuple, list, set, frozenset, collections.abc.Sequence) or annotation in (tuple, list):
        # a fixed length from tuple[X, Y, ...] only: diffusers writes Tuple[int] for any length (AutoencoderKL)
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
            items = [annotation_schema(a) for a in args]
            out = {"type": "array", "minItems": len(args), "maxItems": len(args), "prefixItems": items}
            if all(item == items[0] for item in items):
                out["items"] = items[0]
            return out
        return {"type": "array", **({"items": annotation_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    return {}
