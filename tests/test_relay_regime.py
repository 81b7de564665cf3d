"""RelayGR in its paper's regime (issue 15): the sequence-aware trigger and its two bounds,
fetch only when cheaper, batched relay ranking, and the measured batch factors."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

import simrec
from conftest import check_invariants
from simrec import scenario as sc
from simrec.calibration.table import load_table
from simrec.prefix_cache import PrefixCache
from simrec.relay import ADMITTED, HIT, MISS, NOT_TRIGGERED, REJECTED, REMOTE, Relay
from simrec.stage import Job, Node, Stage
from test_relay import accounting, relay_scenario


class LinearPhases:
    """Phase costs with hand-computable medians (draws equal medians): full = L / 100 ms,
    encode = L / 200 ms, cached = 1 + M / 100 ms; a prefix is 10 bytes per token."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.batch_scales: dict = {}

    def median(self, name, L, M=0):
        return {"full_forward": L / 100, "prefix_encode": L / 200, "rank_cached": 1 + M / 100,
                "prefix_reload": L / 1000}[name]

    def phase(self, name, L, M=0):
        self.calls.append((name, L, M))
        return self.median(name, L, M)

    def prefix_bytes(self, L):
        return 10 * L


def make_relay(trigger: dict, nodes: int = 1, capacity: int = 10**9, marginal: float = 1.0,
               remote: str = "recompute", gbps: float = 12.5, n: int = 1000):
    cfg = sc.Relay(trigger=trigger, cache={"hbm_bytes": capacity}, remote=remote, remote_gbps=gbps)
    node_list = [Node(i) for i in range(nodes)]
    stage = Stage("ranking", node_list, None, lambda user: node_list[user % nodes], None,
                  4, 0.0, marginal, 0.0, None)
    caches = [PrefixCache(capacity, None, None) for _ in node_list]
    return Relay(cfg, stage, LinearPhases(), caches, stage.pick, trigger.get("budget_ms") or 30.0,
                 np.full(n, -1, np.int32), np.zeros(n, np.int8), np.zeros(n, np.int8))


SEQ = {"kind": "sequence_aware", "max_pinned_fraction": 1.0, "max_pre_load": 1.0}


def test_sequence_aware_admits_exactly_the_at_risk_requests():
    """Budget 30 ms, 10 ms of work queued; predicted latency = queue + L / 100. Admitted
    pre-infer work (L / 200 each) joins the queue ahead of the next prediction."""
    relay = make_relay(SEQ)
    env = simpy.Environment()
    relay.stage.nodes[0].backlog_ms = 10.0
    # L:          1000  2500  500   800   300   400
    # predicted:  20    35    27.5  30.5  29.5  30.5   (queue 10 -> 22.5 -> 26.5 -> 28.5)
    for rid, L in enumerate([1000, 2500, 500, 800, 300, 400]):
        relay.signal(env, rid, user=rid * 7, L=L, M=100)
    assert relay.pre[:6].tolist() == [NOT_TRIGGERED, ADMITTED, NOT_TRIGGERED, ADMITTED,
                                      NOT_TRIGGERED, ADMITTED]
    assert relay.stage.nodes[0].backlog_ms == pytest.approx(10 + 12.5 + 4 + 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(100, 20_000), st.floats(0, 50)), min_size=1, max_size=60),
       st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.integers(50_000, 400_000))
def test_admission_respects_footprint_and_load_bounds(signals, pinned_frac, load_frac, capacity):
    trig = {"kind": "sequence_aware", "budget_ms": 0.001, "max_pinned_fraction": pinned_frac,
            "max_pre_load": load_frac, "load_window_ms": 200.0}
    relay = make_relay(trig, capacity=capacity)
    env = simpy.Environment()
    node, cache = relay.stage.nodes[0], relay.caches[0]
    t = 0.0
    for rid, (L, gap) in enumerate(signals):
        t += gap
        env.run(until=t) if t > env.now else None
        load_before = relay.pre_load_ms(node, env.now)
        pinned_before = cache.pinned
        relay.signal(env, rid, user=rid, L=L, M=10)
        pred = L / 200
        fits_bytes = pinned_before + 10 * L <= pinned_frac * capacity
        fits_load = load_before + pred <= load_frac * 200.0
        # Every request is at risk (budget ~0): admitted exactly when both bounds allow it
        # (and the cache has room: nothing is evicted here since everything stays pinned).
        if relay.pre[rid] == ADMITTED:
            assert fits_bytes and fits_load
        else:
            assert relay.pre[rid] == REJECTED
            assert not (fits_bytes and fits_load and cache.used + 10 * L <= capacity)
        assert cache.pinned <= pinned_frac * capacity + 1e-9
        assert relay.pre_load_ms(node, env.now) <= load_frac * 200.0 + 1e-9


@settings(max_examples=80, deadline=None)
@given(st.integers(256, 20_000), st.integers(1, 1024), st.floats(0.01, 200.0))
def test_remote_fetch_only_when_cheaper(L, M, gbps):
    relay = make_relay({"kind": "none"}, nodes=2, remote="fetch", gbps=gbps)
    other = relay.caches[1]
    other.reserve(5, 10 * L, 0.0, pin=False)
    other.fill(5, 0.0)
    job = Job(0, 5, L, M, 0.0, None)
    phase, extra = relay._rank_path(job, relay.stage.nodes[0], 1.0)
    fetch_ms = 10 * L / (gbps * 1e9) * 1e3
    cheaper = fetch_ms + 1 + M / 100 < L / 100
    assert relay.prefix[0] == (REMOTE if cheaper else MISS)
    assert (phase, extra) == (("rank_cached", fetch_ms) if cheaper else ("full_forward", 0.0))
    assert relay.counters.fetch_declined == (0 if cheaper else 1)


