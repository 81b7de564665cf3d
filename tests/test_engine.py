"""The fast engine against the SimPy reference: byte-identical records, or SimPy with a reason.

Both engines run the same replication (same scenario, seed and streams) and must write the
same requests.parquet and timeseries.parquet bytes and the same busy figures; a scenario
the fast engine declines must still run (on SimPy) and say why.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simrec
from simrec.cascade import run_replication
from simrec.loader import validate
from simrec.results import requests_part, timeseries_table


def parquet_bytes(table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def both(scenario, index=0):
    """(SimPy replication, fast-engine replication) of one scenario."""
    return run_replication(scenario, index, engine="simpy"), run_replication(scenario, index, engine="fast")


def assert_same(scenario, a, b):
    assert parquet_bytes(requests_part(scenario, a)) == parquet_bytes(requests_part(scenario, b))
    assert parquet_bytes(timeseries_table(scenario, [a])) == parquet_bytes(timeseries_table(scenario, [b]))
    assert a.stopped_ms == b.stopped_ms
    for name in a.busy_ms:
        assert np.array_equal(a.busy_ms[name], b.busy_ms[name])
        assert np.array_equal(a.window_busy_ms[name], b.window_busy_ms[name])


# ------------------------------------------------------------------ shipped scenarios
SHORT = {"default": ["run.duration_s=3"], "mmc": ["run.requests=4000"],
         "relay": ["run.duration_s=3"], "relay_h100_small": ["run.duration_s=3"], "helm": ["run.duration_s=4", "run.warmup_s=1"],
         "helm_switch": ["run.duration_s=4", "run.warmup_s=1"]}


@pytest.mark.parametrize("name", sorted(SHORT))
def test_shipped_scenarios_same_bytes_on_both_engines(name, tmp_path):
    sc = simrec.load_scenario(f"scenarios/{name}.yaml", SHORT[name] + ["run.replications=2"])
    a = simrec.simulate(sc, engine="simpy").write(tmp_path / "simpy")
    res = simrec.simulate(sc, engine="fast")
    b = res.write(tmp_path / "fast")
    for f in ("requests.parquet", "timeseries.parquet"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert res.summary["engine"] == {"requested": "fast", "used": ["fast"], "notes": []}


def test_gr_stage_without_relay_runs_fast():
    data = simrec.load_scenario("scenarios/relay.yaml", ["run.duration_s=3"]).model_dump(mode="json")
    data["relay"] = None
    sc = validate(data)
    a, b = both(sc)
    assert b.engine == "fast"
    assert_same(sc, a, b)


# ------------------------------------------------------------------ generated cascades
def service(kind, draw):
    if kind == "exponential":
        return {"kind": "exponential", "mean_ms": draw(st.floats(0.3, 6.0))}
    if kind == "lognormal":
        return {"kind": "lognormal", "mean_ms": draw(st.floats(0.3, 6.0)), "cv": draw(st.floats(0.1, 1.5))}
    if kind == "constant":
        return {"kind": "constant", "ms": draw(st.sampled_from([1.0, 2.5, 0.7]))}
    if kind == "empirical":
        return {"kind": "empirical", "samples_ms": draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.5]),
                                                                 min_size=1, max_size=4))}
    return {"kind": "table", "table": "h100_gr_base", "phase": "full_forward", "extrapolate": True}


@st.composite
def stages(draw):
    router = draw(st.sampled_from(["shared", "delay", "random", "round_robin", "least_loaded",
                                   "power_of_two", "affinity", "affinity_fallback"]))
    kind = draw(st.sampled_from(["exponential", "lognormal", "constant", "empirical", "table"]))
    out = {"nodes": {"count": draw(st.sampled_from([1, 2, 3, 8])),
                     "device": "h100" if kind == "table" else "cpu"},
           "router": router, "service": service(kind, draw)}
    if router != "delay" and draw(st.booleans()):
        out["batch"] = {"max_size": draw(st.sampled_from([2, 4])),
                        "max_wait_ms": draw(st.sampled_from([0.0, 0.5, 2.0])),
                        "marginal_cost": draw(st.sampled_from([1.0, 0.3]))}
    if draw(st.booleans()):
        out["hop_ms"] = draw(st.sampled_from([0.3, 1.0]))
    if draw(st.integers(0, 3)) == 0:
        out["candidates"] = 64
    if router != "delay" and draw(st.integers(0, 4)) == 0:
        out["interference"] = {"rate_per_min": 300, "duration_s": {"kind": "constant", "value": 0.1},
                               "slowdown": {"kind": "uniform", "low": 1.2, "high": 2.0},
                               "scope": draw(st.sampled_from(["node", "host"])), "nodes_per_host": 2}
    if router == "affinity_fallback":
        out["affinity"] = {"overload_jobs": draw(st.sampled_from([1, 2, 8]))}
    return out


@st.composite
def cascades(draw):
    n = draw(st.integers(1, 3))
    data = {"name": "gen", "workload": {
        "rate_qps": draw(st.sampled_from([300.0, 1000.0, 3000.0])),
        "arrivals": draw(st.sampled_from([{"kind": "poisson"},
                                          {"kind": "burst", "burst_factor": 3.0, "mean_burst_s": 0.1,
                                           "mean_calm_s": 0.3}])),
        "users": {"count": 500, "zipf_s": 0.9, "history_len": {"kind": "lognormal", "mean": 2000, "cv": 1.0},
                  "min_history_len": 256, "max_history_len": 16384},
        "candidates": {"kind": "uniform", "low": 128, "high": 512}},
        "stages": {f"s{i}": draw(stages()) for i in range(n)}, "slo": {"p99_ms": 50.0},
        "run": {"requests": draw(st.sampled_from([200, 600])), "replications": 1,
                "seed": draw(st.integers(1, 10_000))}}
    if draw(st.booleans()):
        data["run"]["sample_interval_ms"] = draw(st.sampled_from([0.5, 2.0]))
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cascades())
def test_generated_cascades_same_records(data):
    sc = validate(data)
    a, b = both(sc)
    assert a.engine == "simpy"
    assert b.engine == "fast" or b.engine_note       # fast, or SimPy with the reason
    assert_same(sc, a, b)


def trace_scenario(tmp_path, times, stages_, users=None, **run):
    n = len(times)
    path = tmp_path / "trace.csv"
    pd.DataFrame({"arrival_ms": times, "user_id": users if users is not None else np.arange(n) % 7,
                  "history_len": 1000, "candidates": 100}).to_csv(path, index=False)
    return validate({"name": "trace", "workload": {"arrivals": {"kind": "trace", "path": str(path)}},
                     "stages": stages_, "slo": {"p99_ms": 50.0},
                     "run": {"replications": 1, "seed": 3, **run}})


def test_simultaneous_arrivals_and_batches_keep_simpys_order(tmp_path):
    """Duplicate trace times and a batch leaving at one instant: arrivals tie with each
    other, never with another stage's work, so the fast engine orders them itself."""
    t = np.repeat(np.arange(0.0, 400.0, 2.5) + 0.123, 3)
    sc = trace_scenario(tmp_path, t, {
        "a": {"nodes": {"count": 2, "device": "cpu"}, "router": "least_loaded",
              "batch": {"max_size": 4, "max_wait_ms": 0.7}, "service": {"kind": "exponential", "mean_ms": 1.0}},
        "b": {"nodes": {"count": 3, "device": "cpu"}, "router": "shared",
              "service": {"kind": "lognormal", "mean_ms": 1.5, "cv": 0.5}, "hop_ms": 0.0},
        "c": {"nodes": {"count": 2, "device": "cpu"}, "router": "delay",
              "service": {"kind": "exponential", "mean_ms": 1.0}}})
    a, b = both(sc)
    assert b.engine == "fast", b.engine_note
    assert_same(sc, a, b)
    assert (requests_part(sc, b).column("a_batch").to_numpy() > 1).any()


