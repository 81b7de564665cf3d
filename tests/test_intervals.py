"""Issue 14, class 7: every interval in summary.json lies inside its quantity's range, and
says how it was made.

Proportions (SLO attainment, hit rates, fractions, utilisation) get a Korn-Graubard
(Clopper-Pearson at the effective sample size) interval inside [0, 1]; latency percentiles
the pooled percentile with an interval of sample values; every other figure a Student-t
cut at 0. summary.json names the method per metric path pattern (`interval_methods`).
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simrec
from conftest import scenario, station
from simrec import stats
from simrec.results import flat_metrics


def walk(node, path=""):
    """(dotted path, interval node) for every interval in a summary's metrics."""
    if isinstance(node, dict) and "mean" in node and "replications" in node:
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, path)


def check_summary_intervals(summary: dict) -> int:
    """Every interval within its kind's range and around its centre; returns how many."""
    methods = summary["interval_methods"]
    n = 0
    for path, m in walk(summary["metrics"]):
        kind = stats.metric_kind(path)
        pattern = next(p for p in methods if fnmatch.fnmatchcase(path, p))
        assert methods[pattern] == stats.KINDS[kind], path
        if m["lo"] is None:
            continue
        n += 1
        assert m["lo"] <= m["mean"], (path, m)
        assert m["hi"] is None or m["mean"] <= m["hi"], (path, m)
        assert m["lo"] >= 0, (path, m)
        if kind == "proportion":
            assert m["hi"] is not None and m["hi"] <= 1, (path, m)
    return n


# ------------------------------------------------------------------ the cases
def test_tiny_slo_attainment_stays_inside_0_1():
    # The issue's `0.0001 [-0.0002, 0.0005]`: one replication in eight met the SLO once.
    r = stats.interval([0, 0, 0, 0.0008, 0, 0, 0, 0], kind="proportion")
    assert r["mean"] == pytest.approx(0.0001)
    assert 0 <= r["lo"] <= r["mean"] <= r["hi"] <= 1
    t = stats.interval([0, 0, 0, 0.0008, 0, 0, 0, 0])            # the plain t, for contrast
    assert t["lo"] < 0


def test_all_replications_agree_on_a_proportion():
    # No spread: the replications are the unit (Clopper-Pearson with n = 8, no t factor: it
    # is for an estimated variance), never [1, 1]; 3 agreeing give [0.29, 1], not [0.003, 1].
    r = stats.interval([1.0] * 8, kind="proportion")
    assert r["hi"] == 1 and r["lo"] == pytest.approx(0.025 ** (1 / 8), rel=1e-6)
    assert stats.interval([1.0] * 3, kind="proportion")["lo"] == pytest.approx(0.025 ** (1 / 3), rel=1e-6)
    r = stats.interval([0.0] * 8, kind="proportion")
    assert r["lo"] == 0 and 0 < r["hi"] < 1


def test_rounding_at_the_edge_of_a_proportion():
    r = stats.interval([1.0000000000000002, 1.0, 0.9999999999999999], kind="proportion")
    assert r["hi"] <= 1 and r["mean"] <= 1


def test_heavy_tailed_means_never_negative():
    v = [40.0, 42.0, 39.0, 5000.0]                                # one replication in a slow spell
    assert stats.interval(v)["lo"] < 0                           # what the t interval said
    r = stats.interval(v, kind="nonnegative")
    assert r["lo"] == 0 and r["hi"] == stats.interval(v)["hi"]   # cut at 0, the rest as t


def test_percentile_bounds_are_sample_values_never_negative():
    rng = np.random.default_rng(3)
    # Replications of very different scale (the P99 lower bound of -462 ms).
    samples = [rng.exponential(s, 2000) for s in (5, 6, 5, 400, 5, 7)]
    per_rep = stats.interval([np.percentile(s, 99) for s in samples])
    assert per_rep["lo"] < 0
    r = stats.pooled_percentile(samples, 99)
    lo = r["lo"] if r["lo"] is not None else r["lo_one_sided"]
    assert 0 <= lo <= r["mean"] and (r["hi"] is None or r["mean"] <= r["hi"])
    pooled = np.concatenate(samples)
    assert r["mean"] == pytest.approx(np.percentile(pooled, 99))
    assert lo in pooled and (r["hi"] is None or r["hi"] in pooled)


def test_percentile_unbounded_above_when_the_data_cannot_bound_it():
    # 2 replications of 30 samples: nothing bounds a P99 from above.
    rng = np.random.default_rng(1)
    r = stats.pooled_percentile([rng.exponential(10, 30), rng.exponential(10, 30)], 99)
    assert r["hi"] is None and r["lo"] is None and r["mean"] is not None
    assert 0 <= r["lo_one_sided"] <= r["mean"]                  # what is known: a lower bound


def test_unfinished_requests():
    # inf latencies: a P50 stays finite, a percentile inside the unfinished part is null.
    s = [np.r_[np.arange(1.0, 91.0), np.full(10, np.inf)] for _ in range(3)]
    assert stats.pooled_percentile(s, 50)["mean"] == pytest.approx(50.0)
    r = stats.pooled_percentile(s, 99)
    assert r["mean"] is None and r["lo"] is None and r["hi"] is None
    assert stats.interval([1.0, math.inf], kind="nonnegative")["lo"] is None


