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


# ------------------------------------------------------------------ percentile coverage
# Issue 14, class 9. The exact M/M/1 and M/M/c sojourn-time percentiles against the 95%
# intervals of simrec's summary, over many seeds: the interval must cover the exact value
# at about its nominal rate, at short and long replications, with and without the stopping
# rule. (The old estimator, the mean of per-replication P99s with a t interval, covered the
# M/M/1 rho 0.9 P99 in 71 of 100 seeds: a percentile is not linear in the samples, so short
# replications bias it low.) A binomial count of 40 at a true 95% falls under 36 with
# probability 0.14; the seeds are fixed for reproducibility, not chosen.

SEEDS = range(2000, 2040)


def mmc_sojourn_percentile(c: int, lam: float, mu: float, q: float) -> float:
    """Exact q-th percentile (ms) of the FIFO M/M/c sojourn time: the wait is 0 with
    probability 1 - C (Erlang C), else exponential at c mu - lambda; plus Exp(mu) service."""
    from scipy.optimize import brentq
    C, th = erlang_c(c, lam, mu), c * mu - lam

    def survival(t):
        tail = (th * math.exp(-mu * t) - mu * math.exp(-th * t)) / (th - mu) if th != mu \
            else (1 + mu * t) * math.exp(-mu * t)
        return (1 - C) * math.exp(-mu * t) + C * tail
    return 1000 * brentq(lambda t: survival(t) - (1 - q / 100), 0.0, 1e3)


def test_mmc_percentile_closed_form():
    # c = 1 is M/M/1: exponential sojourn at mu - lambda.
    assert mmc_sojourn_percentile(1, 70, 100, 99) == pytest.approx(1000 * math.log(100) / 30, rel=1e-9)
    assert mmc_sojourn_percentile(1, 70, 100, 50) == pytest.approx(1000 * math.log(2) / 30, rel=1e-9)
    # M/M/3 at 240/s, 10 ms: the mean of the same distribution is Wq + 1/mu (Erlang C).
    from scipy.integrate import quad
    mean = quad(lambda q: mmc_sojourn_percentile(3, 240, 100, q), 1e-9, 100 - 1e-9, limit=200)[0] / 100
    assert mean == pytest.approx(10.79 + 10, abs=0.02)


def coverage(c: int, lam: float, requests: int, replications: int, **run) -> dict:
    """Per percentile: seeds whose 95% interval covers the exact value, and seeds with an
    upper bound at all (an unbounded one says the data cannot bound the percentile)."""
    exact = {k: mmc_sojourn_percentile(c, lam, 100.0, q) for k, q in (("p50_ms", 50), ("p99_ms", 99))}
    out = {k: {"covered": 0, "bounded": 0, "replications": []} for k in exact}
    out["short"] = 0
    for seed in SEEDS:
        res = simrec.simulate(scenario({"q": station(c)}, lam, requests=requests,
                                       replications=replications, seed=seed, **run))
        short = any(w.startswith("replications are short") for w in res.summary["warnings"])
        out["short"] += short
        for k, x in exact.items():
            m = res.metric("e2e", k)
            lo = m["lo"] if m["hi"] is not None else m["lo_one_sided"]   # (unbounded above)
            assert 0 <= lo <= m["mean"] and (m["hi"] is None or m["mean"] <= m["hi"])
            covered = lo <= x and (m["hi"] is None or x <= m["hi"])
            out[k]["covered"] += covered
            out[k]["silent_misses"] = out[k].get("silent_misses", 0) + (not covered and not short)
            out[k]["bounded"] += m["hi"] is not None
            out[k]["replications"].append(res.summary["replications"])
    return out


def check_coverage(cov: dict, bounded_at_least: float = 0.9) -> None:
    n = len(SEEDS)
    for k, v in cov.items():
        if k == "short":
            continue
        assert v["covered"] >= 0.9 * n, (k, v["covered"], n)
        # ... and not by giving up: the interval has an upper bound in most seeds.
        assert v["bounded"] >= bounded_at_least * n, (k, v["bounded"], n)


@pytest.mark.parametrize("c,lam,requests,replications", [
    (1, 70.0, 2_000, 10),      # M/M/1 at rho 0.7, short: 1,800 measured requests a replication
    (1, 70.0, 8_000, 8),       # long
    (3, 180.0, 2_000, 10),     # M/M/3 at rho 0.6, short
    (3, 180.0, 8_000, 8),      # long
])
def test_percentile_interval_coverage(c, lam, requests, replications):
    check_coverage(coverage(c, lam, requests, replications))


def test_percentile_interval_coverage_in_heavy_traffic():
    # M/M/3 at rho 0.8, 7,200 measured requests a replication: about 126 latency
    # autocorrelation times each, long enough (no short-replication warning).
    cov = coverage(3, 240.0, 8_000, 10)
    check_coverage(cov)
    assert cov["short"] <= 0.1 * len(SEEDS), cov["short"]


def test_short_replications_are_warned_of():
    # The same system at 1,800 measured requests a replication (about 39 autocorrelation
    # times): its P99 interval covered the exact value in 31 of these 40 seeds (77.5%), and
    # M/M/1 at rho 0.9 with 9,000 (about 30) in 35 of 40, too few for a 95% interval. The
    # run cannot see the tail episodes it did not have, so it says its replications are short
    # (in 34 of these 40 seeds; the threshold, 50, lies between 39, which undercovered, and
    # 48 (M/M/1 rho 0.8, 3,600 requests), which covered 38 of 40).
    cov = coverage(3, 240.0, 2_000, 10)
    assert cov["short"] >= 0.75 * len(SEEDS), cov["short"]
    # A miss the run did not warn of is no more common than the coverage tests above allow
    # (3 of 40 here, of the 9 misses).
    assert cov["p99_ms"]["silent_misses"] <= 0.1 * len(SEEDS), cov


def test_percentile_interval_coverage_with_stopping_rule_in_heavy_traffic():
    # M/M/3 at rho 0.8, long replications: the rule stops at 10 or more (a rule judging
    # from 3 up covered 34 of these 40 seeds: it stopped where the spread looked small).
    cov = coverage(3, 240.0, 8_000, replications=3, p99_halfwidth_rel=0.15, max_replications=30)
    check_coverage(cov, bounded_at_least=1.0)
    assert min(cov["p99_ms"]["replications"]) >= 10


def test_percentile_interval_coverage_with_stopping_rule():
    cov = coverage(1, 50.0, 2_000, replications=3, p99_halfwidth_rel=0.1, max_replications=40)
    check_coverage(cov, bounded_at_least=1.0)      # the rule stops only once it is bounded
    reps = cov["p99_ms"]["replications"]
    assert max(reps) > 3, reps                     # the rule did add replications
