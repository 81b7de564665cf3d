"""Shared helpers: build scenarios from dicts, and invariants every run must satisfy."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import simrec
from simrec.loader import validate


def scenario(stages: dict, rate_qps: float, requests: int = 20_000, replications: int = 8,
             seed: int = 11, **run) -> simrec.Scenario:
    """A scenario with Poisson arrivals and the given stages (dicts as in YAML)."""
    return validate({
        "name": "test", "workload": {"rate_qps": rate_qps, "arrivals": {"kind": "poisson"}},
        "stages": stages, "slo": {"p99_ms": 100.0},
        "run": {"requests": requests, "replications": replications, "seed": seed, **run},
    })


def station(c: int = 1, service: dict | None = None, router: str = "shared", **extra) -> dict:
    return {"nodes": {"count": c, "device": "cpu"}, "router": router,
            "service": service or {"kind": "exponential", "mean_ms": 10.0}, **extra}


def ci_contains(values, theory: float, level: float = 0.99) -> tuple[bool, float, float]:
    """Does the t-interval over replication estimates contain the theoretical value?"""
    from scipy import stats
    v = np.asarray(values, float)
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return abs(v.mean() - theory) <= half, float(v.mean()), float(half)


def check_invariants(results: simrec.Results) -> None:
    """Conservation, Little's law per stage, and utilisation = lambda E[S] / c."""
    req = results.requests.to_pandas()
    scen = results.scenario
    s = results.summary
    # No request created or lost: every created request completed every stage once.
    assert s["requests"]["created"] == len(req) == s["requests"]["completed"]
    for rep, g in req.groupby("replication"):
        assert (g["request_id"].to_numpy() == np.arange(len(g))).all()
    assert req["completion_ms"].notna().all()
    for name, st in scen.stages.items():
        assert (req[f"{name}_node"] >= 0).all() and (req[f"{name}_node"] < st.nodes.count).all()
        assert (req[f"{name}_wait_ms"] >= -1e-9).all()
        assert (req[f"{name}_service_ms"] > 0).all()
    hops = sum(req[f"{n}_wait_ms"] + req[f"{n}_service_ms"] + req[f"{n}_hop_ms"] for n in scen.stages)
    np.testing.assert_allclose(hops, req["latency_ms"], rtol=1e-9, atol=1e-6)

    ts = results.timeseries.to_pandas()
    names = list(scen.stages)
    for rep in results.replications:
        g = req[req["replication"] == rep.index]
        t_end = rep.stopped_ms
        tsr = ts[ts["replication"] == rep.index]
        for name in names:
            if scen.stages[name].router == "delay":
                continue
            c = scen.stages[name].nodes.count
            # Little's law over the whole run (empty at both ends): the time-average number
            # in the stage, measured from the sampled queue + in-service counts, equals
            # lambda * W from the request records. Sampling error only.
            # Tolerance: 4 standard errors of the sampled mean, from 20 batch means (the
            # samples are autocorrelated, batch means are nearly independent).
            x = tsr[(tsr["stage"] == name) & (tsr["node"] == -1)]
            n_t = (x["queue_len"] + x["in_service"]).to_numpy(float)
            batches = np.array_split(n_t, 20)
            se = np.std([b.mean() for b in batches], ddof=1) / np.sqrt(20)
            sojourn = g[f"{name}_wait_ms"] + g[f"{name}_service_ms"]
            pre = rep.relay.counters.time_in_queue_ms if (scen.relay and scen.relay.stage == name) else 0
            lam_W = (sojourn.sum() + pre) / t_end
            assert abs(n_t.mean() - lam_W) <= 4 * se + 1e-9, (name, n_t.mean(), lam_W, se)
            # Utilisation from node busy intervals equals lambda E[S] / c from the records
            # (exact for unbatched stages: each service interval is one job).
            busy = sum(float(np.sum(e - s_)) for s_, e in rep.busy[name])
            relay_stage = scen.relay is not None and scen.relay.stage == name
            if scen.stages[name].router == "delay":   # no servers, nothing busy
                assert busy == 0
            elif relay_stage:   # the device also runs pre-infer jobs; a batch of n is n records
                assert busy >= (g[f"{name}_service_ms"] / g[f"{name}_batch"]).sum() - 1e-6
            elif scen.stages[name].batch.max_size == 1:
                assert busy / (c * t_end) == pytest.approx(
                    len(g) / t_end * g[f"{name}_service_ms"].mean() / c, rel=1e-9)


