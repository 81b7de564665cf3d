"""The results API: load_results for run, sweep and capacity folders, a short repr, one-line
metric errors, sweep and capacity from Python, Parquet metadata, within_slo == slo_attainment,
and the P99 attribution in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import simrec
from simrec.results import band_split, P99_BAND

MMC = "scenarios/mmc.yaml"
SMALL = ["run.requests=3000", "run.replications=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run with a stage budget that binds (20 ms against a 100 ms end-to-end one)."""
    sc = simrec.load_scenario(MMC, [*SMALL, "workload.rate_qps=270", "slo.stage_p99_ms={server: 20}"])
    res = simrec.simulate(sc)
    return res, res.write(tmp_path_factory.mktemp("api") / "run")


def test_load_run_repr_and_metric(run):
    res, folder = run
    loaded = simrec.load_results(folder)
    assert isinstance(loaded, simrec.Results)
    text = repr(loaded)
    assert "mmc-textbook" in text and "3 replications" in text and "e2e" in text and "server" in text
    assert len(text) < 300 and "\n" not in text and "workload" not in text      # not the scenario
    assert loaded.metric("e2e.p99_ms") == res.metric("e2e", "p99_ms")
    assert loaded.metric("stages", "server.p99_ms")["mean"] == res.summary["metrics"]["stages"]["server"]["p99_ms"]["mean"]
    assert loaded.requests.num_rows == res.requests.num_rows         # read lazily from the folder
    assert loaded.scenario.name == res.scenario.name


def test_wrong_metric_path_is_one_line_naming_close_matches(run):
    loaded = simrec.load_results(run[1])
    with pytest.raises(simrec.InputError) as e:
        loaded.metric("e2e.p99")
    text = str(e.value)
    assert "\n" not in text and "summary.json" in text and "'e2e.p99'" in text and "e2e.p99_ms" in text
    with pytest.raises(simrec.InputError, match="stages.server.p99_ms"):
        loaded.metric("stages.sever.p99_ms")


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(simrec.InputError, match="no such results folder"):
        simrec.load_results(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(simrec.InputError, match="not a results folder"):
        simrec.load_results(tmp_path / "x")
    (tmp_path / "x" / "summary.json").write_text("{broken")
    with pytest.raises(simrec.InputError, match="not valid JSON"):
        simrec.load_results(tmp_path / "x")


def test_within_slo_is_slo_attainment_per_replication(run):
    """One definition: end-to-end budget AND every stage budget (here the stage one binds,
    so the end-to-end test alone would give a different, larger fraction)."""
    res, _ = run
    req = res.requests.to_pandas()
    budgets = res.summary["metrics"]["slo_attainment"]["replications"]
    e2e_only = []
    for i, expected in enumerate(budgets):
        m = req[(req["replication"] == i) & ~req["warmup"]]
        assert m["within_slo"].mean() == pytest.approx(expected, abs=1e-12)
        e2e_only.append((m["latency_ms"].fillna(np.inf) <= 100).mean())
    assert min(e2e_only) > max(budgets) + 0.05
    goodput = res.summary["metrics"]["goodput_rps"]["mean"]
    assert goodput < res.summary["metrics"]["throughput_rps"]["mean"]


def test_p99_attribution_numbers_match_the_plot_definition(run):
    res, folder = run
    att = res.summary["metrics"]["p99_attribution"]
    assert json.loads((folder / "summary.json").read_text())["metrics"]["p99_attribution"] == att
    req = res.requests.to_pandas()
    m = req[(req["replication"] == 1) & ~req["warmup"]]
    lat = m["latency_ms"].fillna(np.inf).to_numpy()
    parts = {("server", k): m[f"server_{k}_ms"].to_numpy(float) for k in ("wait", "service", "hop")}
    b = band_split(lat, parts, *P99_BAND)
    st = att["stages"]["server"]
    assert st["wait_ms"]["replications"][1] == pytest.approx(b["parts"][("server", "wait")])
    assert st["service_ms"]["replications"][1] == pytest.approx(b["parts"][("server", "service")])
    assert att["latency_ms"]["replications"][1] == pytest.approx(b["latency_ms"])
    assert 0.9 < st["share"]["mean"] <= 1.0 + 1e-9         # one stage: nearly all of the time
    from simrec.reports import latency
    assert latency.band_split is band_split                  # the plot draws the same numbers


def test_parquet_metadata_and_bytes(run, tmp_path):
    res, folder = run
    sha = res.summary["effective_scenario"]["sha256"]
    for name, table in (("requests.parquet", "requests"), ("timeseries.parquet", "timeseries")):
        meta = pq.read_schema(folder / name).metadata
        assert meta[b"simrec.scenario_sha256"].decode() == sha
        assert meta[b"simrec.version"].decode() == res.summary["simrec_version"]
        assert meta[b"simrec.table"].decode() == table
        units = json.loads(meta[b"simrec.units"])
        assert set(units) == set(pq.read_schema(folder / name).names)
    units = json.loads(pq.read_schema(folder / "requests.parquet").metadata[b"simrec.units"])
    assert units["latency_ms"] == "ms" and units["within_slo"] == "bool" and units["server_batch"] == "requests"
    again = simrec.simulate(res.scenario).write(tmp_path / "again")
    for f in ("requests.parquet", "timeseries.parquet", "summary.json"):
        assert (again / f).read_bytes() == (folder / f).read_bytes(), f


def test_sweep_from_python_matches_the_cli_folder(tmp_path):
    from simrec.sweep import load_spec, run_sweep
    spec = tmp_path / "s.yaml"
    spec.write_text(f"base: {Path(MMC).resolve()}\n"
                    "grid: {workload.rate_qps: [150, 200]}\nset: {run.requests: 1500, run.replications: 4}\n")
    res = simrec.sweep(spec, out=tmp_path / "py", executor="serial")
    assert isinstance(res, simrec.SweepResults) and len(res.points) == 2 and len(res.summaries) == 2
    spec_obj, base = load_spec(spec)
    run_sweep(base, spec_obj, tmp_path / "cli", executor="serial")
    for f in ("sweep.json", "points.parquet"):
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
    loaded = simrec.load_results(tmp_path / "py")
    assert isinstance(loaded, simrec.SweepResults) and "2 points" in repr(loaded)
    p99 = loaded.metric("e2e.p99_ms")
    assert list(p99["workload.rate_qps"]) == [150, 200] and (p99["lo"] <= p99["mean"]).all()
    with pytest.raises(simrec.InputError, match="did you mean e2e.p99_ms"):
        loaded.metric("e2e.p99ms")
    # a dict spec with the base given as a Scenario: the same points
    d = simrec.sweep({"grid": {"workload.rate_qps": [150, 200]},
                      "set": {"run.requests": 1500, "run.replications": 4}},
                     base=simrec.load_scenario(MMC), executor="serial")
    assert d.points.equals(res.points)


def test_capacity_from_python_and_loaded(tmp_path):
    sc = simrec.load_scenario(MMC, ["run.requests=1500", "run.replications=2"])
    res = simrec.capacity(sc, "workload.rate_qps", start=200, max_evals=3, executor="serial",
                          out=tmp_path / "cap")
    assert isinstance(res, simrec.CapacityResults) and len(res.record["points"]) == 3
    loaded = simrec.load_results(tmp_path / "cap")
    assert loaded.bracket == res.bracket and "3 evaluations" in repr(loaded)
    assert len(loaded.metric("e2e.p99_ms")) == 3
    with pytest.raises(simrec.InputError, match="no field workload.rate in the scenario"):
        simrec.capacity(sc, "workload.rate", max_evals=1)
