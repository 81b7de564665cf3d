"""Issue 14, class 8: a run whose offered load exceeds its capacity.

Throughput counts the requests that completed inside the measurement window (not those
finished while the backlog drained after it), the not-settled warning comes with one
replication too, and memory stays within what the loader budgets per request.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import simrec
from conftest import scenario, station
from simrec import loader
from simrec.results import warmup_ms

# One server, constant 10/3 ms: capacity exactly 300 req/s.
CAPACITY = 300.0


def server(rate: float, requests: int = 20_000, replications: int = 3, **run):
    return scenario({"q": station(1, {"kind": "constant", "ms": 1000 / CAPACITY})}, rate,
                    requests=requests, replications=replications, **run)


def test_throughput_of_an_overloaded_run_is_its_capacity():
    res = simrec.simulate(server(600.0))
    m = res.summary["metrics"]
    assert m["offered_rps"]["mean"] == pytest.approx(600, rel=0.03)
    for rep, thr in zip(res.replications, m["throughput_rps"]["replications"]):
        window_s = (rep.end_ms - warmup_ms(res.scenario, rep)) / 1000
        # One constant-time server completes at most one request per 10/3 ms, and with a
        # backlog it is never idle: window / (10/3 ms) completions, +-1 at the edges.
        assert abs(thr * window_s - CAPACITY * window_s) <= 1 + 1e-6, (thr, window_s)
    assert m["goodput_rps"]["mean"] <= m["throughput_rps"]["mean"]


def test_throughput_conserves_requests_in_the_window():
    # Stable load: completions in the window [cut, end] = arrivals in it + those in the
    # system at its start - those still in it at its end, exactly (conservation); so
    # throughput equals the offered rate but for the two edges.
    res = simrec.simulate(scenario({"q": station(2)}, 150.0, requests=5000, replications=3))
    m = res.summary["metrics"]
    req = res.requests.to_pandas()
    for rep, thr, off in zip(res.replications, m["throughput_rps"]["replications"],
                             m["offered_rps"]["replications"]):
        g = req[req["replication"] == rep.index]
        cut, end = warmup_ms(res.scenario, rep), rep.end_ms
        arr, done = g["arrival_ms"].to_numpy(), g["completion_ms"].to_numpy()
        window_s = (end - cut) / 1000
        at_start = int(np.sum((arr < cut) & (done >= cut)))
        at_end = int(np.sum(done > end))
        assert round(thr * window_s) == round(off * window_s) + at_start - at_end
        assert abs(thr - off) * window_s <= max(at_start, at_end)


@pytest.mark.parametrize("replications", [1, 3])
def test_overload_warns_even_with_one_replication(replications):
    res = simrec.simulate(server(600.0, requests=10_000, replications=replications))
    assert any("not settled" in w for w in res.summary["warnings"]), res.summary["warnings"]


def test_stable_single_replication_rarely_warns():
    # The one-replication check (batch means of the two halves) must not cry wolf: at
    # rho 0.5 it may fire by chance (a 95% interval and a 5% size threshold), not often.
    warned = sum(any("not settled" in w for w in simrec.simulate(
        scenario({"q": station(1)}, 50.0, requests=10_000, replications=1, seed=s)).summary["warnings"])
        for s in range(20))
    assert warned <= 3, warned      # P(> 3 of 20) < 0.02 at a 5% false-alarm rate


def peak_bytes_per_request(sc) -> float:
    import scipy.optimize  # noqa: F401  (imported before tracing: module memory is not the run's)
    import scipy.stats  # noqa: F401
    tracemalloc.start()
    try:
        simrec.simulate(sc)
        return tracemalloc.get_traced_memory()[1] / sc.run.requests
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_overload_memory_within_the_loaders_budget(engine):
    # One replication; the loader budgets BYTES_PER_REQUEST of run state per request plus
    # BYTES_PER_RECORD per kept record column: an overloaded run (a backlog of half its
    # requests) must stay inside that, as a stable one does.
    n = 20_000
    budget = loader.BYTES_PER_REQUEST + loader.BYTES_PER_RECORD * (2 + 3 * 1)
    stable = peak_bytes_per_request(server(150.0, n, 1, engine=engine))
    over = peak_bytes_per_request(server(600.0, n, 1, engine=engine))
    assert stable <= budget and over <= budget, (stable, over, budget)
    if engine == "fast":     # the stage-by-stage engine holds no per-request process at all
        assert over <= 1.25 * stable, (stable, over)