def write_gr_table(folder, kv_bytes_per_token: int = 16384):
    """A synthetic GR cost table with the four relay phases (labelled illustrative).

    Shapes are smooth made-up functions; tests use it only to exercise relay logic.
    """
    import itertools

    import pandas as pd

    from simrec.calibration.table import write_table
    quantiles, spread = (0.1, 0.5, 0.9, 0.99), (0.9, 1.0, 1.15, 1.4)
    Ls, Ms = (256, 1024, 4096, 16384), (32, 128, 512, 1024)

    def full(L, M):
        return 0.5 + 2e-4 * L + 1e-3 * M + 2e-8 * L * L

    rows = []
    for L, M in itertools.product(Ls, Ms):
        for q, k in zip(quantiles, spread):
            rows.append(("full_forward", "isolated", L, M, q, full(L, M) * k, 100))
            rows.append(("rank_cached", "isolated", L, M, q, (0.3 + 1e-3 * M + 2e-5 * L) * k, 100))
    for L in Ls:
        for q, k in zip(quantiles, spread):
            rows.append(("prefix_encode", "isolated", L, 0, q, full(L, 0) * k, 100))
            rows.append(("prefix_reload", "isolated", L, 0, q,
                         (0.02 + L * kv_bytes_per_token / 25e9 * 1e3) * k, 100))
    frame = pd.DataFrame(rows, columns=["phase", "condition", "history_len", "candidates",
                                        "quantile", "time_ms", "n_samples"])
    write_table(frame, folder, {
        "format_version": 1, "name": "synthetic_gr", "label": "illustrative",
        "device": {"name": "none"}, "date": "2026-11-23",
        "model": {"kv_bytes_per_token": kv_bytes_per_token},
        "grid": {"history_len": list(Ls), "candidates": list(Ms)}})
    return str(folder)


@pytest.fixture(scope="session")
def gr_table(tmp_path_factory):
    return write_gr_table(tmp_path_factory.mktemp("tables") / "synthetic_gr")


CACHE_OPS = ("reserve", "reserve_unpinned", "fill", "unpin", "lookup", "discard")


def apply_cache_op(cache, op: str, user: int, nbytes: int, now: float):
    """One random-test operation on a PrefixCache, skipped where it would misuse the API
    (reserve of a present user, fill of a ready or absent entry, ...). Returns reserve()'s
    result when a reserve ran, else True."""
    entry = cache.entries.get(user)
    if op.startswith("reserve"):
        return cache.reserve(user, nbytes, now, pin=op == "reserve") if entry is None else True
    if op == "fill" and entry is not None and not entry.ready:
        cache.fill(user, now)
    elif op == "unpin" and entry is not None:
        cache.unpin(user)
    elif op == "lookup":
        cache.lookup(user, now)
    elif op == "discard" and entry is not None:
        cache.discard(user)
    return True


def check_cache_accounting(cache, pinned_before, op: str, user: int) -> None:
    """Bytes bounded and consistent; pinned entries survive all but their own discard."""
    assert 0 <= cache.pinned <= cache.used <= cache.capacity
    assert cache.used == sum(e.nbytes for e in cache.entries.values())
    assert cache.pinned == sum(e.nbytes for e in cache.entries.values() if e.pins)
    gone = {user} if op == "discard" else set()
    assert set(pinned_before) - gone <= set(cache.entries)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind and, for files, a content hash (FIFOs are not opened)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) \
                and st.st_size < 2**24 else st.st_size
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), digest)
    return out
