"""JSON Schemas of the two file formats, for editors and validators: scenario and sweep files.

Draft 2020-12 (what pydantic writes), with `$schema` and a versioned `$id`. The schema says
what the loader accepts from a file, so an editor flags what `simrec validate` refuses and
nothing it takes: a `*_bytes` field also takes a size with a unit ("40GB", "512MiB"), as
loader.with_byte_units converts it. Cross-field rules (a stage named in `relay.stage`, a
device preset) are the loader's alone.
"""

from __future__ import annotations

import copy

DRAFT = "https://json-schema.org/draft/2020-12/schema"
KINDS = ("scenario", "sweep")
# A byte size with an optional unit, as loader._BYTE_SIZE reads it (case-insensitively).
BYTE_SIZE = {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\s*"
                                          r"([bB]|[kKmMgGtT][iI]?[bB])?\s*$",
             "description": "a byte size with an optional unit: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"}


def schema_id(kind: str) -> str:
    """A URN (no URL serves these schemas), versioned: the format may change between versions."""
    from . import __version__
    return f"urn:simrec:schema:{kind}:{__version__}"


def json_schema(kind: str = "scenario") -> dict:
    """The JSON Schema of a scenario file or (kind "sweep") a sweep file."""
    if kind == "scenario":
        from .scenario import Scenario
        body = Scenario.model_json_schema()
    elif kind == "sweep":
        from .sweep import SweepSpec
        body = SweepSpec.model_json_schema()
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    body = _byte_units(_bounds(copy.deepcopy(body)))
    return {"$schema": DRAFT, "$id": schema_id(kind), **body}


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _bounds(node):
    """pydantic leaves the bounds of a number behind a BeforeValidator (scenario.Real, Int)
    as ge/le/gt/lt, which no validator reads: they become JSON Schema's own keywords."""
    if isinstance(node, list):
        return [_bounds(x) for x in node]
    if not isinstance(node, dict):
        return node
    number = node.get("type") in ("integer", "number")
    return {(_BOUNDS[k] if number and k in _BOUNDS else k): _bounds(v) for k, v in node.items()}


def _byte_units(schema: dict) -> dict:
    """Let every integer `*_bytes` property also take a byte-size string."""
    for obj in [schema, *schema.get("$defs", {}).values()]:
        for name, prop in obj.get("properties", {}).items():
            if name.endswith("_bytes"):
                obj["properties"][name] = _or_size(prop)
    return schema


def _or_size(prop: dict) -> dict:
    meta = {k: prop[k] for k in ("title", "description", "default") if k in prop}
    rest = {k: v for k, v in prop.items() if k not in meta}
    if rest.get("type") == "integer":
        return {"anyOf": [rest, BYTE_SIZE], **meta}
    if any(s.get("type") == "integer" for s in rest.get("anyOf", ())):
        return {**rest, "anyOf": [*rest["anyOf"], BYTE_SIZE], **meta}
    return prop