def test_coincidences_across_stages_fall_back_to_simpy(tmp_path):
    """Integer trace times, constant services equal to the sample interval: ties the fast
    engine cannot order; SimPy runs and the records are still SimPy's."""
    sc = trace_scenario(tmp_path, np.arange(0.0, 300.0), {
        "a": {"nodes": {"count": 1, "device": "cpu"}, "router": "round_robin",
              "service": {"kind": "constant", "ms": 1.0}, "hop_ms": 1.0},
        "b": {"nodes": {"count": 1, "device": "cpu"}, "router": "round_robin",
              "service": {"kind": "constant", "ms": 1.0}}}, sample_interval_ms=1.0)
    a, b = both(sc)
    assert b.engine == "simpy" and "t=" in b.engine_note
    assert_same(sc, a, b)


RELAY_OVERRIDES = st.fixed_dictionaries({
    "relay.trigger": st.sampled_from([{"kind": "none"}, {"kind": "all"}, {"kind": "length", "min_history_len": 3000},
                                      {"kind": "sequence_aware", "max_pending": 1, "max_pinned_fraction": 0.3},
                                      {"kind": "sequence_aware"}]),
    "relay.queue": st.sampled_from(["fifo", "rank_first", "pre_first"]),
    "relay.signal_after": st.sampled_from(["arrival", "retrieval", "preprocess"]),
    "relay.signal_ms": st.sampled_from([0.0, 0.3, 0.5, 2.0]),
    "relay.remote": st.sampled_from(["recompute", "fetch"]),
    "relay.cache.pin": st.sampled_from(["until_ranked", "none"]),
    "relay.cache.keep_full": st.booleans(),
    "relay.expander.dram_bytes": st.sampled_from([0, 10**9, 10**10]),
    "stages.ranking.nodes.count": st.sampled_from([2, 3, 8]),
    "workload.rate_qps": st.sampled_from([200.0, 500.0, 900.0]),
    "workload.users.count": st.sampled_from([2000, 50_000]),
    "run.seed": st.integers(1, 10_000)})


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["relay_h100_small", "helm"]), RELAY_OVERRIDES,
       st.sampled_from(["affinity", "affinity_fallback", "least_loaded", "round_robin", "random",
                        "power_of_two", "hbm_aware"]),
       st.sampled_from([{"kind": "static", "emb_fraction": 0.4}, {"kind": "marginal", "interval_ms": 150.0},
                        {"kind": "miss_curve", "interval_ms": 250.0}]),
       st.sampled_from([10**9, 4 * 10**9, 10**10]))
