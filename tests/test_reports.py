"""`simrec.reports.build_report` on each kind of results folder, and on folders it must refuse.

Run folders come from real small simulations; sweep and capacity folders are written
directly with plausible numbers (their writers live elsewhere).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import simrec
from simrec.reports import build_report
from simrec.reports.html import num, pct
from simrec.results import flat_metrics
from test_relay import relay_scenario

PNG = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = {"latency_cdf", "p99_breakdown", "utilisation", "queue_length"}


def check_report(folder: Path, written: list[Path], plots: set[str]) -> str:
    """Every expected plot is a non-empty PNG, the HTML is last, self-contained and embeds
    each plot once; returns the HTML."""
    assert written[-1] == folder / "report.html"
    assert {p.stem for p in written[:-1]} == plots
    assert {p.name for p in (folder / "plots").iterdir()} == {f"{n}.png" for n in plots}
    for p in written[:-1]:
        assert p.parent == folder / "plots"
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    html = (folder / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count('src="data:image/png;base64,') == len(plots)
    assert not re.search(r"(src|href)=\"(?!data:)", html), "external reference in report.html"
    assert "<script" not in html and "<link" not in html
    assert not [p for p in folder.rglob(".*") if p.name.endswith(".tmp")], "temp files left behind"
    return html


# ------------------------------------------------------------------ run folders
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    sc = simrec.load_scenario("scenarios/default.yaml", ["run.duration_s=3", "run.replications=4"])
    return simrec.simulate(sc).write(tmp_path_factory.mktemp("run") / "default")


def test_run_folder_report(run_folder, capfd):
    written = build_report(run_folder)
    assert capfd.readouterr() == ("", ""), "build_report must never print"
    html = check_report(run_folder, written, RUN_PLOTS)
    m = json.loads((run_folder / "summary.json").read_text())["metrics"]
    for node in (m["e2e"]["p50_ms"], m["e2e"]["p99_ms"], m["e2e"]["p99_9_ms"],
                 m["goodput_rps"], m["throughput_rps"], m["stages"]["ranking"]["p99_ms"]):
        assert f"{num(node['mean'])} [{num(node['lo'])}, {num(node['hi'])}]" in html
    assert pct(m["slo_attainment"]["mean"]) in html
    assert pct(m["utilisation"]["preprocess"]["stage"]["mean"]) in html
    assert "default-cascade" in html and "h100_gr_base" in html   # scenario and table provenance
    # A second build replaces the first and draws the same pixels.
    first = {p: p.read_bytes() for p in written}
    assert build_report(run_folder) == written
    assert {p: p.read_bytes() for p in written} == first


def test_relay_run_report_shows_memory_and_relay_metrics(gr_table, tmp_path):
    sc = relay_scenario(gr_table, nodes=2, rate=600.0, users=2000, sessions=3.0, requests=2000,
                        dram=400 * 8192 * 16384)
    folder = simrec.simulate(sc).write(tmp_path / "relay")
    html = check_report(folder, build_report(folder), RUN_PLOTS | {"memory"})
    relay = json.loads((folder / "summary.json").read_text())["metrics"]["relay"]
    assert "prefix hit rate" in html
    assert pct(relay["prefix_hit_rate"]["mean"]) in html
    assert "pre-infer admitted" in html


# ------------------------------------------------------------------ sweep folders
BASE = {"name": "relay-vs-full", "workload": {"rate_qps": 1000},
        "slo": {"p99_ms": 60}, "run": {"duration_s": 20, "replications": 5}}


def metric_row(p99: float, rate: float, half: float | None, hit: float | None) -> dict:
    """A flat metric row (flat_metrics of a made-up summary) around the given P99."""
    def iv(x):
        return {"mean": x, "lo": None if half is None else x * (1 - half),
                "hi": None if half is None else x * (1 + half), "replications": [x]}
    ok = min(1.0, 60 / p99) ** 4
    metrics = {"e2e": {"p50_ms": iv(p99 / 3), "p99_ms": iv(p99), "p99_9_ms": iv(p99 * 1.4)},
               "stages": {"ranking": {"p99_ms": iv(p99 * 0.6)}},
               "utilisation": {"ranking": {"stage": iv(min(0.98, rate / 3000))}},
               "throughput_rps": iv(rate), "goodput_rps": iv(rate * ok), "slo_attainment": iv(ok)}
    if hit is not None:
        metrics["relay"] = {"prefix_hit_rate": iv(hit)}
    return flat_metrics({"metrics": metrics})


def write_sweep(folder: Path, lengths: list[int], half: float | None) -> dict:
    """Rates x history lengths x two variants; P99 grows as load nears capacity."""
    folder.mkdir()
    grid = {"workload.rate_qps": [500, 1000, 1500, 2000, 2500]}
    if len(lengths) > 1:
        grid["workload.users.history_len.mean"] = lengths
    variants = {"full": {}, "relay": {"relay.trigger.kind": "sequence_aware"}}
    spec = {"base": BASE, "grid": grid, "variants": variants, "set": {"run.replications": 3},
            "x": "workload.rate_qps", "slo_p99_ms": 60}
    rows = []
    for variant in variants:
        for L in lengths:
            capacity = (3000 if variant == "relay" else 2200) * (2000 / L) ** 0.3
            for rate in grid["workload.rate_qps"]:
                rho = min(rate / capacity, 0.97)
                row = {"point": len(rows), "variant": variant, "workload.rate_qps": rate,
                       "replications": 1 if half is None else 3}
                if len(lengths) > 1:
                    row["workload.users.history_len.mean"] = L
                row.update(metric_row(12 / (1 - rho), rate, half, 0.6 if variant == "relay" else None))
                row["warnings"] = "latency has not settled" if rho > 0.9 else ""
                rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), folder / "points.parquet")
    (folder / "sweep.json").write_text(json.dumps(spec))
    return spec


@pytest.mark.parametrize("lengths, half", [([2000, 8000], 0.1), ([2000], None)],
                         ids=["faceted-with-ci", "one-axis-one-replication"])
def test_sweep_report(tmp_path, capfd, lengths, half):
    folder = tmp_path / "sweep"
    write_sweep(folder, lengths, half)
    html = check_report(folder, build_report(folder), {"p99_vs_x", "goodput_vs_x"})
    assert capfd.readouterr() == ("", "")
    points = pq.read_table(folder / "points.parquet").to_pandas()
    assert "relay-vs-full" in html and "sequence_aware" in html          # base scenario, variants
    assert html.count("<tr>") >= len(points) + 1                          # the points table
    worst = points["e2e.p99_ms"].max()
    assert num(worst) in html
    assert ('class="fail">fail' in html) and ('class="pass">pass' in html)
    assert "latency has not settled" in html and "run.replications=3" in html


def test_sweep_of_variants_only(tmp_path):
    """No grid (the lead's writer then has x = null): one point per variant."""
    folder = tmp_path / "variants"
    folder.mkdir()
    rows = [{"point": i, "variant": v, **metric_row(p99, 1000, 0.1, None)}
            for i, (v, p99) in enumerate([("fifo", 40.0), ("rank_first", 30.0), ("pre_first", 55.0)])]
    pq.write_table(pa.Table.from_pylist(rows), folder / "points.parquet")
    (folder / "sweep.json").write_text(json.dumps({"base": BASE, "grid": {}, "variants": {
        v: {"relay.queue": v} for v in ("fifo", "rank_first", "pre_first")}, "x": None, "slo_p99_ms": 60}))
    html = check_report(folder, build_report(folder), {"p99_vs_x", "goodput_vs_x"})
    assert "rank_first" in html and "55.0 [49.5, 60.5]" in html


# ------------------------------------------------------------------ capacity folders
def write_capacity(folder: Path) -> dict:
    """As `simrec capacity` writes it: evaluations in order, with verdicts."""
    folder.mkdir()
    evals = [(1000, 20.0, "pass"), (2000, 75.0, "fail"), (4000, None, "fail"), (1500, 35.0, "pass"),
             (1750, 48.0, "pass"), (1875, 58.0, "undecided"), (1950, 66.0, "fail")]
    spec = {"parameter": "workload.rate_qps", "metric": "e2e.p99_ms", "slo_ms": 60,
            "worse_when_higher": True, "bracket": [1750, 1950], "undecided": [1875],
            "evaluations": len(evals),
            "points": [{"value": v, "p99": p, "p99_lo": p and p * 0.9, "p99_hi": p and p * 1.1,
                        "verdict": verdict, "passed": verdict == "pass"} for v, p, verdict in evals]}
    rows = [{"point": i, "variant": "capacity", "workload.rate_qps": v, "replications": 5,
             **metric_row(p or 1e4, v, 0.1, None), "warnings": ""} for i, (v, p, _) in enumerate(evals)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "points.parquet")
    (folder / "capacity.json").write_text(json.dumps(spec))
    return spec


def test_capacity_report(tmp_path, capfd):
    folder = tmp_path / "capacity"
    write_capacity(folder)
    html = check_report(folder, build_report(folder), {"capacity"})
    assert capfd.readouterr() == ("", "")
    assert "Best passing workload.rate_qps: 1,750; nearest failing: 1,950. 7 evaluations" in html
    assert 'class="undecided">undecided' in html
    assert "48.0 [43.2, 52.8]" in html          # an evaluation with its interval


# ------------------------------------------------------------------ refusals
def test_folder_without_results_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(simrec.InputError) as e:
        build_report(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert all(f in msg for f in ("summary.json", "sweep.json", "capacity.json"))
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "plots").exists()


def test_missing_folder_and_broken_files_are_refused(tmp_path):
    with pytest.raises(simrec.InputError, match="no such results folder"):
        build_report(tmp_path / "nope")
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(simrec.InputError, match=r"summary.json:1: not valid JSON"):
        build_report(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"scenario": {"stages": {"a": {}}, "slo": {"p99_ms": 1}}}))
    with pytest.raises(simrec.InputError, match="missing requests.parquet"):
        build_report(tmp_path)
    (tmp_path / "summary.json").unlink()
    (tmp_path / "sweep.json").write_text(json.dumps({"base": {}, "grid": {}, "variants": {}, "x": "a"}))
    with pytest.raises(simrec.InputError, match="missing points.parquet"):
        build_report(tmp_path)
    (tmp_path / "capacity.json").write_text(json.dumps({"metric": "e2e.p99_ms", "points": []}))
    with pytest.raises(simrec.InputError, match="capacity.json: missing field 'parameter'"):
        build_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
