"""RelayGR mechanisms: prefix cache accounting, pins, pre-infer bookkeeping, affinity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simrec
from conftest import CACHE_OPS, apply_cache_op, check_cache_accounting, check_invariants
from simrec.loader import validate
from simrec.prefix_cache import DramTier, PrefixCache
from simrec.relay import ADMITTED, REJECTED
from simrec.routing import HashRing


def relay_scenario(table: str, router: str = "affinity", nodes: int = 4, trigger=None,
                   rate: float = 300.0, users: int = 100_000, hbm: int = 10**10, dram: int = 0,
                   sessions: float = 1.0, requests: int = 4000, seed: int = 3, **relay):
    relay.setdefault("expander", {"dram_bytes": dram})
    return validate({
        "name": "relay-test",
        "workload": {"rate_qps": rate,
                     "users": {"count": users, "zipf_s": 0.0,
                               "history_len": {"kind": "uniform", "low": 1024, "high": 8192},
                               "sessions": {"mean_requests": sessions, "mean_gap_s": 1.0}},
                     "candidates": {"kind": "constant", "value": 128}},
        "stages": {
            "retrieval": {"nodes": {"count": 8, "device": "cpu"}, "router": "shared",
                          "service": {"kind": "exponential", "mean_ms": 3.0}, "hop_ms": 0.5},
            "ranking": {"nodes": {"count": nodes, "device": "h100"}, "router": router,
                        "service": {"kind": "gr", "table": table}},
        },
        "slo": {"p99_ms": 100.0, "stage_p99_ms": {"ranking": 30.0}},
        "relay": {"trigger": trigger or {"kind": "all"}, "cache": {"hbm_bytes": hbm},
                  **relay},
        "run": {"requests": requests, "replications": 2, "seed": seed},
    })


# ------------------------------------------------------------------ cache properties
ops = st.lists(st.tuples(st.sampled_from(CACHE_OPS),
                         st.integers(0, 12), st.integers(1, 40)), max_size=200)


@given(ops, st.integers(10, 120), st.integers(0, 100))
@settings(max_examples=300)
def test_cache_accounting_holds_after_every_operation(operations, capacity, dram):
    cache = PrefixCache(capacity, ttl_ms=None, expander=DramTier(dram) if dram else None)
    now = 0.0
    for op, user, nbytes in operations:
        now += 1.0
        pinned_before = {u for u, e in cache.entries.items() if e.pins}
        if apply_cache_op(cache, op, user, nbytes, now) is None:
            assert nbytes > capacity - cache.pinned   # refused only when unpinned space cannot hold it
        check_cache_accounting(cache, pinned_before, op, user)
        if cache.expander is not None:
            x = cache.expander
            assert 0 <= x.used <= x.capacity and x.used == sum(x.entries.values())


def test_ttl_expires_unpinned_entries_only():
    cache = PrefixCache(100, ttl_ms=10.0)
    cache.reserve(1, 30, 0.0)
    cache.fill(1, 0.0)
    cache.reserve(2, 30, 0.0, pin=False)
    cache.fill(2, 0.0)
    assert cache.lookup(2, 50.0) is None            # expired, unpinned: gone
    assert cache.lookup(1, 50.0) is not None        # pinned: kept although old
    assert cache.counters.expired == 1


def test_eviction_goes_to_dram_and_comes_back():
    cache = PrefixCache(50, expander=DramTier(100))
    for u in range(3):
        cache.reserve(u, 20, float(u), pin=False)
        cache.fill(u, float(u))
    assert 0 not in cache.entries and cache.expander.entries == {0: 20}
    assert cache.expander.take(0) == 20 and cache.expander.used == 0


# ------------------------------------------------------------------ routing
def test_hash_ring_is_stable_and_balanced():
    ring = HashRing(8, 64)
    owners = np.array([ring.node_of(u) for u in range(40_000)])
    assert all(ring.node_of(u) == owners[u] for u in range(0, 40_000, 997))
    share = np.bincount(owners, minlength=8) / len(owners)
    assert share.min() > 0.08 and share.max() < 0.18     # 64 virtual nodes: within ~+-40%
    # Adding a node moves only the keys it takes over (consistent hashing).
    ring9 = HashRing(9, 64)
    moved = np.array([ring9.node_of(u) for u in range(40_000)]) != owners
    assert np.all(np.array([ring9.node_of(u) for u in np.flatnonzero(moved)]) == 8)


# ------------------------------------------------------------------ whole runs
def run(sc):
    res = simrec.simulate(sc)
    check_invariants(res)
    return res


def accounting(res):
    for rep in res.replications:
        c = rep.relay.counters
        assert c.admitted == int((rep.relay.pre == ADMITTED).sum())
        assert c.rejected == int((rep.relay.pre == REJECTED).sum())
        assert 0 <= c.used <= c.admitted
        assert c.cancelled <= c.admitted - c.used          # cancelled jobs are wasted
        for cache in rep.relay.caches:
            assert cache.pinned == 0                        # every pin released once drained
            assert cache.used <= cache.capacity


def test_affinity_sends_pre_infer_and_ranking_to_the_same_instance(gr_table):
    res = run(relay_scenario(gr_table, router="affinity"))
    accounting(res)
    ring = HashRing(4, 64)
    req = res.requests.to_pandas()
    assert (req["ranking_node"] == [ring.node_of(u) for u in req["user_id"]]).all()
    # Every admitted pre-infer was found by its ranking request (nothing evicted: big cache).
    admitted = req["pre_infer"] == "admitted"
    assert admitted.sum() > 1000
    assert (req.loc[admitted, "ranking_prefix"] == "hit").all()


@pytest.mark.parametrize("nodes", [2, 4, 8])
def test_without_affinity_hit_rate_falls_as_one_over_n(gr_table, nodes):
    res = run(relay_scenario(gr_table, router="random", nodes=nodes, rate=200.0 * nodes / 4))
    accounting(res)
    req = res.requests.to_pandas()
    admitted = req[req["pre_infer"] == "admitted"]
    hits = (admitted["ranking_prefix"] == "hit").sum()
    # Random routing: the ranking lands on the pre-infer's instance with probability 1/N.
    n = len(admitted)
    assert abs(hits / n - 1 / nodes) <= 4 * np.sqrt((1 / nodes) * (1 - 1 / nodes) / n)


def test_small_cache_rejects_and_evicts_but_never_overflows(gr_table):
    # 3 prefixes of <= 8192 x 16 KiB fit; pins fill it under load, so admissions fail.
    res = run(relay_scenario(gr_table, hbm=3 * 8192 * 16384, rate=600.0, nodes=2))
    accounting(res)
    m = res.summary["metrics"]["relay"]
    assert m["pre_infer"]["rejected"]["mean"] > 0
    ts = res.timeseries.to_pandas()
    assert (ts.loc[ts["node"] >= 0, "hbm_used_bytes"] <= 3 * 8192 * 16384).all()


def test_sessions_and_dram_expander_give_reuse(gr_table):
    base = dict(router="affinity", users=2000, sessions=4.0, hbm=20 * 4096 * 16384)
    without = run(relay_scenario(gr_table, **base))
    with_dram = run(relay_scenario(gr_table, dram=400 * 8192 * 16384,
                                   expander={"dram_bytes": 400 * 8192 * 16384, "reload": "always"},
                                   **base))
    accounting(with_dram)
    m, m0 = with_dram.summary["metrics"]["relay"], without.summary["metrics"]["relay"]
    # Evicted prefixes come back from DRAM (to pre-infer jobs and rankings) ...
    assert m["dram"]["hits"]["mean"] > 0 and m0["dram"]["hits"]["mean"] == 0
    # ... so fewer prefixes are encoded from scratch and more rankings find one.
    assert m["prefix_hit_rate"]["mean"] >= m0["prefix_hit_rate"]["mean"]


def test_pre_infer_already_cached_is_pinned_not_recomputed(gr_table):
    res = run(relay_scenario(gr_table, users=50, sessions=3.0))
    accounting(res)
    req = res.requests.to_pandas()
    assert (req["pre_infer"] == "already_cached").sum() > 0
    assert res.summary["metrics"]["relay"]["pre_infer"]["admitted"]["mean"] <= 50 * 4


def test_rank_first_queue_cancels_stale_pre_infer(gr_table):
    # With ranking served before pre-infer and a tiny signal lead, some pre-infer jobs are
    # overtaken by their own ranking request: they must be cancelled, not run.
    res = run(relay_scenario(gr_table, rate=1500.0, nodes=2, queue="rank_first",
                             signal_after="arrival", signal_ms=0.0))
    accounting(res)
    c = res.summary["metrics"]["relay"]["pre_infer"]
    assert c["cancelled"]["mean"] > 0


def test_triggers_differ_as_designed(gr_table):
    none = run(relay_scenario(gr_table, trigger={"kind": "none"}))
    length = run(relay_scenario(gr_table, trigger={"kind": "length", "min_history_len": 6000}))
    rq = length.requests.to_pandas()
    triggered = rq["pre_infer"].isin(["admitted", "rejected"])
    assert (rq.loc[triggered, "history_len"] >= 6000).all()
    assert (rq.loc[~triggered & (rq["pre_infer"] != "already_cached"), "history_len"] < 6000).all()
    assert none.summary["metrics"]["relay"]["pre_infer"]["admitted"]["mean"] == 0
    seq = run(relay_scenario(gr_table, trigger={"kind": "sequence_aware", "budget_ms": 3.0}))
    sq = seq.requests.to_pandas()
    # At-risk requests are the long ones: their median L exceeds the others'.
    at_risk = sq["pre_infer"].isin(["admitted", "rejected"])
    assert at_risk.any() and (~at_risk).any()
    assert sq.loc[at_risk, "history_len"].median() > sq.loc[~at_risk, "history_len"].median()


def test_unpinned_prefixes_can_be_evicted_before_their_ranking(gr_table):
    """cache.pin: none (a server that does not pin): admissions never wait for room held by
    pinned prefixes, and some admitted prefixes are gone before their ranking, which then
    runs the full pass; with pinning the same run rejects admissions instead."""
    small = 3 * 8192 * 16384                        # three of the longest prefixes
    kw = dict(nodes=1, rate=150.0, users=50, hbm=small, requests=3000, queue="fifo")
    pinned = simrec.simulate(relay_scenario(gr_table, **kw))
    loose = simrec.simulate(relay_scenario(gr_table, **{**kw, "cache": {"hbm_bytes": small, "pin": "none"}}))
    for res in (pinned, loose):
        check_invariants(res)
    pre = {k: r.requests.to_pandas()["pre_infer"].astype(str) for k, r in (("pinned", pinned), ("loose", loose))}
    assert (pre["pinned"] == "rejected").sum() > 0
    assert (pre["loose"] == "rejected").sum() == 0
    # evicted while waiting: more pre-infer jobs find their entry gone (cancelled)
    assert (loose.metric("relay", "pre_infer", "cancelled")["mean"]
            > pinned.metric("relay", "pre_infer", "cancelled")["mean"])
    ts = loose.timeseries.to_pandas()
    assert (ts["hbm_pinned_bytes"] == 0).all()
