"""The simulator against queueing theory.

Each check runs independent replications (warm-up removed) and asserts that the
theoretical value lies inside the 99% Student-t interval of the replication estimates.
The tolerance is the interval the data gives, not a tuned number; seeds are fixed only so
the suite is reproducible.
"""

from __future__ import annotations

import math

import pytest

import simrec
from conftest import check_invariants, ci_contains, scenario, station


def erlang_c(c: int, lam: float, mu: float) -> float:
    """P(wait) in M/M/c."""
    a = lam / mu
    rho = a / c
    top = a**c / math.factorial(c) / (1 - rho)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def mean_waits(results, stage: str) -> list[float]:
    return results.metric("stages", stage, "mean_wait_ms")["replications"]


def test_mm1_mean_wait_and_p99_sojourn():
    lam, mean_s = 70.0, 10.0   # rho = 0.7
    res = simrec.simulate(scenario({"q": station(1)}, lam, requests=30_000))
    check_invariants(res)
    mu = 1000 / mean_s
    wq = 1000 * (lam / mu) / (mu - lam)                      # ms
    ok, est, half = ci_contains(mean_waits(res, "q"), wq)
    assert ok, (est, half, wq)
    # Sojourn time in M/M/1 FIFO is exponential with rate mu - lambda.
    p99 = 1000 * math.log(100) / (mu - lam)
    ok, est, half = ci_contains(res.metric("e2e", "p99_ms")["replications"], p99)
    assert ok, (est, half, p99)


def test_mmc_erlang_c_shipped_scenario():
    sc = simrec.load_scenario("scenarios/mmc.yaml", ["run.requests=30000"])
    res = simrec.simulate(sc)
    check_invariants(res)
    c, lam, mu = 3, 240.0, 100.0
    wq = 1000 * erlang_c(c, lam, mu) / (c * mu - lam)
    assert wq == pytest.approx(10.79, abs=0.01)              # the figure quoted in the file
    ok, est, half = ci_contains(mean_waits(res, "server"), wq)
    assert ok, (est, half, wq)


def test_md1_pollaczek_khinchine():
    lam, d = 70.0, 10.0
    res = simrec.simulate(scenario({"q": station(1, {"kind": "constant", "ms": d})}, lam))
    check_invariants(res)
    rho = lam * d / 1000
    wq = rho * d / (2 * (1 - rho))
    ok, est, half = ci_contains(mean_waits(res, "q"), wq)
    assert ok, (est, half, wq)


def test_mg1_lognormal_pollaczek_khinchine():
    lam, mean_s, cv = 70.0, 10.0, 0.5
    res = simrec.simulate(scenario(
        {"q": station(1, {"kind": "lognormal", "mean_ms": mean_s, "cv": cv})}, lam))
    check_invariants(res)
    lam_ms = lam / 1000
    es2 = (1 + cv**2) * mean_s**2
    wq = lam_ms * es2 / (2 * (1 - lam_ms * mean_s))
    ok, est, half = ci_contains(mean_waits(res, "q"), wq)
    assert ok, (est, half, wq)


def test_jackson_tandem_of_mmc_stations():
    lam = 80.0
    spec = [(2, 15.0), (1, 8.0), (4, 40.0)]                  # (servers, mean service ms)
    stages = {f"s{i}": station(c, {"kind": "exponential", "mean_ms": m}) for i, (c, m) in enumerate(spec)}
    res = simrec.simulate(scenario(stages, lam, requests=25_000))
    check_invariants(res)
    total = 0.0
    for c, m in spec:
        mu = 1000 / m
        total += 1000 * erlang_c(c, lam, mu) / (c * mu - lam) + m
    ok, est, half = ci_contains(res.metric("e2e", "mean_ms")["replications"], total)
    assert ok, (est, half, total)


def test_utilisation_matches_offered_load():
    lam, mean_s, c = 240.0, 10.0, 3
    res = simrec.simulate(scenario({"q": station(c)}, lam))
    ok, est, half = ci_contains(res.metric("utilisation", "q", "stage")["replications"],
                                lam * mean_s / 1000 / c)
    assert ok, (est, half)