def test_generated_relay_and_hbm_runs_same_records(base, over, router, partition, hbm_bytes):
    """Relay stages (signals, triggers, caches, the DRAM tier, remote fetch) and HBM pools
    with their partition controllers."""
    from simrec.loader import with_overrides
    sc = simrec.load_scenario(f"scenarios/{base}.yaml", ["run.duration_s=2", "run.warmup_s=0.5",
                                                          "run.replications=1"])
    over = {**over, "stages.ranking.router": router if base == "helm" or router != "hbm_aware" else "affinity"}
    if base == "helm":
        over["hbm.partition"] = partition
    else:
        over["relay.cache.hbm_bytes"] = hbm_bytes
    sc = with_overrides(sc, over)
    a, b = both(sc)
    assert b.engine == "fast" or b.engine_note
    assert_same(sc, a, b)
    assert a.relay.counters == b.relay.counters
    assert [c.counters for c in a.relay.caches] == [c.counters for c in b.relay.caches]


def test_overloaded_run_stops_at_the_same_instant():
    sc = validate({"name": "over", "workload": {"rate_qps": 4000.0, "arrivals": {"kind": "poisson"}},
                   "stages": {"a": {"nodes": {"count": 2, "device": "cpu"}, "router": "least_loaded",
                                    "service": {"kind": "exponential", "mean_ms": 1.0}, "hop_ms": 0.5},
                              "b": {"nodes": {"count": 1, "device": "cpu"}, "router": "shared",
                                    "batch": {"max_size": 4, "max_wait_ms": 1.0},
                                    "service": {"kind": "exponential", "mean_ms": 200.0}}},
                   "slo": {"p99_ms": 50.0}, "run": {"requests": 2000, "replications": 1, "seed": 5}})
    a, b = both(sc)
    assert b.engine == "fast"
    assert np.isnan(b.completion_ms).any()          # the run stopped before it drained
    assert b.stopped_ms == 2 * b.end_ms + 60_000
    assert_same(sc, a, b)


def test_engine_choice_and_its_record():
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=500", "run.replications=2"])
    assert simrec.simulate(sc, engine="simpy").summary["engine"] == {
        "requested": "simpy", "used": ["simpy"], "notes": []}
    assert simrec.simulate(sc).summary["engine"]["used"] == ["fast"]       # auto: fast where exact
    with pytest.raises(ValueError):
        run_replication(sc, 0, engine="warp")


# ------------------------------------------------------------------ the policies both engines use
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 39), st.sampled_from(["add", "start", "end"])),
                                     max_size=300))
def test_least_loaded_index_equals_the_scan(n, ops):
    from simrec.routing import LeastLoaded, load
    from simrec.stage import Node
    nodes = [Node(i) for i in range(n)]
    router = LeastLoaded(nodes)
    for i, op in ops:
        nd = nodes[i % n]
        if op == "add":
            nd.submit(object())
        elif op == "start" and nd.queue and not nd.in_service:
            nd.queue.popleft()
            nd.start_batch(0.0, 1, 1.0)
        elif op == "end" and nd.in_service:
            nd.end_batch(1.0, 1.0)
        assert router(0) is min(nodes, key=load)


