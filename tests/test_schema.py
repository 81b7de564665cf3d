"""The JSON Schemas (issue 17): a description and a readable title on every field, $schema
and $id, and every shipped file accepted by its pydantic model and by its JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simrec.cli import app
from simrec.errors import InputError
from simrec.loader import load_scenario, read_yaml, validate
from simrec.scenario import field_title
from simrec.schema import DRAFT, json_schema
from simrec.sweep import load_spec

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "scenarios").glob("*.yaml"))
jsonschema = pytest.importorskip("jsonschema")


def _properties(node, where="#"):
    """(path, name, property schema) for every property of every object in a schema."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            yield f"{where}/properties/{name}", name, prop
        for k, v in node.items():
            yield from _properties(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _properties(v, f"{where}/{i}")


def _is_sweep(path: Path) -> bool:
    data, _ = read_yaml(path, "file")
    return isinstance(data, dict) and "base" in data


@pytest.mark.parametrize("kind", ["scenario", "sweep"])
def test_every_property_has_a_description_and_a_unit_title(kind):
    schema = json_schema(kind)
    props = list(_properties(schema))
    assert len(props) > (150 if kind == "scenario" else 6)
    undescribed = [p for p, _, prop in props if not str(prop.get("description", "")).strip()]
    assert not undescribed, undescribed
    titles = {p: (name, prop.get("title")) for p, name, prop in props}
    assert all(t == field_title(n) for n, t in titles.values()), titles
    assert not [t for _, t in titles.values() if t != t.lower() and "Zipf" not in t and "P99" not in t
                and "GB/s" not in t and "QPS" not in t and "TFLOP/s" not in t]


def test_titles_read_as_names_with_units():
    assert field_title("mean_ms") == "mean (ms)"
    assert field_title("rate_qps") == "rate (QPS)"
    assert field_title("hbm_gbps") == "hbm (GB/s)"
    assert field_title("turnover_per_s") == "turnover (per s)"
    assert field_title("zipf_s") == "Zipf exponent s"          # an exponent, not seconds
    assert field_title("virtual_nodes") == "virtual nodes"


@pytest.mark.parametrize("kind", ["scenario", "sweep"])
def test_schema_names_its_draft_and_id_and_is_a_valid_2020_12_schema(kind):
    schema = json_schema(kind)
    assert schema["$schema"] == DRAFT == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith(f"urn:simrec:schema:{kind}:")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert '"ge"' not in json.dumps(schema) and '"le"' not in json.dumps(schema)   # bounds are JSON Schema's


def test_cli_prints_both_schemas():
    runner = CliRunner()
    for args, kind in ((["schema"], "scenario"), (["schema", "--sweep"], "sweep")):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == json_schema(kind)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_shipped_file_is_accepted_by_its_model_and_its_schema(path):
    data, _ = read_yaml(path, "file")        # as simrec reads it (YAML 1.2 numbers)
    if _is_sweep(path):
        spec, base = load_spec(path)         # the sweep model, and its base scenario
        assert spec.base and base.stages
        kind, other = "sweep", "scenario"
    else:
        assert load_scenario(path).stages
        kind, other = "scenario", "sweep"
    jsonschema.Draft202012Validator(json_schema(kind)).validate(data)
    assert not jsonschema.Draft202012Validator(json_schema(other)).is_valid(data)


def test_both_kinds_are_shipped():
    kinds = {_is_sweep(p) for p in FILES}
    assert kinds == {True, False}


@pytest.mark.parametrize("size,ok", [("40GB", True), ("512 MiB", True), ("1.5e3kB", True),
                                     (4096, True), ("40 parsecs", False), ("GB", False)])
def test_schema_and_loader_agree_on_byte_sizes(size, ok):
    data = {"name": "t", "workload": {"rate_qps": 10},
            "devices": {"big": {"name": "big", "hbm_bytes": size, "peak_tflops": 100, "hbm_gbps": 1000,
                                "host_link_gbps": 50, "launch_overhead_us": 5, "host_dram_bytes": "1TiB"}},
            "stages": {"a": {"nodes": {"device": "big"}, "service": {"kind": "constant", "ms": 1}}},
            "slo": {"p99_ms": 10}, "run": {"requests": 100}}
    assert jsonschema.Draft202012Validator(json_schema("scenario")).is_valid(data) is ok
    if ok:
        assert validate(data).devices["big"].hbm_bytes > 0
    else:
        with pytest.raises(InputError):
            validate(data)
