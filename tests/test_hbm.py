"""HELM: one HBM pool per device, shared by the embedding cache (EMB) and the prefix KV cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simrec
from conftest import CACHE_OPS, apply_cache_op, check_cache_accounting, check_invariants
from simrec.embedding_cache import CheCurve, EmbeddingCache
from simrec.errors import InputError
from simrec.hbm_pool import HbmPool
from simrec.loader import load_scenario, with_overrides
from simrec.prefix_cache import DramTier, GhostList, PrefixCache

HELM = "scenarios/helm.yaml"


def helm(**overrides) -> simrec.Scenario:
    """helm.yaml scaled down for tests: 4 ranking nodes at the same load per node, 30 s."""
    base = {"stages.ranking.nodes.count": 4, "workload.rate_qps": 250, "run.duration_s": 30,
            "run.replications": 1, "workload.users.count": 50_000}
    return with_overrides(load_scenario(HELM), {**base, **overrides})


# ------------------------------------------------------------------ Che curve
def exact_che(p: np.ndarray, rows: float) -> float:
    from scipy.optimize import brentq
    t = brentq(lambda t: (1 - np.exp(-p * t)).sum() - rows, 1e-6, 1e15)
    return float((p * (1 - np.exp(-p * t))).sum())


@pytest.mark.parametrize("s", [0.6, 0.9, 1.2])
def test_che_curve_matches_the_exact_che_approximation(s):
    n = 60_000
    p = np.arange(1, n + 1, dtype=float) ** -s
    p /= p.sum()
    curve = CheCurve(n, s)
    for rows in (10, 300, 3000, 20_000, 50_000):
        assert curve.hit(rows) == pytest.approx(exact_che(p, rows), abs=2e-3)


def test_che_curve_is_monotone_and_its_inverse_round_trips():
    curve = CheCurve(100_000_000, 0.8)
    rows = np.geomspace(1, 1e8, 200)
    hits = [curve.hit(r) for r in rows]
    assert hits[0] >= 0 and hits[-1] == 1.0 and np.all(np.diff(hits) >= 0)
    for r in (50.0, 1e4, 3e6, 5e7):
        assert curve.rows_for(curve.hit(r)) == pytest.approx(r, rel=1e-6)


# ------------------------------------------------------------------ fluid EMB cache
def emb_cache(rows=1000, drift=(), refill=10.0) -> EmbeddingCache:
    return EmbeddingCache(CheCurve(100_000, 0.9), 100, rows, list(drift), refill)


def test_emb_shrink_drops_rows_and_growth_refills_at_the_bandwidth_cap():
    c = emb_cache(rows=1000, refill=10.0)            # 10 rows per ms
    assert c.filled == 1000                          # warm start
    c.resize(400, 0.0)
    assert c.filled == 400 and c.counters.dropped_rows == 600
    c.resize(1400, 0.0)
    assert c.filled == 400 and c.refill == 1000
    c.advance(50.0)
    assert c.filled == pytest.approx(900)            # 50 ms x 10 rows/ms
    c.advance(500.0)
    assert c.filled == 1400 and c.refill == 0 and c.counters.refilled_rows == pytest.approx(1000)


def test_drift_makes_rows_stale_and_misses_bring_them_back():
    c = emb_cache(rows=1000, drift=[(0.0, 0.0), (1000.0, 1e-4)], refill=0.0)
    c.advance(1000.0)
    assert c.filled == 1000                          # no turnover before 1 s
    c.advance(11_000.0)                              # 10 s at 0.1/s: e^-1 left
    assert c.filled == pytest.approx(1000 * math.exp(-1.0))
    before = c.filled
    misses = c.lookup(500, 11_000.0, np.random.default_rng(0))
    assert c.filled == pytest.approx(min(1000, before + misses))


def test_misses_are_binomial_at_the_curve_hit_ratio():
    c = emb_cache(rows=2000, refill=0.0)
    rng = np.random.default_rng(5)
    h = c.hit_ratio()
    misses = [c.lookup(10_000, 0.0, rng) for _ in range(400)]   # full: lookups keep it full
    assert np.mean(misses) == pytest.approx(10_000 * (1 - h), rel=0.01)


# ------------------------------------------------------------------ pool accounting
POOL, ROW = 1000, 10

pool_ops = st.lists(st.tuples(
    st.sampled_from([*CACHE_OPS, "emb", "emb_lookup", "advance"]),
    st.integers(0, 12), st.integers(1, 300), st.floats(0, 1)), max_size=150)


@given(pool_ops, st.floats(0, 0.5), st.floats(0.5, 1), st.booleans())
@settings(max_examples=300, deadline=None)
def test_hbm_accounting_holds_after_every_operation(operations, lo, hi, ghost):
    kv = PrefixCache(0, expander=DramTier(400), ghost=GhostList(POOL) if ghost else None)
    emb = EmbeddingCache(CheCurve(10_000, 0.9), ROW, 0, [(0.0, 1e-4)], 1.0)
    pool = HbmPool(0, POOL, emb, kv, int(lo * POOL), int(hi * POOL))
    kv.capacity = POOL
    pool.set_emb_bytes(0.5 * POOL, 0.0)
    rng = np.random.default_rng(0)
    now = 0.0
    for op, user, nbytes, frac in operations:
        now += 1.0
        pinned_before = {u for u, e in kv.entries.items() if e.pins}
        if op in CACHE_OPS:
            apply_cache_op(kv, op, user, nbytes, now)
        elif op == "emb":
            before = pool.emb_bytes
            got = pool.set_emb_bytes(frac * POOL, now)
            target = min(max(int(frac * POOL), pool.min_emb_bytes), pool.max_emb_bytes) // ROW * ROW
            if target <= before:                   # shrinking EMB always succeeds
                assert got == target
            else:                                  # growth stops where pinned KV bytes begin
                assert before <= got <= target
                assert got == target or kv.capacity == kv.used
        elif op == "emb_lookup":
            emb.lookup(nbytes * 10, now, rng)
        elif op == "advance":
            emb.advance(now)
        # The pool is never overdrawn; each side within its own bound.
        assert pool.emb_bytes + kv.capacity <= POOL
        assert pool.emb_bytes == emb.rows * ROW and emb.rows >= 0
        assert 0 <= emb.filled <= emb.rows and 0 <= emb.refill <= emb.rows - emb.filled + 1e-9
        check_cache_accounting(kv, pinned_before, op, user)
        if kv.ghost is not None:
            assert kv.ghost.used == sum(kv.ghost.entries.values()) <= kv.ghost.capacity
            assert not set(kv.ghost.entries) & set(kv.entries)


def test_pinned_kv_survives_every_resize():
    kv = PrefixCache(0)
    emb = EmbeddingCache(CheCurve(10_000, 0.9), ROW, 0, [], 1.0)
    pool = HbmPool(0, POOL, emb, kv, 0, POOL)
    kv.capacity = POOL
    for u in range(4):                                   # 4 pinned prefixes of 100 bytes
        kv.reserve(u, 100, 0.0)
    for u in range(4, 8):                                # 4 unpinned ones
        kv.reserve(u, 100, 0.0, pin=False)
        kv.fill(u, 0.0)
    for target in (0.9, 0.1, 1.0, 0.55, 0.95):
        pool.set_emb_bytes(target * POOL, 1.0)
        assert {0, 1, 2, 3} <= set(kv.entries)
        assert kv.capacity >= kv.pinned == 400
        assert pool.emb_bytes + kv.capacity <= POOL
    pool.set_emb_bytes(POOL, 2.0)                        # everything unpinned is gone ...
    assert set(kv.entries) == {0, 1, 2, 3} and pool.emb_bytes == POOL - 400   # ... EMB stops at the pins
    for u in range(4):
        kv.unpin(u)
    pool.set_emb_bytes(POOL, 3.0)
    assert kv.capacity == 0 and pool.emb_bytes == POOL


def test_stack_depth_sees_resident_and_evicted_prefixes():
    kv = PrefixCache(300, ghost=GhostList(1000))
    for u in range(5):                                   # 5 x 100 bytes into 300: 0 and 1 evicted
        kv.reserve(u, 100, float(u), pin=False)
        kv.fill(u, float(u))
    assert list(kv.entries) == [2, 3, 4] and list(kv.ghost.entries) == [0, 1]
    assert kv.stack_depth(4) == 100 and kv.stack_depth(2) == 300
    assert kv.stack_depth(1) == 400 and kv.stack_depth(0) == 500     # a 500-byte cache keeps 0
    assert kv.stack_depth(99) is None


# ------------------------------------------------------------------ scenario validation
def write_helm(tmp_path, old: str, new: str):
    text = open(HELM).read()
    assert old in text
    path = tmp_path / "helm.yaml"
    path.write_text(text.replace(old, new))
    return path, text.replace(old, new).splitlines()


def line_of(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def test_infeasible_pool_is_rejected_with_its_message(tmp_path):
    path, lines = write_helm(tmp_path, "weights_bytes: 10000000000", "weights_bytes: 75000000000")
    with pytest.raises(InputError) as e:
        load_scenario(path)
    assert str(e.value) == (
        f"{path}:{line_of(lines, 'weights_bytes:')} hbm.weights_bytes: weights (75000000000) + activation "
        f"reserve (10000000000) leave no pool in the NVIDIA H100 SXM5 80GB HBM (80000000000 bytes)")


def test_a_prefix_larger_than_the_largest_kv_side_is_rejected(tmp_path):
    path, lines = write_helm(tmp_path, "emb_fraction: 0.4", "emb_fraction: 0.999")
    with pytest.raises(InputError) as e:
        load_scenario(path)
    assert str(e.value) == (
        f"{path}:{line_of(lines, 'partition:')} hbm.partition.emb_fraction: the largest KV side "
        f"(0.06 GB of a 60 GB pool) cannot hold one prefix of the longest history "
        f"(16384 tokens x 16384 B = 0.268 GB)")
    # The same pool fits when the adaptive controller may give KV enough room.
    load_scenario(path, ["hbm.partition={kind: marginal, max_emb_fraction: 0.999}"])
    with pytest.raises(InputError, match="min_emb_fraction: the largest KV side"):
        load_scenario(path, ["hbm.partition={kind: miss_curve, min_emb_fraction: 0.999, "
                             "start_emb_fraction: 0.999}"])


@pytest.mark.parametrize("overrides, message", [
    (["relay.cache.hbm_bytes=1000000000"],
     "relay.cache.hbm_bytes: must not be set with an hbm block (the KV side is the pool minus the EMB side)"),
    (["embedding=null"], "hbm: needs an embedding block (what the EMB side caches)"),
    (["hbm=null"], "relay.cache.hbm_bytes: required (or give an hbm block, whose pool sets the KV side)"),
    (["hbm=null", "relay.cache.hbm_bytes=1000000000"],
     "embedding: needs an hbm block (the embedding cache lives in its pool)"),
    (["hbm.partition={kind: marginal, start_emb_fraction: 0.1, min_emb_fraction: 0.2}"],
     "need min_emb_fraction <= start_emb_fraction <= max_emb_fraction (got 0.2, 0.1, 1.0)"),
    (["embedding.drift=[{start_s: 5, turnover_per_s: 0.1}, {start_s: 5, turnover_per_s: 0.2}]"],
     "drift: steps need strictly increasing start_s"),
    (["embedding.gather=table", "stages.ranking.service={kind: roofline}"],
     "embedding.gather: 'table' needs a gr service on the relay stage (its table's emb_gather phase); use 'none'"),
])
def test_inconsistent_hbm_blocks_are_rejected(overrides, message):
    with pytest.raises(InputError) as e:
        load_scenario(HELM, overrides)
    assert str(e.value).endswith(message)


def test_hbm_needs_a_relay_and_hbm_aware_needs_its_stage():
    with pytest.raises(InputError, match="hbm: needs a relay block"):
        load_scenario(HELM, ["relay=null"])
    with pytest.raises(InputError, match="stages.retrieval.router: hbm_aware routes a relay stage"):
        load_scenario(HELM, ["stages.retrieval.router=hbm_aware"])


# ------------------------------------------------------------------ whole runs
def pool_checks(res: simrec.Results) -> None:
    """Per-sample HBM accounting, pins released at the end, and consistent EMB records."""
    scen = res.scenario
    ts = res.timeseries.to_pandas()
    x = ts[(ts["stage"] == scen.relay.stage) & (ts["node"] >= 0)]
    for rep in res.replications:
        hbm = rep.relay.hbm
        assert (x["emb_bytes"] + x["kv_capacity_bytes"] <= hbm.pool_bytes).all()
        assert (x["hbm_used_bytes"] <= x["kv_capacity_bytes"]).all()
        assert (x["emb_filled_bytes"] <= x["emb_bytes"]).all()
        assert x["emb_hit_rate"].dropna().between(0, 1).all()
        for pool, cache in zip(hbm.pools, rep.relay.caches):
            assert cache.pinned == 0 and cache.used <= cache.capacity
            assert pool.emb_bytes + cache.capacity <= hbm.pool_bytes
        assert (hbm.misses <= hbm.ids).all() and (hbm.emb_ms >= 0).all()
    req = res.requests.to_pandas()
    hit = req["ranking_prefix"].isin(["hit", "dram", "remote"])     # a prefix, from wherever
    s, m = scen.embedding.short_term_tokens, scen.embedding.candidate_rows
    assert (req.loc[hit, "ranking_emb_ids"] == s + m * req.loc[hit, "candidates"]).all()
    assert (req.loc[~hit, "ranking_emb_ids"] == req.loc[~hit, "history_len"]
            + m * req.loc[~hit, "candidates"]).all()


@pytest.mark.parametrize("overrides", [
    {},
    {"hbm.partition": {"kind": "marginal"}},
    {"hbm.partition": {"kind": "miss_curve"}, "stages.ranking.router": "hbm_aware"},
    {"hbm.partition": {"kind": "miss_curve"}, "relay.trigger": {"kind": "sequence_aware"},
     "relay.expander": {"dram_bytes": 100_000_000_000}, "embedding.drift": [
         {"start_s": 10, "turnover_per_s": 0.1}],
     "workload.arrivals": {"kind": "burst", "burst_factor": 2, "mean_calm_s": 5, "mean_burst_s": 2}},
], ids=["static", "marginal", "miss_curve+hbm_aware", "miss_curve+relay+dram+trend+burst"])
def test_helm_runs_keep_every_invariant(overrides):
    res = simrec.simulate(helm(**{"run.replications": 2, **overrides}))
    check_invariants(res)
    pool_checks(res)
    m = res.summary["metrics"]["hbm"]
    adaptive = "hbm.partition" in overrides
    assert (m["boundary_moves"]["mean"] > 0) == adaptive
    assert 0 < m["emb_hit_rate"]["mean"] < 1
    if adaptive:
        assert m["emb_fraction_min"]["mean"] < m["emb_fraction_max"]["mean"]
    else:
        assert m["emb_fraction_mean"]["mean"] == pytest.approx(0.4, abs=1e-6)


def test_helm_runs_are_deterministic_and_sampling_does_not_change_them():
    sc = helm(**{"hbm.partition": {"kind": "miss_curve"}, "stages.ranking.router": "hbm_aware",
                 "embedding.drift": [{"start_s": 5, "turnover_per_s": 0.05}]})
    a, b = simrec.simulate(sc), simrec.simulate(sc)
    assert a.requests.equals(b.requests)
    assert a.timeseries.to_pandas().equals(b.timeseries.to_pandas())      # NaN == NaN here
    c = simrec.simulate(with_overrides(sc, {"run.sample_interval_ms": 37.0}))
    assert a.requests.equals(c.requests)


def test_keep_full_leaves_the_prefix_for_the_users_next_request():
    res = simrec.simulate(helm(**{"relay.cache.keep_full": False}))
    kept = simrec.simulate(helm())
    assert res.summary["metrics"]["relay"]["prefix_hit_rate"]["mean"] == 0   # trigger none: nothing cached
    req = kept.requests.to_pandas()
    # Without eviction pressure a user's later requests on the same node hit.
    later = req[req.duplicated(["user_id", "ranking_node"])]
    assert (later["ranking_prefix"] == "hit").mean() > 0.9
    assert kept.summary["metrics"]["relay"]["prefix_hit_rate"]["mean"] > 0.6


def test_hbm_aware_routing_follows_prefixes_and_load():
    rr = simrec.simulate(helm(**{"stages.ranking.router": "round_robin"}))
    aware = simrec.simulate(helm(**{"stages.ranking.router": "hbm_aware"}))
    affinity = simrec.simulate(helm())
    hit = lambda r: r.summary["metrics"]["relay"]["prefix_hit_rate"]["mean"]
    p99 = lambda r: r.metric("stages", "ranking", "p99_ms")["mean"]
    assert hit(aware) > hit(rr) + 0.2        # it goes where the prefix is ...
    assert p99(aware) < p99(affinity)        # ... but not to an overloaded home node
    req = aware.requests.to_pandas()
    # A user's requests mostly stay where their prefix is.
    per_user = req.groupby("user_id")["ranking_node"].nunique()
    assert (per_user == 1).mean() > 0.5


def test_controllers_converge_near_the_best_static_split():
    """On a stationary workload, each controller ends near the split a static sweep finds
    best by ranking device time (what the controllers estimate and minimise)."""
    sc = helm(**{"workload.rate_qps": 150, "run.duration_s": 60})
    fractions = [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
    cost = {}
    for f in fractions:
        r = simrec.simulate(with_overrides(sc, {"hbm.partition": {"kind": "static", "emb_fraction": f}}))
        cost[f] = r.metric("stages", "ranking", "mean_service_ms")["mean"]
    best = min(cost, key=cost.get)
    near = [f for f in fractions if cost[f] <= cost[best] * 1.01]     # within 1% of the best
    for kind in ("marginal", "miss_curve"):
        r = simrec.simulate(with_overrides(sc, {"hbm.partition": {"kind": kind, "start_emb_fraction": 0.2}}))
        ts = r.timeseries.to_pandas()
        pool = r.replications[0].relay.hbm.pool_bytes
        late = ts[(ts["stage"] == "ranking") & (ts["node"] >= 0) & (ts["time_ms"] > 30_000)]
        final = late["emb_bytes"].mean() / pool
        assert min(near) - 0.1 <= final <= max(near) + 0.1, (kind, final, best, cost)
        assert r.metric("stages", "ranking", "mean_service_ms")["mean"] <= cost[best] * 1.03


def test_cli_validate_reports_an_infeasible_pool_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from simrec.cli import app
    path, lines = write_helm(tmp_path, "activation_reserve_bytes: 10000000000",
                             "activation_reserve_bytes: 70000000000")
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"{path}:{line_of(lines, 'weights_bytes:')} hbm.weights_bytes: weights (10000000000) + "
        f"activation reserve (70000000000) leave no pool in the NVIDIA H100 SXM5 80GB HBM "
        f"(80000000000 bytes)")
    ok = CliRunner().invoke(app, ["validate", HELM])
    assert ok.exit_code == 0, ok.stderr


def test_regime_switch_recovery_reads_windows():
    import pandas as pd

    from simrec.regime_switch import recovery_s, switch_time_s
    w = pd.DataFrame({"start_s": np.arange(0, 40, 2.0),
                      "p99_ms": [10] * 10 + [50, 45, 40] + [20] * 7})
    assert recovery_s(w, 20.0, 30.0, hold=3) == 6.0           # over for 3 windows after the switch
    assert recovery_s(w, 26.0, 30.0, hold=3) == 0.0           # never over after 26 s
    never = w.assign(p99_ms=[10] * 10 + [50] * 10)
    assert recovery_s(never, 20.0, 30.0, hold=3) is None
    assert switch_time_s(load_scenario("scenarios/helm_switch.yaml")) == 40.0