def test_table_lookups_keep_no_cache_between_runs():
    from simrec.calibration.table import load_table
    curve = load_table("h100_gr_base").curve("full_forward")
    assert not any(isinstance(v, dict) and v for v in vars(curve).values())
    rng = np.random.default_rng(0)
    L, M, u = rng.integers(100, 30_000, 500), rng.integers(10, 2_000, 500), rng.uniform(0, 1, 500)
    memo = curve.new_memo()
    scalar = [curve.sample_ms(int(a), int(b), float(c)) for a, b, c in zip(L, M, u)]
    memoised = [curve.sample_ms(int(a), int(b), float(c), memo) for a, b, c in zip(L, M, u)]
    assert scalar == memoised == curve.sample_many(L, M, u).tolist()
    assert [curve.median_ms(int(a), int(b)) for a, b in zip(L, M)] == np.exp(
        curve.log_curves(L, M)[:, list(curve.quantiles).index(0.5)]).tolist()
    # each replication's cost model has its own memo
    sc = simrec.load_scenario("scenarios/default.yaml", ["run.duration_s=1"])
    from simrec.cascade import prepare
    s1, s2 = prepare(sc, 0).stages[-1].service, prepare(sc, 0).stages[-1].service
    assert s1._memo is not s2._memo


def test_serving_profile_cost_model_same_records(tmp_path, gr_table):
    """A cost model that reads the node (bind: idle time, the profile's episodes)."""
    from test_profile import synthetic_log      # the known-truth log generator
    from simrec.fidelity import fit_log
    from simrec.serving_log import load_log
    from simrec.serving_profile import save
    synthetic_log(tmp_path / "log", gr_table, seconds=40.0)
    profile, _ = fit_log(load_log(tmp_path / "log"))
    path = save(profile, tmp_path / "profile.json")
    for batch, router in (({"max_size": 1}, "least_loaded"), ({"max_size": 3, "max_wait_ms": 1.0}, "shared")):
        sc = validate({"name": "prof", "workload": {
            "rate_qps": 300.0, "arrivals": {"kind": "poisson"},
            "users": {"count": 1000, "history_len": {"kind": "uniform", "low": 300, "high": 4000}},
            "candidates": {"kind": "constant", "value": 128}},
            "stages": {"pre": {"nodes": {"count": 2, "device": "cpu"}, "router": "round_robin",
                               "service": {"kind": "exponential", "mean_ms": 1.0}, "hop_ms": 0.2},
                       "rank": {"nodes": {"count": 2, "device": "h100"}, "router": router, "batch": batch,
                                "service": {"kind": "gr", "table": gr_table, "profile": str(path)}}},
            "slo": {"p99_ms": 50.0}, "run": {"duration_s": 8.0, "replications": 1, "seed": 4}})
        a, b = both(sc)
        assert b.engine == "fast", b.engine_note
        assert_same(sc, a, b)


# ------------------------------------------------------------------ compact records
def test_records_are_compact_and_the_table_streams_in_row_groups(tmp_path, monkeypatch):
    from simrec import results
    sc = simrec.load_scenario("scenarios/default.yaml", ["run.duration_s=2", "run.replications=2"])
    for engine in ("simpy", "fast"):
        res = simrec.simulate(sc, engine=engine)
        for rep in res.replications:
            # the workload's 32 bytes, and node (2) + start (8) + service (8) + batch (2) per stage:
            # entry times and completions are derived exactly
            assert rep.nbytes == len(rep.requests) * (32 + 20 * len(sc.stages))
            assert rep.completion is None and rep.stages["retrieval"].enter_ms is None
        whole = parquet_bytes(res.requests)
        monkeypatch.setattr(results, "ROW_GROUP", 1000)          # many row groups
        out = res.write(tmp_path / engine)
        monkeypatch.undo()
        got = pq.read_table(out / "requests.parquet")
        assert pq.ParquetFile(out / "requests.parquet").metadata.num_row_groups > 2
        assert parquet_bytes(got) == whole


SWEEP_BASES = {"s1_max_length": "relay", "s2_throughput": "relay", "s3_triggers": "relay",
               "s4_routers": "relay", "s5_expander": "relay", "s7a_static_split": "helm",
               "s7b_burst": "helm", "s7b_quiet": "helm", "s7b_steady": "helm", "s7b_trend": "helm"}


def sweep_points():
    """Each shipped sweep's variants at its first grid point."""
    import yaml
    out = []
    for name in sorted(SWEEP_BASES):
        spec = yaml.safe_load(open(f"scenarios/{name}.yaml"))
        first = {k: v[0] for k, v in spec.get("grid", {}).items()}
        for variant, over in (spec.get("variants") or {"base": {}}).items():
            out.append(pytest.param(spec["base"], {**spec.get("set", {}), **first, **over},
                                    id=f"{name}-{variant}"))
    return out


@pytest.mark.parametrize("base,over", sweep_points())
def test_shipped_sweep_variants_same_records(base, over):
    from simrec.loader import with_overrides
    sc = simrec.load_scenario(f"scenarios/{base}", [])
    sc = with_overrides(sc, {**over, "run.duration_s": 1.5, "run.warmup_s": 0.3, "run.replications": 1})
    a, b = both(sc)
    assert b.engine == "fast" or b.engine_note
    assert_same(sc, a, b)
