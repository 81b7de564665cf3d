"""Sharding an affinity-routed fleet into independent sub-clusters by user hash.

A sharded run is the same system in distribution, not the same sample path (each shard
draws its own arrivals and service times), so it is compared with the unsharded run
through the confidence intervals of their metrics, not byte for byte."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import simrec
from simrec.cli import app
from simrec.errors import InputError
from simrec.loader import validate
from simrec.routing import HashRing
from simrec.shard import Ring, cannot_shard, merge, plan, run_shard, shard_requests, simulate_sharded

FLEET = {"name": "shard-small", "workload": {"rate_qps": 300.0, "arrivals": {"kind": "poisson"},
         "users": {"count": 5000, "zipf_s": 0.9}, "candidates": {"kind": "constant", "value": 100}},
         "stages": {"retrieval": {"nodes": {"count": 4, "device": "cpu"}, "router": "random",
                                  "service": {"kind": "lognormal", "mean_ms": 4.0, "cv": 0.5}, "hop_ms": 0.3},
                    "ranking": {"nodes": {"count": 8, "device": "cpu"}, "router": "affinity",
                                "service": {"kind": "exponential", "mean_ms": 8.0}}},
         "slo": {"p99_ms": 100}, "run": {"duration_s": 20, "replications": 6, "seed": 3}}


def fleet(**run):
    data = {**FLEET, "run": {**FLEET["run"], **run}}
    return validate(data)


def test_vectorised_ring_is_the_routers_ring():
    ring, ref = Ring(37, 16), HashRing(37, 16)
    users = np.random.default_rng(0).integers(0, 2**40, 3000)
    assert ring.node_of(users).tolist() == [ref.node_of(int(u)) for u in users]


def test_sharded_and_unsharded_agree_within_their_cis():
    sc = fleet()
    alone, sharded = simrec.simulate(sc), simulate_sharded(sc, 2, "serial")
    for path in [("e2e", "p99_ms"), ("e2e", "mean_ms"), ("stages", "ranking", "p99_ms"),
                 ("stages", "retrieval", "mean_ms"), ("throughput_rps",), ("utilisation", "ranking", "stage")]:
        a, b = alone.metric(*path), sharded.metric(*path)
        assert a["lo"] <= b["hi"] and b["lo"] <= a["hi"], (path, a, b)      # the 95% CIs overlap
    assert sharded.summary["shards"]["nodes"] == [{"retrieval": [0, 2], "ranking": [0, 4]},
                                                  {"retrieval": [2, 2], "ranking": [4, 4]}]


def test_merge_conserves_requests_and_keeps_each_user_on_its_fleet_node():
    sc = fleet(replications=2)
    p = plan(sc, 2)
    data = sc.model_dump(mode="json")
    shards = [run_shard((data, 2, k, 1)) for k in range(2)]
    rep = merge(sc, p, shards)
    assert rep.index == 1 and len(rep.requests) == sum(len(s.requests) for s in shards)
    assert np.all(np.diff(rep.requests.arrival_ms) >= 0)
    merged = sorted(zip(rep.requests.arrival_ms.tolist(), rep.requests.user_id.tolist()))
    assert merged == sorted(x for s in shards for x in zip(s.requests.arrival_ms.tolist(),
                                                           s.requests.user_id.tolist()))
    ring = HashRing(8, 64)
    node = rep.columns("ranking")["node"]
    assert node.tolist() == [ring.node_of(int(u)) for u in rep.requests.user_id]   # fleet numbering
    retrieval = rep.columns("retrieval")["node"]
    home = np.searchsorted([4], node, side="right")                # shard of each request
    assert np.all((retrieval >= 2 * home) & (retrieval < 2 * home + 2))
    assert np.isfinite(rep.completion_ms).all()
    assert [len(rep.busy_ms[n]) for n in ("retrieval", "ranking")] == [4, 8]
    ts = rep.timeseries
    tot = (ts["node"] == -1) & (ts["stage"] == 1)
    assert len(np.unique(ts["time_ms"][tot])) == tot.sum()         # one fleet total per instant


def test_same_seed_same_bytes_on_pool_and_serial(tmp_path):
    sc = fleet(replications=2, duration_s=5)
    a = simulate_sharded(sc, 2, "serial").write(tmp_path / "a")
    b = simulate_sharded(sc, 2, "local", workers=2).write(tmp_path / "b")
    assert (a / "requests.parquet").read_bytes() == (b / "requests.parquet").read_bytes()
    rows = pq.read_table(a / "requests.parquet").to_pandas()
    for r in (0, 1):
        ids = rows.loc[rows["replication"] == r, "request_id"]
        assert ids.tolist() == list(range(len(ids)))


def test_a_trace_splits_row_by_row(tmp_path):
    n = 400
    rng = np.random.default_rng(1)
    path = tmp_path / "t.csv"
    path.write_text("arrival_ms,user_id,history_len,candidates\n" + "".join(
        f"{t:.3f},{u},100,50\n" for t, u in zip(np.sort(rng.uniform(0, 4000, n)), rng.integers(0, 900, n))))
    data = {**FLEET, "workload": {"arrivals": {"kind": "trace", "path": str(path)},
                                  "candidates": {"kind": "constant", "value": 100}},
            "run": {"replications": 2, "seed": 3}}
    sc = validate(data)
    p = plan(sc, 3)
    parts = [shard_requests(sc, p, k, 0) for k in range(3)]
    assert sum(len(x) for x in parts) == n
    got = sorted(x for b in parts for x in zip(b.arrival_ms.tolist(), b.user_id.tolist()))
    trace = np.loadtxt(path, delimiter=",", skiprows=1)
    assert got == sorted(zip(trace[:, 0].tolist(), trace[:, 1].astype(int).tolist()))


def test_scenarios_that_cannot_shard_say_why_in_one_line(tmp_path):
    default = simrec.load_scenario("scenarios/default.yaml", ["stages.ranking.router=affinity"])
    assert "least_loaded balances across the whole fleet" in cannot_shard(default, 2)
    shared = {**FLEET, "stages": {**FLEET["stages"], "retrieval": {**FLEET["stages"]["retrieval"],
                                                                    "router": "shared"}}}
    assert "one shared queue spans the whole fleet" in cannot_shard(validate(shared), 2)
    assert "exactly one stage routed by user hash" in cannot_shard(simrec.load_scenario("scenarios/mmc.yaml"), 2)
    assert "fewer than the 8 shards" in cannot_shard(fleet(), 8)
    with pytest.raises(InputError, match="cannot shard: burst arrivals"):
        plan(validate({**FLEET, "workload": {**FLEET["workload"], "arrivals": {
            "kind": "burst", "burst_factor": 3, "mean_burst_s": 1, "mean_calm_s": 5}}}), 2)
    out = CliRunner().invoke(app, ["run", "scenarios/default.yaml", "--shards", "2", "--no-report",
                                   "--set", "stages.ranking.router=affinity",
                                   "--out", str(tmp_path / "x")])
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "cannot shard: stages.retrieval.router least_loaded" in lines[0], out.output


def test_sessions_stay_in_their_users_shard():
    users = {"count": 5000, "zipf_s": 0.9, "sessions": {"mean_requests": 4, "mean_gap_s": 2}}
    sc = validate({**FLEET, "workload": {**FLEET["workload"], "users": users}})
    p = plan(sc, 2)
    ring = HashRing(8, 64)
    for k in range(2):
        b = shard_requests(sc, p, k, 0)
        lo, count = p.nodes[k]["ranking"]
        assert len(b) > 0 and np.all(np.diff(b.arrival_ms) >= 0)
        assert all(lo <= ring.node_of(int(u)) < lo + count for u in np.unique(b.user_id))
