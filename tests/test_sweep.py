"""Sweeps, resumable point cache, executors and capacity search."""

from __future__ import annotations

import json
import math

import pytest

import simrec
from simrec import executors
from simrec.capacity import search
from simrec.sweep import SweepSpec, expand, run_sweep

BASE_SETS = ["run.requests=3000", "run.replications=2"]


def base():
    return simrec.load_scenario("scenarios/mmc.yaml", BASE_SETS)


SPEC = SweepSpec(base="mmc.yaml", grid={"workload.rate_qps": [150.0, 200.0, 250.0]},
                 variants={"c3": {}, "c4": {"stages.server.nodes.count": 4}})


def test_process_pool_gives_the_same_numbers_as_one_by_one(tmp_path):
    pooled = run_sweep(base(), SPEC, tmp_path / "pool", executor="local", workers=2)
    assert len(pooled) == 6
    for i, (params, scenario) in enumerate(expand(base(), SPEC)):
        alone = simrec.simulate(scenario).summary
        row = pooled.iloc[i]
        assert row["variant"] == params["variant"] and row["workload.rate_qps"] == params["workload.rate_qps"]
        assert row["e2e.p99_ms"] == alone["metrics"]["e2e"]["p99_ms"]["mean"]
        assert row["goodput_rps"] == alone["metrics"]["goodput_rps"]["mean"]
    folder = json.loads((tmp_path / "pool" / "sweep.json").read_text())
    assert folder["x"] == "workload.rate_qps" and folder["variants"] == SPEC.variants


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    real = executors.summary_of

    def counting(data):
        calls.append(data["workload"]["rate_qps"])
        return real(data)
    monkeypatch.setattr(executors, "summary_of", counting)

    def interrupt_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_sweep(base(), SPEC, tmp_path / "out", executor="serial", cache_dir=cache,
                  progress=interrupt_after_three)
    assert len(calls) == 3 and len(list(cache.glob("*.json"))) == 3
    assert not (tmp_path / "out").exists()                 # nothing half-written
    table = run_sweep(base(), SPEC, tmp_path / "out", executor="serial", cache_dir=cache)
    assert len(calls) == 6 and len(table) == 6              # only the 3 missing points ran
    run_sweep(base(), SPEC, tmp_path / "out", executor="serial", cache_dir=cache)
    assert len(calls) == 6                                  # a repeated sweep is free


def test_cache_key_changes_with_seed_and_scenario():
    a = base().model_dump(mode="json")
    b = simrec.load_scenario("scenarios/mmc.yaml", [*BASE_SETS, "run.seed=8"]).model_dump(mode="json")
    c = simrec.load_scenario("scenarios/mmc.yaml", [*BASE_SETS, "workload.rate_qps=100"]).model_dump(mode="json")
    assert len({executors.point_key(x) for x in (a, b, c)}) == 3
    assert executors.point_key(a) == executors.point_key(base().model_dump(mode="json"))


def test_ray_executor_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    spec = SweepSpec(base="mmc.yaml", grid={"workload.rate_qps": [150.0, 250.0]})
    with_ray = run_sweep(base(), spec, tmp_path / "ray", executor="ray")
    serial = run_sweep(base(), spec, tmp_path / "serial", executor="serial")
    assert with_ray["e2e.p99_ms"].tolist() == serial["e2e.p99_ms"].tolist()


def test_capacity_brackets_the_analytic_mm1_rate():
    # M/M/1 with mean service 10 ms: sojourn ~ Exp(mu - lambda), so P99 = ln(100)/(mu - lambda).
    # P99 = 100 ms at lambda* = 100 - 10 ln(100) = 53.95 /s. The bracket [largest pass,
    # smallest fail] must contain it (pass/fail use the 95% CI of the P99).
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=10000", "run.replications=8",
                                                     "stages.server.nodes.count=1"])
    cap, _ = search(sc, "workload.rate_qps", "e2e.p99_ms", 100.0, start=30.0, max_evals=12)
    lam_star = 100 - 10 * math.log(100)
    lo, hi = cap.passing, cap.failing
    assert lo is not None and hi is not None
    assert lo <= lam_star <= hi, (lo, lam_star, hi)
    assert len(cap.points) <= 12
    assert len({p["value"] for p in cap.points}) == len(cap.points)   # no value evaluated twice


def test_capacity_fewest_instances_and_unreachable_slo():
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=4000", "run.replications=4"])
    cap, _ = search(sc, "stages.server.nodes.count", "e2e.p99_ms", 60.0, start=8,
                    worse_when_higher=False, integer=True)
    assert cap.passing == cap.failing + 1 and cap.failing >= 2      # 240/s at 10 ms needs >= 3
    # The P99 of the service time alone is 10 ms x ln 100 = 46 ms: 40 ms is unreachable.
    cap, _ = search(sc, "stages.server.nodes.count", "e2e.p99_ms", 40.0, start=8,
                    worse_when_higher=False, integer=True)
    assert cap.passing is None and cap.plateau


def test_capacity_respects_bounds():
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=3000", "run.replications=3",
                                                     "stages.server.nodes.count=1"])
    cap, _ = search(sc, "workload.rate_qps", "e2e.p99_ms", 100.0, start=10.0, bounds=(None, 30.0),
                    max_evals=6)
    assert max(p["value"] for p in cap.points) == 30.0 and cap.failing is None
