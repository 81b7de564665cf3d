"""`simrec calibrate` through typer's runner: a tiny CPU table, its errors, and using it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time

import pytest
from typer.testing import CliRunner

import simrec
from conftest import check_invariants, write_gr_table
from simrec.calibration.table import load_table
from simrec.cli import app
from simrec.cli_calibrate import NO_TORCH
from simrec.loader import validate

runner = CliRunner()

TINY = ["--device", "cpu", "--layers", "1", "--d-model", "32", "--heads", "2", "--ffn", "64",
        "--short-term", "4", "--history-lens", "16,32,64", "--candidates", "4,8,16",
        "--conditions", "isolated", "--warmup", "2", "--target-s", "0.005", "--min-samples", "5",
        "--max-samples", "10", "--kernel-target-s", "0.002", "--kernel-max-samples", "5",
        "--emb-rows", "1000", "--corpus", "2000", "--threads", "1"]


def invoke(*args):
    return runner.invoke(app, ["calibrate", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("cal") / "cpu_tiny"
    t0 = time.monotonic()
    r = invoke(*TINY, "--out", out)
    elapsed = time.monotonic() - t0
    assert r.exit_code == 0, r.output + r.stderr
    return out, r, elapsed


def test_calibrate_on_cpu_writes_a_table_that_loads(tiny_table):
    out, r, elapsed = tiny_table
    assert elapsed < 120
    table = load_table(str(out))
    assert table.manifest.label == "measured" and table.manifest.device["kind"] == "cpu"
    assert table.manifest.grid == {"history_len": [16, 32, 64], "candidates": [4, 8, 16]}
    assert table.manifest.model["layers"] == 1 and table.manifest.model["d_model"] == 32
    for phase in ("full_forward", "rank_cached", "prefix_encode", "prefix_reload"):
        table.curve(phase)
    assert (out / "kernels.parquet").exists()
    assert "leave-one-grid-point-out" in r.stdout and "roofline vs measured" in r.stdout


def test_calibrate_stores_the_cost_model_errors(tiny_table):
    out, _, _ = tiny_table
    errors = json.loads((out / "manifest.json").read_text())["errors"]
    loo = errors["interpolation_loo"]["phases"]
    assert loo["full_forward"]["n"] == 6                  # 3 points interior in L, 3 in M
    assert loo["prefix_encode"]["n"] == 1
    assert 0 <= loo["full_forward"]["median"] <= loo["full_forward"]["p90"] <= loo["full_forward"]["max"]
    roof = errors["roofline"]
    assert roof["device_source"] == "cpu"
    assert set(roof["phases"]) == {"full_forward", "rank_cached", "prefix_encode", "prefix_reload"}
    assert roof["phases"]["full_forward"]["n"] == 9
    assert roof["fit"]["per_call_overhead_ms"] > 0


def test_a_scenario_runs_on_the_calibrated_table(tiny_table):
    out, _, _ = tiny_table
    sc = validate({
        "name": "on-cpu-tiny",
        "workload": {"rate_qps": 50, "users": {"count": 100, "history_len":
                                               {"kind": "uniform", "low": 16, "high": 64}},
                     "candidates": {"kind": "constant", "value": 8}},
        "stages": {"ranking": {"nodes": {"count": 1, "device": "cpu"}, "router": "shared",
                               "service": {"kind": "gr", "table": str(out)}}},
        "slo": {"p99_ms": 100.0},
        "run": {"requests": 500, "replications": 2, "seed": 1},
    })
    res = simrec.simulate(sc)
    check_invariants(res)
    assert res.summary["cost_tables"]["ranking"]["sha256"] == load_table(str(out)).sha256


def test_errors_only_rewrites_the_manifest_but_not_the_table(tmp_path):
    ref = write_gr_table(tmp_path / "t")
    before = hashlib.sha256((tmp_path / "t" / "table.parquet").read_bytes()).hexdigest()
    r = invoke("--errors-only", ref)
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["sha256"] == before
    assert manifest["errors"]["interpolation_loo"]["phases"]["full_forward"]["n"] == 16
    # the synthetic table's model has no shape: the roofline part says why it was skipped
    assert manifest["errors"]["roofline"] == {
        "skipped": "the table's model has no arch (needed for a roofline)"}
    load_table.cache_clear()
    assert load_table(ref).manifest.errors == manifest["errors"]


def test_errors_only_on_a_copy_of_the_shipped_h100_table(tmp_path):
    src = load_table("h100_gr_base").path.parent
    dst = tmp_path / "h100"
    shutil.copytree(src, dst)
    r = invoke("--errors-only", dst)
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((dst / "manifest.json").read_text())
    roof = manifest["errors"]["roofline"]
    grid = manifest["grid"]
    assert roof["device_source"] == "h100"
    assert roof["phases"]["full_forward"]["n"] == len(grid["history_len"]) * len(grid["candidates"])


def test_missing_torch_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)     # `import torch` now raises ImportError
    r = invoke(*TINY, "--out", tmp_path / "x")
    assert r.exit_code == 1
    assert r.stderr.strip() == NO_TORCH == "simrec calibrate needs torch: pip install 'simrec[calibrate]'"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    ([], "--out: give an output folder (or --errors-only TABLE)"),
    (["--out", "x", "--history-lens", "16,-4"], "--history-lens: need comma-separated positive integers (got '16,-4')"),
])
def test_bad_options_are_one_line(args, message):
    r = invoke(*args)
    assert r.exit_code == 1
    assert r.stderr.strip() == message


def test_bad_model_spec_is_one_line(tmp_path):
    pytest.importorskip("torch")
    r = invoke(*TINY, "--heads", "3", "--out", tmp_path / "x")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == "calibration failed: d_model 32 is not a multiple of heads 3"


def test_eager_phases_are_the_models_own_entry_points():
    torch = pytest.importorskip("torch")
    from simrec.calibration.gr_models import GRSpec, Phases, build_model
    spec = GRSpec(layers=1, d_model=32, heads=2, ffn=64, dtype="float32", short_term_tokens=4)
    model = build_model(spec, "cpu")
    phases = Phases(model)
    assert phases.check(16, 8, "cpu") < 1e-5       # rank(encode(h)) and full agree with full_forward
    h, s, c = (torch.randn(1, t, 32) for t in (16, 4, 8))
    with torch.inference_mode():
        assert torch.equal(phases.full(h, s, c), model.full_forward(h, s, c))


def test_cuda_graphs_need_a_cuda_device(tmp_path):
    pytest.importorskip("torch")
    from simrec.calibration import bench
    with pytest.raises(SystemExit, match="--cuda-graphs needs --device cuda"):
        bench.config_from_args(bench.parse_args(["--device", "cpu", "--cuda-graphs", "--out", str(tmp_path)]))
