"""The offered load (simrec.workload): arrival processes, user population, distributions.

Every statistical check compares a sample with its sampling distribution: counts of a
Poisson process in an interval are Poisson(integral of the rate), so they must lie within
4 standard deviations (sqrt of the mean); frequencies are binomial; sample means use the
known standard deviation over sqrt(n). With fixed seeds every test is deterministic; the
4-sigma bands say how surprising a failure would be if the code were right (~6e-5 each).
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from simrec import scenario as sc
from simrec import workload
from simrec.errors import InputError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_poisson_count(n: int, mean: float, what: str = "") -> None:
    """A Poisson(mean) count must lie within 4 sigma = 4 sqrt(mean) of its mean."""
    assert abs(n - mean) < 4 * math.sqrt(mean), f"{what}: {n} arrivals, expected {mean:.1f}"


# ---------------------------------------------------------------- Poisson
def test_poisson_count_over_horizon_matches_rate():
    rate, T = 500.0, 200.0
    t = workload.arrival_times_s(sc.PoissonArrivals(kind="poisson"), rate, rng(1), T, None)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < T
    assert_poisson_count(len(t), rate * T)
    # Gaps of a Poisson process are Exp(rate); their sample mean has sd (1/rate)/sqrt(n).
    gaps = np.diff(t)
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(len(gaps))


def test_poisson_with_count_gives_exactly_that_many_exponential_gaps():
    rate, count = 250.0, 50_000
    t = workload.arrival_times_s(sc.PoissonArrivals(kind="poisson"), rate, rng(2), None, count)
    assert len(t) == count
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps > 0)
    # mean of n Exp(rate) draws: sd (1/rate)/sqrt(n)
    assert abs(gaps.mean() * rate - 1) < 4 / math.sqrt(count)
    # sample variance of Exp(rate): Var(s^2) ~ (mu4 - sigma^4)/n = 8/(rate^4 n), so the
    # normalised variance s^2 rate^2 has sd sqrt(8/n) around 1 (exponential: cv = 1).
    assert abs(gaps.var() * rate**2 - 1) < 4 * math.sqrt(8 / count)


# ---------------------------------------------------------------- time-varying rates
def diurnal_integral(rate, amp, period, phase, a, b):
    """Integral of rate (1 + amp sin(2 pi (t + phase)/period)) over [a, b]."""
    w = 2 * math.pi / period
    return rate * ((b - a) - amp / w * (math.cos(w * (b + phase)) - math.cos(w * (a + phase))))


def test_diurnal_counts_per_segment_match_the_rate_integral():
    rate, amp, period, phase, T = 400.0, 0.6, 20.0, 3.0, 40.0
    arr = sc.DiurnalArrivals(kind="diurnal", amplitude=amp, period_s=period, phase_s=phase)
    t = workload.arrival_times_s(arr, rate, rng(3), T, None)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < T
    # Counts of an inhomogeneous Poisson process in disjoint intervals are independent
    # Poisson(integral of the rate): check each eighth of a period.
    edges = np.arange(0, T + 1e-9, period / 8)
    counts = np.histogram(t, edges)[0]
    for (a, b), n in zip(zip(edges[:-1], edges[1:]), counts):
        assert_poisson_count(n, diurnal_integral(rate, amp, period, phase, a, b), f"[{a}, {b})")
    # and the two halves of a period differ as much as the sine says (not a flat rate)
    half = [np.sum((t >= a) & (t < a + period / 2)) for a in (0.0, period / 2)]
    expected = [diurnal_integral(rate, amp, period, phase, a, a + period / 2) for a in (0.0, period / 2)]
    for n, m in zip(half, expected):
        assert_poisson_count(n, m)
    assert abs(expected[0] - expected[1]) > 20 * math.sqrt(max(expected))


def test_diurnal_with_count():
    arr = sc.DiurnalArrivals(kind="diurnal", amplitude=0.9, period_s=10.0)
    t = workload.arrival_times_s(arr, 100.0, rng(4), None, 12_345)
    assert len(t) == 12_345 and np.all(np.diff(t) >= 0) and t[0] >= 0


STEPS = [(0.0, 1.0), (5.0, 3.0), (8.0, 0.0), (12.0, 0.5)]


def test_piecewise_counts_per_step_match_the_rate_integral():
    rate, T = 300.0, 20.0
    arr = sc.PiecewiseArrivals(kind="piecewise",
                               steps=[{"start_s": s, "factor": f} for s, f in STEPS])
    t = workload.arrival_times_s(arr, rate, rng(5), T, None)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < T
    ends = [s for s, _ in STEPS[1:]] + [T]
    for (start, factor), end in zip(STEPS, ends):
        n = int(np.sum((t >= start) & (t < end)))
        if factor == 0:
            assert n == 0
        else:
            assert_poisson_count(n, rate * factor * (end - start), f"step at {start}")
    np.testing.assert_array_equal(workload.rate_at(arr, rate, np.array([0, 4.99, 5, 9, 12, 100])),
                                  [300, 300, 900, 0, 150, 150])


def test_piecewise_with_count():
    arr = sc.PiecewiseArrivals(kind="piecewise",
                               steps=[{"start_s": 0, "factor": 0.2}, {"start_s": 2, "factor": 2}])
    t = workload.arrival_times_s(arr, 100.0, rng(6), None, 5000)
    assert len(t) == 5000
    # 2 s at 20/s (Poisson(40)) first, then 200/s: the first 40 +- 4 sqrt(40) arrivals are early
    assert_poisson_count(int(np.sum(t < 2)), 40.0)


@contextmanager
def time_limit(seconds: float):
    def fire(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_piecewise_count_with_a_final_zero_rate_is_refused():
    # A count could never be reached once the rate drops to 0 for good: the scenario is
    # rejected when loaded, and the generator refuses rather than loop forever.
    from simrec.loader import validate
    steps = [{"start_s": 0, "factor": 1}, {"start_s": 1, "factor": 0}]
    with pytest.raises(InputError, match="piecewise arrivals end at factor 0"):
        validate({"name": "x", "workload": {"rate_qps": 10, "arrivals": {"kind": "piecewise", "steps": steps}},
                  "stages": {"a": {"service": {"kind": "constant", "ms": 1}}},
                  "slo": {"p99_ms": 10}, "run": {"requests": 100}})
    arr = sc.PiecewiseArrivals(kind="piecewise", steps=steps)
    with time_limit(1.0), pytest.raises(ValueError):
        workload.arrival_times_s(arr, 10.0, rng(7), None, 100)


def test_piecewise_vanishing_factor_is_rejected():
    # Found by hypothesis: 5e-324 x rate underflows to a zero peak rate.
    with pytest.raises(ValueError, match="factor must be 0 or at least 1e-6"):
        sc.PiecewiseArrivals(kind="piecewise", steps=[{"start_s": 0, "factor": 5e-324}])


# ---------------------------------------------------------------- burst (MMPP)
def test_burst_long_run_rate_over_replications():
    rate, f, calm, burst, T, R = 200.0, 4.0, 0.4, 0.1, 120.0, 20
    arr = sc.BurstArrivals(kind="burst", burst_factor=f, mean_calm_s=calm, mean_burst_s=burst)
    counts = []
    for seed in range(R):
        t = workload.arrival_times_s(arr, rate, rng(100 + seed), T, None)
        assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < T
        counts.append(len(t))
    counts = np.array(counts, float)
    long_run = rate * (calm + f * burst) / (calm + burst)
    # The process starts calm, so over a finite horizon the expected time in burst is
    # pi_b (T - (1 - exp(-lam T)) / lam), lam = 1/calm + 1/burst; that start-up deficit is
    # ~0.1 qps here, far below the tolerance, but the exact target costs nothing.
    lam, pi_b = 1 / calm + 1 / burst, burst / (calm + burst)
    burst_time = pi_b * (T - (1 - math.exp(-lam * T)) / lam)
    exact = rate * (T + (f - 1) * burst_time) / T
    assert abs(exact - long_run) < 0.01 * long_run
    # Replications are i.i.d.: a 99.9% t-interval for the mean rate must cover the target.
    rates = counts / T
    half = stats.t.ppf(0.9995, R - 1) * rates.std(ddof=1) / math.sqrt(R)
    assert abs(rates.mean() - exact) < half, (rates.mean(), exact, half)
    # the interval is tight enough to mean something (here about +-2.5% of the rate)
    assert half < 0.05 * exact
    # An MMPP is over-dispersed: under a Poisson null, (R-1) s^2 / mean ~ chi2(R-1); the
    # observed dispersion must exceed its 99.9% point (the bursts are really there).
    assert (R - 1) * counts.var(ddof=1) / counts.mean() > stats.chi2.ppf(0.999, R - 1)


def test_burst_with_count():
    arr = sc.BurstArrivals(kind="burst")
    t = workload.arrival_times_s(arr, 50.0, rng(8), None, 4321)
    assert len(t) == 4321 and np.all(np.diff(t) >= 0) and t[0] >= 0


# ---------------------------------------------------------------- users
def test_zipf_popularity():
    s, U, n = 1.2, 1000, 200_000
    pop = workload.UserPopulation(sc.Users(count=U, zipf_s=s), rng(9))
    uid = pop.pick(rng(10), n)
    assert uid.min() >= 0 and uid.max() < U
    freq = np.bincount(uid, minlength=U)
    assert np.argmax(freq) == 0
    # Given n0 + n1 = m picks of ranks 1 and 2, n0 ~ Bin(m, 2^s / (1 + 2^s)).
    m, p = freq[0] + freq[1], 2**s / (1 + 2**s)
    assert abs(freq[0] - m * p) < 4 * math.sqrt(m * p * (1 - p))
    assert freq[0] / freq[1] == pytest.approx(2**s, rel=0.05)
    # Rank 1's share is Bin(n, 1 / H(U, s)).
    p0 = 1 / np.sum(np.arange(1, U + 1, dtype=float) ** -s)
    assert abs(freq[0] - n * p0) < 4 * math.sqrt(n * p0 * (1 - p0))


def test_zipf_zero_is_uniform():
    U, n = 50, 100_000
    pop = workload.UserPopulation(sc.Users(count=U, zipf_s=0.0), rng(11))
    freq = np.bincount(pop.pick(rng(12), n), minlength=U)
    # chi-square goodness of fit against uniform, at the 99.9% point
    assert stats.chisquare(freq).statistic < stats.chi2.ppf(0.999, U - 1)


def test_history_lengths_are_clipped():
    mean, cv, lo, hi, U = 2000.0, 1.5, 100, 4000, 5000
    users = sc.Users(count=U, history_len={"kind": "lognormal", "mean": mean, "cv": cv},
                     min_history_len=lo, max_history_len=hi)
    h = workload.UserPopulation(users, rng(13)).history_len
    assert h.dtype == np.int64 and len(h) == U
    assert h.min() == lo and h.max() == hi
    # Lengths are rint(draw) clipped, so P(h == lo) = P(X < lo + 0.5), P(h == hi) = P(X >= hi - 0.5);
    # each count is Bin(U, p).
    sigma = math.sqrt(math.log1p(cv**2))
    X = stats.lognorm(s=sigma, scale=mean * math.exp(-sigma**2 / 2))
    for count, p in ((np.sum(h == lo), X.cdf(lo + 0.5)), (np.sum(h == hi), X.sf(hi - 0.5))):
        assert abs(count - U * p) < 4 * math.sqrt(U * p * (1 - p)), (count, U * p)


def test_history_lengths_without_upper_bound():
    users = sc.Users(count=2000, history_len={"kind": "uniform", "low": 0.2, "high": 50_000})
    h = workload.UserPopulation(users, rng(14)).history_len
    assert h.min() >= 1 and h.max() > 40_000


# ---------------------------------------------------------------- distributions
N = 200_000


def test_lognormal_draws_have_configured_mean_and_cv():
    mean, cv = 50.0, 0.5
    x = workload.draw(sc.LognormalDist(kind="lognormal", mean=mean, cv=cv), rng(15), N)
    assert np.all(x > 0)
    # sample mean: sd = mean * cv / sqrt(N)
    assert abs(x.mean() - mean) < 4 * mean * cv / math.sqrt(N)
    # log(x) is exactly normal(mu, sigma): mean within 4 sigma/sqrt(N), sd within 4 sigma/sqrt(2N)
    sigma = math.sqrt(math.log1p(cv**2))
    mu = math.log(mean) - sigma**2 / 2
    lx = np.log(x)
    assert abs(lx.mean() - mu) < 4 * sigma / math.sqrt(N)
    assert abs(lx.std() - sigma) < 4 * sigma / math.sqrt(2 * N)


def test_uniform_draws():
    lo, hi = 2.0, 8.0
    x = workload.draw(sc.UniformDist(kind="uniform", low=lo, high=hi), rng(16), N)
    assert x.min() >= lo and x.max() <= hi
    assert abs(x.mean() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * N)
    # and it fills the range: each tenth holds Bin(N, 0.1)
    counts = np.histogram(x, np.linspace(lo, hi, 11))[0]
    assert np.all(np.abs(counts - N / 10) < 4 * math.sqrt(N * 0.1 * 0.9))


def test_constant_draws():
    x = workload.draw(sc.ConstantDist(kind="constant", value=7.5), rng(17), 100)
    np.testing.assert_array_equal(x, np.full(100, 7.5))


@pytest.mark.parametrize("weights", [[1.0, 2.0, 7.0], None])
def test_empirical_draws_follow_weights(weights):
    values = [1.0, 5.0, 10.0]
    x = workload.draw(sc.EmpiricalDist(kind="empirical", values=values, weights=weights), rng(18), N)
    assert set(np.unique(x)) <= set(values)
    p = np.array(weights or [1, 1, 1], float)
    p /= p.sum()
    for v, pv in zip(values, p):
        assert abs(np.sum(x == v) - N * pv) < 4 * math.sqrt(N * pv * (1 - pv))
    mean = float(np.dot(values, p))
    sd = math.sqrt(float(np.dot(p, (np.array(values) - mean) ** 2)))
    assert abs(x.mean() - mean) < 4 * sd / math.sqrt(N)


# ---------------------------------------------------------------- generate
ARRIVALS = [
    {"kind": "poisson"},
    {"kind": "diurnal", "amplitude": 0.5, "period_s": 10},
    {"kind": "piecewise", "steps": [{"start_s": 0, "factor": 1}, {"start_s": 5, "factor": 2}]},
    {"kind": "burst", "mean_calm_s": 2, "mean_burst_s": 1},
]


def make_workload(arrivals: dict) -> sc.Workload:
    return sc.Workload(rate_qps=200, arrivals=arrivals,
                       users=sc.Users(count=500, zipf_s=0.9, max_history_len=8000),
                       candidates={"kind": "uniform", "low": 0.1, "high": 400})


@pytest.mark.parametrize("arrivals", ARRIVALS, ids=[a["kind"] for a in ARRIVALS])
def test_same_seed_same_requests(arrivals):
    w, run = make_workload(arrivals), sc.RunControl(duration_s=10)
    a = workload.generate(w, run, rng(42))
    b = workload.generate(w, run, rng(42))
    c = workload.generate(w, run, rng(43))
    assert len(a) > 0
    for col in ("arrival_ms", "user_id", "history_len", "candidates"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert len(a) != len(c) or not np.array_equal(a.arrival_ms, c.arrival_ms)


@pytest.mark.parametrize("arrivals", ARRIVALS, ids=[a["kind"] for a in ARRIVALS])
def test_generated_batch_invariants(arrivals):
    batch = workload.generate(make_workload(arrivals), sc.RunControl(requests=3000), rng(44))
    assert len(batch) == 3000
    assert np.all(np.diff(batch.arrival_ms) >= 0) and batch.arrival_ms[0] >= 0
    assert batch.user_id.dtype == batch.history_len.dtype == batch.candidates.dtype == np.int64
    assert batch.user_id.min() >= 0 and batch.user_id.max() < 500
    assert batch.candidates.min() >= 1 and batch.candidates.max() <= 400
    assert batch.history_len.min() >= 1 and batch.history_len.max() <= 8000
    # a user's history length is drawn once: every request of a user carries the same L
    order = np.lexsort((batch.history_len, batch.user_id))
    uid, L = batch.user_id[order], batch.history_len[order]
    same_user = uid[1:] == uid[:-1]
    assert np.all(L[1:][same_user] == L[:-1][same_user])
    assert same_user.any()


# ---------------------------------------------------------------- property: piecewise
@st.composite
def piecewise_cases(draw, last_positive: bool = False):
    k = draw(st.integers(1, 5))
    gaps = draw(st.lists(st.floats(0.01, 3.0), min_size=k - 1, max_size=k - 1))
    starts = np.concatenate([[0.0], np.cumsum(gaps)]).tolist()
    # factors are 0 (a pause) or at least 0.01: a subnormal factor is a separate bug, below
    factors = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.01, 5.0)), min_size=k, max_size=k))
    if last_positive:
        factors[-1] = max(factors[-1], 0.1)
    elif max(factors) <= 0:
        factors[draw(st.integers(0, k - 1))] = 1.0
    rate = draw(st.floats(0.5, 200.0))
    horizon = draw(st.floats(0.1, 10.0))
    steps = [{"start_s": s, "factor": f} for s, f in zip(starts, factors)]
    return sc.PiecewiseArrivals(kind="piecewise", steps=steps), rate, horizon


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=piecewise_cases(), seed=st.integers(0, 2**32 - 1))
def test_piecewise_arrivals_property(case, seed):
    arr, rate, horizon = case
    t = workload.arrival_times_s(arr, rate, rng(seed), horizon, None)
    assert np.all(np.diff(t) >= 0)
    assert np.all(t >= 0) and np.all(t < horizon)
    # no arrival while a step's factor is 0
    assert np.all(workload.rate_at(arr, rate, t) > 0)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(case=piecewise_cases(last_positive=True), seed=st.integers(0, 2**32 - 1),
       count=st.integers(1, 2000))
def test_piecewise_arrivals_with_count_property(case, seed, count):
    arr, rate, _ = case
    t = workload.arrival_times_s(arr, rate, rng(seed), None, count)
    assert len(t) == count
    assert np.all(np.diff(t) >= 0) and np.all(t >= 0)
    assert np.all(workload.rate_at(arr, rate, t) > 0)


def test_sessions_keep_a_rate_step_in_place():
    # Regression: session starts before t = 0 once shifted a time-varying rate earlier.
    from simrec.loader import validate
    sc_ = validate({"name": "x", "workload": {
        "rate_qps": 100, "arrivals": {"kind": "piecewise", "steps": [{"start_s": 0, "factor": 1},
                                                                       {"start_s": 20, "factor": 4}]},
        "users": {"count": 1000, "sessions": {"mean_requests": 3, "mean_gap_s": 1}}},
        "stages": {"a": {"service": {"kind": "constant", "ms": 1}}}, "slo": {"p99_ms": 10},
        "run": {"duration_s": 40}})
    t = workload.generate(sc_.workload, sc_.run, rng(3)).arrival_ms / 1000
    before, after = np.sum((t > 10) & (t < 18)), np.sum((t > 30) & (t < 38))
    # 8 s at 100/s vs 8 s at 400/s. Requests come in sessions of K ~ Geometric(1/3), so the
    # count's variance is n E[K^2]/E[K] = 5n (cluster process): 4 sigma = 4 sqrt(5 n).
    assert abs(before - 800) < 4 * np.sqrt(5 * 800) and abs(after - 3200) < 4 * np.sqrt(5 * 3200)
