"""The CLI through typer's runner: a good run, and bad inputs with their exact messages."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simrec.cli import app

runner = CliRunner()

GOOD = """\
name: tiny
workload:
  rate_qps: 200
stages:
  front:
    nodes: {count: 2, device: cpu}
    service: {kind: exponential, mean_ms: 2}
    hop_ms: 0.5
  back:
    nodes: {count: 1, device: h100}
    batch: {max_size: 4, max_wait_ms: 1}
    service: {kind: lognormal, mean_ms: 3, cv: 0.5}
slo:
  p99_ms: 50
run:
  requests: 2000
  replications: 2
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_writes_results_and_prints_key_figures(tmp_path):
    scen = write(tmp_path, GOOD)
    out = tmp_path / "res"
    r = invoke("run", scen, "--out", out, "--seed", 5)
    assert r.exit_code == 0, r.output
    assert "end-to-end p99" in r.output and f"results: {out}" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.html", "requests.parquet",
                                                       "summary.json", "timeseries.parquet"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 5 and summary["replications"] == 2
    assert summary["requests"]["created"] == 4000 == summary["requests"]["completed"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res")]   # no temp left


def test_run_replaces_existing_folder_atomically(tmp_path):
    scen = write(tmp_path, GOOD)
    out = tmp_path / "res"
    assert invoke("run", scen, "--out", out).exit_code == 0
    assert invoke("run", scen, "--out", out, "--set", "workload.rate_qps=100").exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"]["workload"]["rate_qps"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res", "s.yaml"]


def test_validate_and_schema(tmp_path):
    scen = write(tmp_path, GOOD)
    r = invoke("validate", scen)
    assert r.exit_code == 0 and "ok (2 stages, 2000 requests" in r.output
    r = invoke("schema")
    assert r.exit_code == 0
    assert json.loads(r.output)["title"] == "Scenario"


def test_help_has_examples():
    for cmd in ("run", "validate", "schema"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Example: simrec" in r.output


BAD = [
    # (edit applied to GOOD, expected stderr line with {p} for the scenario path)
    (("    batch: {max_size: 4, max_wait_ms: 1}", "    batch: {max_sz: 4, max_wait_ms: 1}"),
     "{p}:11 stages.back.batch.max_sz: unknown key 'max_sz'; did you mean 'max_size'?"),
    (("  rate_qps: 200", "  rate_qps: fast"),
     "{p}:3 workload.rate_qps: input should be a valid number, unable to parse string as a "
     "number (got 'fast')"),
    (("  rate_qps: 200", "  rate_qps: -5"), "{p}:3 workload.rate_qps: must be > 0 (got -5)"),
    (("    nodes: {count: 1, device: h100}", "    nodes: {count: 0, device: h100}"),
     "{p}:10 stages.back.nodes.count: must be > 0 (got 0)"),
    (("    nodes: {count: 1, device: h100}", "    nodes: {count: 1, device: tpu9}"),
     "{p}:10 stages.back.nodes.device: unknown device 'tpu9' (known: h100, h200, a100, "
     "ascend910b, ascend910c, cpu)"),
    (("service: {kind: lognormal, mean_ms: 3, cv: 0.5}", "service: {kind: gamma, mean_ms: 3}"),
     "{p}:12 stages.back.service: kind must be one of 'constant', 'exponential', 'lognormal', "
     "'empirical', 'table', 'gr', 'roofline', 'kernels' (got 'gamma')"),
    (("  p99_ms: 50", "  p99_ms: 50\n  p99_ms: 60"), "{p}:15 slo.p99_ms: duplicate key (also at line 14)"),
    (("slo:\n  p99_ms: 50\n", ""), "{p}:1 slo: required field is missing"),
    (("name: tiny", "name: [tiny"), "__yaml__"),
]


@pytest.mark.parametrize("edit,expected", BAD)
def test_bad_scenarios_fail_with_one_line(tmp_path, edit, expected):
    text = GOOD.replace(*edit)
    assert text != GOOD
    scen = write(tmp_path, text)
    out = tmp_path / "res"
    r = invoke("run", scen, "--out", out)
    if expected is None:
        assert r.exit_code == 0
        return
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    if expected == "__yaml__":
        assert lines[0].startswith(f"{scen}:") and "invalid YAML" in lines[0]
    else:
        assert lines[0] == expected.format(p=scen)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_bad_trace_file_and_rows(tmp_path):
    base = GOOD.replace("  rate_qps: 200\n", "  arrivals: {kind: trace, path: trace.csv}\n")
    scen = write(tmp_path, base)
    r = invoke("run", scen, "--out", tmp_path / "res")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"{(tmp_path / 'trace.csv').resolve()}: trace file not found"
    (tmp_path / "trace.csv").write_text(
        "arrival_ms,user_id,history_len,candidates\n0,1,100,50\n5,2,abc,50\n")
    r = invoke("run", scen, "--out", tmp_path / "res")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"{(tmp_path / 'trace.csv').resolve()}:3 row 1: history_len is "
                                "missing or not a number (got 'abc')")
    assert not (tmp_path / "res").exists()