# ------------------------------------------------------------------ properties
proportions = st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=40)
positives = st.lists(st.floats(0, 1e9, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=300, deadline=None)
@given(proportions, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_proportion_interval_inside_0_1(v, level):
    r = stats.interval(v, level, kind="proportion")
    assert 0 <= r["lo"] <= r["mean"] <= r["hi"] <= 1


@settings(max_examples=300, deadline=None)
@given(positives)
def test_nonnegative_interval_never_negative(v):
    r = stats.interval(v, kind="nonnegative")
    assert 0 <= r["lo"] <= r["mean"] * (1 + 1e-12) <= r["hi"] * (1 + 1e-12) + 1e-300


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(1, 300), st.floats(0.5, 99.5), st.integers(0, 2**32 - 1))
def test_pooled_percentile_within_the_samples(reps, n, q, seed):
    rng = np.random.default_rng(seed)
    samples = [rng.lognormal(rng.normal(0, 1), rng.uniform(0.1, 2), n) for _ in range(reps)]
    r = stats.pooled_percentile(samples, q)
    pooled = np.concatenate(samples)
    lo = r["lo"] if r["hi"] is not None else r["lo_one_sided"]
    assert (r["lo"] is None) == (r["hi"] is None)
    assert 0 <= lo <= r["mean"] and (r["hi"] is None or r["mean"] <= r["hi"] <= pooled.max())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,message", [
    (lambda: stats.interval([0.5, 1.5], kind="proportion"), "proportion must lie in [0, 1]"),
    (lambda: stats.interval([1.0, -2.0], kind="nonnegative"), "negative"),
    (lambda: stats.interval([1.0, 2.0], kind="ratio"), "kind must be"),
    (lambda: stats.interval([1.0, 2.0], level=1.5), "level must be in (0, 1)"),
    (lambda: stats.interval([[1.0, 2.0]]), "one number per replication"),
    (lambda: stats.pooled_percentile([[1.0, np.nan]], 50), "must not be NaN"),
    (lambda: stats.pooled_percentile([[1.0]], 100), "percentile must be in (0, 100)"),
    (lambda: stats.trend([[1.0]], [[]]), "none empty"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ coverage of proportions
def test_slo_attainment_interval_covers_exact_mm1():
    # M/M/1 sojourn is exponential at mu - lambda: P(T <= slo) = 1 - exp(-(mu - lambda) slo).
    lam, mu, slo_ms = 70.0, 100.0, 100.0                          # conftest's SLO: 100 ms
    exact = 1 - math.exp(-(mu - lam) * slo_ms / 1000)             # 0.950
    covered = 0
    seeds = range(3000, 3040)
    for seed in seeds:
        sc = scenario({"q": station(1)}, lam, requests=2000, replications=6, seed=seed)
        assert sc.slo.p99_ms == slo_ms
        m = simrec.simulate(sc).metric("slo_attainment")
        assert 0 <= m["lo"] <= m["hi"] <= 1
        covered += m["lo"] <= exact <= m["hi"]
    assert covered >= 0.9 * len(seeds), covered


# ------------------------------------------------------------------ whole summaries
def test_every_interval_of_a_relay_run_in_range():
    sc = simrec.load_scenario("scenarios/relay.yaml", ["run.duration_s=2", "run.replications=3"])
    summary = simrec.simulate(sc).summary
    assert summary["ci"]["method"] == stats.CI_METHOD_PER_METRIC
    assert check_summary_intervals(summary) > 10
    row = flat_metrics(summary)
    assert all(row[k] is None or row[k] >= 0 for k in row if k.endswith("_lo"))


def test_every_interval_of_an_overloaded_run_in_range():
    # 2x overload, a tight SLO: attainment near 0, latencies with a trend between replications.
    sc = scenario({"q": station(1, {"kind": "exponential", "mean_ms": 10.0})}, 200.0,
                  requests=3000, replications=4)
    summary = simrec.simulate(sc).summary
    assert check_summary_intervals(summary) > 5
    att = summary["metrics"]["slo_attainment"]
    assert 0 <= att["lo"] <= att["hi"] <= 1


# ------------------------------------------------------------------ autocorrelation time

def _ar1(phi: float, n: int, rng) -> np.ndarray:
    from scipy.signal import lfilter
    return lfilter([1.0], [1.0, -phi], rng.standard_normal(n))


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_iact_of_an_ar1_series(phi):
    # AR(1): tau = (1 + phi) / (1 - phi). Geyer's estimator over a window of about M lags
    # has a relative sd of about sqrt((4M + 2) / n); at n = 400,000 and M ~ 5 tau that is
    # under 3.5% for phi 0.9, so 15% is over 4 sd.
    rng = np.random.default_rng(7)
    parts = [_ar1(phi, 100_000, rng) for _ in range(4)]    # independent pieces, as replications
    tau = (1 + phi) / (1 - phi)
    assert stats.iact(parts) == pytest.approx(tau, rel=0.15)


def test_iact_edges():
    assert stats.iact([np.ones(50), np.ones(50)]) == 1.0         # no variation
    assert math.isnan(stats.iact([np.array([1.0, np.inf, 2.0])]))  # an unfinished request
    assert math.isnan(stats.iact([]))