def test_batch_cost_is_the_phase_cost_of_its_padded_groups():
    """Two hits and three misses in one batch: one rank_cached call at the hits' largest
    shape times the batch factor of 2, one full_forward call at the misses' largest shape
    times that of 3 (here 1 + marginal_cost x (n - 1), the table having no batched rows)."""
    relay = make_relay({"kind": "none"}, marginal=0.5)
    node, cache = relay.stage.nodes[0], relay.caches[0]
    for user in (1, 2):
        cache.reserve(user, 100, 0.0, pin=False)
        cache.fill(user, 0.0)
    jobs = [Job(0, 1, 4000, 64, 0.0, None), Job(1, 7, 1000, 128, 0.0, None),
            Job(2, 2, 2000, 256, 0.0, None), Job(3, 8, 3000, 32, 0.0, None),
            Job(4, 9, 500, 64, 0.0, None)]
    t = relay.rank_batch_cost(jobs, node, 1.0)
    hits = (1 + 256 / 100) * (1 + 0.5 * 1)
    misses = (3000 / 100) * (1 + 0.5 * 2)
    assert t == pytest.approx(hits + misses)
    assert relay.phases.calls == [("rank_cached", 4000, 256), ("full_forward", 3000, 128)]
    assert relay.prefix[:5].tolist() == [HIT, MISS, HIT, MISS, MISS]


def test_measured_batch_factor_is_exact_at_measured_points():
    table = load_table("h200_gr_hstu")
    frame = __import__("pandas").read_parquet(table.path.parent / "table.parquet")
    med = frame[(frame["quantile"] == 0.5) & (frame["condition"] == "isolated")]
    one = med[med["batch"] == 1].set_index(["phase", "history_len", "candidates"])["time_ms"]
    checked = 0
    for row in med[med["batch"] > 1].itertuples():
        scale = table.batch[row.phase]
        want = row.time_ms / one[(row.phase, row.history_len, row.candidates)]
        assert scale.factor(row.batch, row.history_len, row.candidates) == pytest.approx(want, rel=1e-9)
        checked += 1
    assert checked >= 40
    scale = table.batch["rank_cached"]
    assert scale.factor(1, 4096, 256) == 1.0
    # Between measured sizes: linear in B; beyond the measured region: linear from the last.
    f2, f4 = scale.factor(2, 4096, 256), scale.factor(4, 4096, 256)
    assert scale.factor(3, 4096, 256) == pytest.approx((f2 + f4) / 2)
    assert scale.factor(4, 16384, 256) == pytest.approx(4.0)   # no batch measured at 16k


def test_batched_relay_conserves_requests_and_pre_infers(gr_table):
    """Batches of up to 4 rankings (held open 2 ms): every request ranked once, every
    admitted pre-infer ran or was cancelled, and some batches mix hits and misses."""
    sc_ = relay_scenario(gr_table, rate=900.0, nodes=2, sessions=3.0, users=3000,
                         trigger={"kind": "sequence_aware", "budget_ms": 5.0})
    from simrec.loader import with_overrides
    sc_ = with_overrides(sc_, {"stages.ranking.batch": {"max_size": 4, "max_wait_ms": 2.0}})
    res = simrec.simulate(sc_)
    check_invariants(res)
    accounting(res)
    assert res.summary["engine"]["used"] == ["simpy"]
    req = res.requests.to_pandas()
    assert (req["ranking_batch"] > 1).any() and (req["ranking_batch"] <= 4).all()
    start = (req["ranking_wait_ms"] + req["latency_ms"] - req["ranking_wait_ms"] - req["ranking_service_ms"]
             - req["ranking_hop_ms"] + req["arrival_ms"]).round(9)
    batched = req.assign(start=start)[req["ranking_batch"] > 1]
    mixed = batched.groupby(["replication", "ranking_node", "start"])["ranking_prefix"].nunique()
    assert (mixed > 1).any()
    for rep in res.replications:
        c = rep.relay.counters
        queued = sum(1 for nd in rep.relay.stage.nodes for j in (*nd.queue, *nd.pre_queue) if j.kind == 1)
        assert c.admitted == c.ran + c.cancelled + queued
        assert c.admitted > 0


def test_shipped_relay_scenario_is_in_the_regime():
    """On the H200 HSTU table the default trigger fires on the long histories and pre-infer
    takes a real share of device time; a full ranking at 8k overruns the budget on an idle
    instance while a cached one does not."""
    table = load_table("h200_gr_hstu")
    full, cached = table.curve("full_forward"), table.curve("rank_cached")
    assert full.median_ms(8192, 256) > 30 > cached.median_ms(16384, 256)
    res = simrec.simulate(simrec.load_scenario("scenarios/relay.yaml",
                                               ["run.duration_s=8", "run.warmup_s=2",
                                                "run.replications=1"]))
    m = res.summary["metrics"]["relay"]
    req = res.requests.to_pandas()
    trig = req["pre_infer"].isin(["admitted", "rejected"])
    assert m["triggered_fraction"]["mean"] > 0.02
    # at risk: long histories, or short ones behind a deep queue
    assert req.loc[trig, "history_len"].median() > 2 * req.loc[~trig, "history_len"].median()
    assert m["device_ms"]["pre_infer_share"]["mean"] > 0.05
    assert not math.isnan(m["prefix_hit_rate"]["mean"])