def test_bad_overrides_and_flags(tmp_path):
    scen = write(tmp_path, GOOD)
    r = invoke("run", scen, "--set", "workload.rate_qps")
    assert r.exit_code == 1
    assert r.stderr.strip() == ("--set: override 'workload.rate_qps' must look like "
                                "path.to.field=value")
    r = invoke("run", scen, "--set", "stages.back.batch.max_size=0")
    assert r.exit_code == 1
    assert r.stderr.strip() == "--set stages.back.batch.max_size: must be > 0 (got 0)"
    r = invoke("run", scen, "--set", "stages.back.colour=blue")
    assert r.stderr.strip() == "--set stages.back.colour: unknown key 'colour'"
    r = invoke("run", scen, "--bogus")
    assert r.exit_code == 1
    assert r.stderr.strip().startswith("error: ") and "--bogus" in r.stderr
    r = invoke("run", tmp_path / "missing.yaml")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"{tmp_path / 'missing.yaml'}: cannot read scenario file " \
                               "(No such file or directory)"


def test_table_shape_outside_grid_is_reported(tmp_path):
    text = GOOD.replace("service: {kind: lognormal, mean_ms: 3, cv: 0.5}",
                        "service: {kind: table, table: illustrative_gr, phase: full_forward}")
    scen = write(tmp_path, text)
    r = invoke("run", scen, "--out", tmp_path / "res")
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert line.startswith(f"{scen} stages.back.service: shape L=")
    assert "outside the table grid (L 256..16384, M 32..1024)" in line



def test_sweep_capacity_and_report_commands(tmp_path):
    scen = write(tmp_path, GOOD)
    r = invoke("sweep", scen, "--grid", "workload.rate_qps=100,200", "--variant", "one:stages.back.nodes.count=1",
               "--variant", "two:stages.back.nodes.count=2", "--executor", "serial", "--out", tmp_path / "sw")
    assert r.exit_code == 0, r.output + r.stderr
    assert {"sweep.json", "points.parquet", "report.html"} <= {p.name for p in (tmp_path / "sw").iterdir()}
    assert len(re.findall(r"\bone\b", r.output)) == 2 and len(re.findall(r"\btwo\b", r.output)) == 2
    r = invoke("capacity", scen, "--param", "workload.rate_qps", "--max-evals", "4",
               "--out", tmp_path / "cap", "--no-report")
    assert r.exit_code == 0, r.output + r.stderr
    cap = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert cap["evaluations"] <= 4 and cap["parameter"] == "workload.rate_qps"
    assert not (tmp_path / "cap" / "report.html").exists()
    r = invoke("report", tmp_path / "cap")
    assert r.exit_code == 0 and (tmp_path / "cap" / "report.html").exists()
    r = invoke("report", tmp_path)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1


def test_sweep_and_capacity_bad_input(tmp_path):
    scen = write(tmp_path, GOOD)
    r = invoke("sweep", scen, "--grid", "stages.back.nodes.count=1,0", "--executor", "serial",
               "--out", tmp_path / "sw")
    assert r.exit_code == 1
    assert r.stderr.strip() == ("sweep stages.back.nodes.count: must be > 0 (got 0) "
                                "(variant 'base', {'stages.back.nodes.count': 0})")
    assert not (tmp_path / "sw").exists()
    r = invoke("capacity", scen, "--param", "workload.colour")
    assert r.exit_code == 1 and r.stderr.strip() == "--param: no field workload.colour in the scenario"
    r = invoke("sweep", scen, "--grid", "workload.rate_qps=100", "--executor", "warp")
    assert r.exit_code == 1
    assert r.stderr.strip() == "--executor: unknown executor 'warp' (choose local, serial, ray)"
