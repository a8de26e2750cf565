"""Config faults in words: one line `<key>: got <value>; expected <what>` per fault, from a jsonschema
error or written by a check (diffattr.settings, diffattr.library_blocks)."""
from __future__ import annotations

import difflib
import json


def schema_error_lines(error, prefix: str = "") -> list[str]:
    """One `key: got value; expected what` line per fault of a jsonschema ValidationError."""
    path = key_path(prefix, error.absolute_path)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return [f"{key_path(path, [k])}: got no value; expected {expected(error.schema.get('properties', {}).get(k, {}))}"
                for k in missing]
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        return [unknown_key(key_path(path, [key]), error.instance[key], path.rsplit(".", 1)[-1] or "the top level",
                            known) for key in error.instance if key not in known]
    return [f"{path}: got {show(error.instance)}; expected {expected(error.schema)}"]


def unknown_key(where: str, value, owner: str, known) -> str:
    """The line of a key that `owner` does not take, with the nearest key it does take."""
    near = difflib.get_close_matches(where.rsplit(".", 1)[-1], list(known), n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"{where}: got {show(value)}; expected no such key{hint}: {owner} takes {', '.join(known)}"


def expected(schema: dict) -> str:
    """What a schema allows, in words: 'an integer >= 1', 'a number in (0, 1)', 'one of a, b'."""
    if "anyOf" in schema:
        return " or ".join(expected(member) for member in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(show(v) for v in schema["enum"])
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


def key_path(prefix: str, path) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
