"""Capacity search in parallel rounds: the pool gives byte-identical results to serial."""

from __future__ import annotations

import simrec
from simrec.capacity import search, write_capacity


def _search(executor, tmp_path, name, **kw):
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=3000", "run.replications=3",
                                                     "stages.server.nodes.count=1"])
    cap, summaries = search(sc, "workload.rate_qps", "e2e.p99_ms", 100.0, start=30.0, max_evals=7,
                            executor=executor, workers=2, **kw)
    write_capacity(cap, summaries, tmp_path / name)
    return cap, tmp_path / name


def test_pool_and_serial_write_the_same_bytes(tmp_path):
    serial, a = _search("serial", tmp_path, "serial")
    pooled, b = _search("local", tmp_path, "pool")
    for f in ("capacity.json", "points.parquet"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert serial.passing is not None and serial.failing is not None
    assert len(serial.points) == 7                       # rounds of two, capped by max_evals
    assert len({p["value"] for p in serial.points}) == 7     # no value evaluated twice
    # The first round is the start and its next worse value, evaluated together.
    assert [p["value"] for p in serial.points[:2]] == [30.0, 60.0]


def test_width_one_is_the_one_at_a_time_bisection(tmp_path):
    cap, _ = _search("serial", tmp_path, "w1", width=1)
    values = [p["value"] for p in cap.points]
    assert values[:2] == [30.0, 60.0]                  # 30 passes, so the next is 2x
    lo, hi = cap.passing, cap.failing
    assert lo < hi and len(values) == 7


def test_a_bracket_end_on_short_replications_is_warned_of():
    # 1,350 measured requests a replication at rho 1.2 and beyond: far under 50 latency
    # autocorrelation times, so the failing end's bound is one the run itself doubts.
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=1500", "run.replications=3",
                                                     "stages.server.nodes.count=1"])
    cap, _ = search(sc, "workload.rate_qps", "e2e.p99_ms", 100.0, start=30.0, max_evals=6,
                    executor="serial")
    failing = next(p for p in cap.points if p["value"] == cap.failing)
    assert failing["short_replications"]
    assert cap.as_dict()["warnings"] == [
        f"the bracket's failing end ({cap.failing:g}) rests on replications short for the P99, its "
        "bound less sure than 95% (see that point's warnings): lengthen run.requests or run.duration_s"]
