"""Read a scenario file, apply `--set` overrides, validate once, report errors by line.

YAML is parsed with the safe loader only; its node tree is kept to map a pydantic error
location back to a line of the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import InputError
from .scenario import Scenario

_PATH_PREFIX = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)+): (.*)$", re.S)


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Load and validate a scenario file; overrides are `dotted.path=value` strings."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"cannot read scenario file ({e.strerror})", source) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        raise InputError(f"invalid YAML: {problem}", source, line=line) from None
    if not isinstance(data, dict):
        raise InputError("a scenario must be a YAML mapping", source, line=1)

    overridden = []
    for item in overrides:
        keys, value = parse_override(item)
        set_path(data, keys, value, item)
        overridden.append(keys)

    resolve_paths(data, path.parent)
    return validate(data, source, root, overridden)


def validate(data: dict, source: str = "<scenario>", root: yaml.Node | None = None,
             overridden: list[list[str]] = ()) -> Scenario:
    """Validate a scenario mapping, turning the first error into one InputError line."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        loc = _drop_union_tags(data, loc)
        message = _message(err)
        m = _PATH_PREFIX.match(message)
        if not loc and m:  # cross-field check that names its own path
            loc, message = m.group(1).split("."), m.group(2)
        more = len(e.errors()) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        n = len(loc)
        if loc and any(loc[:len(k)] == k or k[:n] == loc for k in overridden):
            raise InputError(message, "--set", ".".join(loc)) from None
        line = _line_of(root, loc) if root is not None else None
        raise InputError(message, source, ".".join(loc) or None, line) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise InputError(f"override {item!r} must look like path.to.field=value", "--set")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise InputError(f"override {item!r} has an empty path segment", "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:   # YAML 1.1 reads "1e3" as a string; on the command line it means a number
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return keys, value


def set_path(data: dict, keys: list[str], value: Any, item: str = "") -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k) if isinstance(node, dict) else None
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise InputError(f"cannot set {'.'.join(keys)}: {'.'.join(keys[:i + 1])} is not a mapping",
                             "--set")
        node = nxt
    node[keys[-1]] = value


def get_path(data: dict, keys: list[str], source: str = "") -> Any:
    node = data
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            raise InputError(f"no field {'.'.join(keys[:i + 1])} in the scenario", source or None)
        node = node[k]
    return node


def with_overrides(scenario: Scenario, overrides: dict[str, Any]) -> Scenario:
    """A derived scenario (for sweeps): dotted-path overrides applied, validated again."""
    data = scenario.model_dump(mode="json")
    for key, value in overrides.items():
        set_path(data, key.split("."), copy.deepcopy(value))
    return validate(data, "<derived>", None, [k.split(".") for k in overrides])


def resolve_paths(data: dict, base: Path) -> None:
    """Make trace, table and profile paths absolute, relative to the scenario's folder."""
    arrivals = (data.get("workload") or {}).get("arrivals")
    if isinstance(arrivals, dict) and isinstance(arrivals.get("path"), str):
        arrivals["path"] = str((base / arrivals["path"]).resolve())
    for stage in (data.get("stages") or {}).values():
        service = stage.get("service") if isinstance(stage, dict) else None
        for key in ("table", "fit_from", "profile"):
            ref = service.get(key) if isinstance(service, dict) else None
            if isinstance(ref, str) and ("/" in ref or ref.endswith(".json") or key == "profile"):
                service[key] = str((base / ref).resolve())


def _drop_union_tags(data: Any, loc: list[str]) -> list[str]:
    """Pydantic puts the discriminator value in the location; the YAML has no such key."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = None
    return out


def _line_of(root: yaml.Node, loc: list[str]) -> int | None:
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _message(err: dict) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound:g} (got {got!r})"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {got!r})"
    if kind == "union_tag_invalid":
        return f"kind must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})"
    if kind == "union_tag_not_found":
        return "needs a 'kind' field"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if got is not None and not isinstance(got, (dict, list)):
        return f"{msg} (got {got!r})"
    return msg
