"""Confidence intervals across independent replications, each valid for its quantity.

Each replication gives one estimate of a metric (a mean, a rate, a fraction). The
replications are independent (separate seed streams, each with its own warm-up removed),
so the estimates are i.i.d. even though the latencies inside one run are autocorrelated;
every interval here takes its spread from the replications. With one replication no
interval is given. The method depends on the quantity (`metric_kind`, `INTERVAL_METHODS`):

- proportions (SLO attainment, hit rates, fractions, utilisation): Korn-Graubard, i.e.
  Clopper-Pearson at the effective sample size that the replications' spread implies;
  always inside [0, 1];
- latency percentiles: the percentile of all replications' measured samples pooled, with
  an interval by inverting the proportion interval of the pooled CDF (its spread over
  replications). The mean of per-replication P99s is biased low when replications are
  short (a percentile is not linear in the samples); the pooled one is not, and its bounds
  are sample values, so never negative;
- every other figure (means, rates, counts, bytes: all >= 0): Student-t, cut at 0. The
  quantity cannot be negative, so cutting the interval there never lowers its coverage.
"""

from __future__ import annotations

import fnmatch
import math

import numpy as np

CI_LEVEL = 0.95
CI_METHOD = "Student-t interval over independent replications (replication/deletion)"
CI_METHOD_PER_METRIC = ("per metric, see interval_methods; replications are the independent unit "
                        "(replication/deletion)")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}

T = "student-t over replications"
NONNEGATIVE = "student-t over replications, cut at 0 (the quantity cannot be negative)"
PROPORTION = ("Korn-Graubard: Clopper-Pearson at the effective sample size p(1-p)/var from the "
              "replications' spread, t-adjusted (replications as the unit when they all agree); "
              "inside [0, 1]")
PERCENTILE = ("pooled percentile of every replication's measured samples; interval by test "
              "inversion: latencies x whose pooled CDF F(x) has the percentile's level inside "
              "its Korn-Graubard interval (effective sample size from the spread of F(x) over "
              "replications, or over batches within them if larger); where the data cannot bound "
              "the percentile from above, lo and hi are null and lo_one_sided is the lower bound")
MAX_N = 1e12             # effective sample sizes are capped here (no spread: rounding)
ROUNDING = 1e-9          # relative slack for a value at its range's edge from rounding
KINDS = {"real": T, "nonnegative": NONNEGATIVE, "proportion": PROPORTION, "percentile": PERCENTILE}

# Metric path pattern (dotted, as in `results.flat_metrics`) -> kind; the first match wins.
METRIC_KINDS: list[tuple[str, str]] = [
    ("e2e.p*_ms", "percentile"),
    ("stages.*.p*_ms", "percentile"),
    ("slo_attainment", "proportion"),
    ("utilisation.*", "proportion"),
    ("relay.*_rate", "proportion"),
    ("relay.triggered_fraction", "proportion"),
    ("hbm.emb_hit_rate", "proportion"),
    ("hbm.emb_fraction_*", "proportion"),
    ("history.*.hit_ratio.*", "proportion"),
    ("*", "nonnegative"),
]


def metric_kind(path: str) -> str:
    """The interval kind of a metric, by its dotted path (e.g. 'e2e.p99_ms')."""
    return next(kind for pattern, kind in METRIC_KINDS if fnmatch.fnmatchcase(path, pattern))


def interval_methods() -> dict[str, str]:
    """What summary.json states as `interval_methods`: metric path pattern -> method."""
    return {pattern: KINDS[kind] for pattern, kind in METRIC_KINDS}


def _check(values, level: float) -> np.ndarray:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must be in (0, 1) (got {level!r})")
    v = np.asarray(values, float)
    if v.ndim != 1:
        raise ValueError(f"values must be one number per replication (got shape {v.shape})")
    return v


def _t(level: float, df: int) -> float:
    from scipy import stats          # lazily: scipy.stats costs a second to import
    return float(stats.t.ppf(0.5 + level / 2, df))


def interval(values, level: float = CI_LEVEL, kind: str = "real") -> dict:
    """Mean of per-replication estimates with its confidence interval, by `kind`:
    real (Student-t), nonnegative (Student-t cut at 0), proportion (Korn-Graubard, in
    [0, 1]). No interval (lo = hi = None) with fewer than 2 replications or any that is
    not finite (requests that never finished)."""
    if kind not in ("real", "nonnegative", "proportion"):
        raise ValueError(f"kind must be real, nonnegative or proportion (got {kind!r})")
    v = _check(values, level)
    mean = float(np.mean(v)) if len(v) else math.nan
    lo = hi = None
    if len(v) >= 2 and np.all(np.isfinite(v)):
        if kind == "proportion":
            # (a busy fraction may be 1 + 2e-16 from rounding: clipped; beyond that an error)
            if np.any((v < -ROUNDING) | (v > 1 + ROUNDING)):
                raise ValueError("a proportion must lie in [0, 1] in every replication")
            mean = p = min(max(mean, 0.0), 1.0)
            lo, hi = proportion_bounds(p, float(np.var(v, ddof=1)) / len(v), len(v), level)
        else:
            half = _t(level, len(v) - 1) * float(np.std(v, ddof=1)) / math.sqrt(len(v))
            lo, hi = mean - half, mean + half
            if kind == "nonnegative":
                if np.any(v < -ROUNDING * (1 + np.max(np.abs(v)))):
                    raise ValueError("a nonnegative quantity is negative in a replication")
                lo, hi = max(lo, 0.0), max(hi, 0.0)
    return {"mean": _finite(mean), "lo": lo, "hi": hi, "replications": [_finite(x) for x in v]}


def proportion_bounds(p: float, var: float, replications: int,
                      level: float = CI_LEVEL) -> tuple[float, float]:
    """Korn-Graubard interval for a proportion `p` whose estimate has variance `var`
    (from `replications` independent replications): Clopper-Pearson at the effective
    sample size n = p(1-p)/var times (z/t)^2 for the replications' degrees of freedom.
    When the replications all agree (var 0) their spread says nothing about the design
    effect, and the replications themselves are the unit (n = replications, no t factor)."""
    from scipy import stats
    p = min(max(p, 0.0), 1.0)
    r = replications
    spread = var > 0 and 0 < p < 1
    n = min(p * (1 - p) / var, MAX_N) if spread else float(r)
    if spread:      # the t adjustment is for a variance estimated from r replications; with no
        n *= (_z(level) / _t(level, r - 1)) ** 2     # spread there is none (3 agreeing gave n 0.6)
    x, a = p * n, (1 - level) / 2
    lo = 0.0 if x <= 0 else float(stats.beta.ppf(a, x, n - x + 1))
    hi = 1.0 if x >= n else float(stats.beta.ppf(1 - a, x + 1, n - x))
    # (beta.ppf fails only at extreme shapes: the widest answer then)
    return (min(lo, p) if math.isfinite(lo) else 0.0), (max(hi, p) if math.isfinite(hi) else 1.0)


def pooled_percentile(samples, q: float, level: float = CI_LEVEL) -> dict:
    """The q-th percentile (0-100) of all replications' samples pooled, with an interval
    whose spread comes from the replications (see `_inverted_bounds`).

    `samples`: one array per replication, in arrival order (inf for a request that never
    finished). Where the data cannot bound the percentile from above, lo and hi are None
    and "lo_one_sided" holds the lower bound.
    "replications" lists the per-replication percentiles (what one run of this length
    would show); "spread" is the coefficient of variation over replications of the
    fraction of samples above the estimate (above about 1, replications are short for
    this percentile: their tail events are few and the interval is less reliable)."""
    if not (isinstance(q, (int, float)) and 0 < q < 100):
        raise ValueError(f"percentile must be in (0, 100) (got {q!r})")
    _check([], level)
    parts = [np.asarray(s, float).ravel() for s in samples]
    if any(np.isnan(s).any() for s in parts):
        raise ValueError("samples must not be NaN (an unfinished request is +inf)")
    per_rep = [_percentile(s, q) for s in parts]
    pooled = np.concatenate(parts) if parts else np.zeros(0)
    out = {"mean": None, "lo": None, "hi": None, "replications": [_finite(x) for x in per_rep]}
    if len(pooled) == 0:
        return out
    est = _percentile(pooled, q)
    out["mean"] = _finite(est)
    sizes = np.array([len(s) for s in parts], float)
    if len(parts) < 2 or not math.isfinite(est) or np.any(sizes == 0):
        return out
    above = np.array([np.count_nonzero(s > est) / len(s) for s in parts])
    out["spread"] = _finite(float(above.std(ddof=1) / above.mean())) if above.mean() > 0 else None
    batches = [np.sort(b) for s in parts for b in np.array_split(s, min(BATCHES, len(s)))]
    lo, hi = _inverted_bounds([np.sort(s) for s in parts], batches, np.sort(pooled), est,
                              q / 100, level)
    if math.isfinite(hi):
        out["lo"], out["hi"] = lo, hi
    else:      # one-sided: null lo and hi, as every reader of a summary expects of "no interval"
        out["lo_one_sided"] = lo
    return out


CANDIDATES = 400     # pooled order statistics tried on each side of a percentile estimate


BATCHES = 10         # batches of consecutive requests per replication, for the design effect


def iact(parts: list[np.ndarray]) -> float:
    """Integrated autocorrelation time (in samples) of a series observed in independent
    pieces (replications, in arrival order), about their pooled mean: var(mean) =
    var(x) tau / n. Geyer's initial monotone sequence estimator (sums of adjacent
    autocovariance pairs, while positive, made non-increasing); 1 for independent samples."""
    xs = [np.asarray(s, float) for s in parts if len(s) > 1]     # (callers cap the lengths)
    n = sum(len(x) for x in xs)
    if n == 0 or not all(np.isfinite(x).all() for x in xs):
        return math.nan
    mean = sum(x.sum() for x in xs) / n
    width = max(len(x) for x in xs)
    acov = np.zeros(width)
    for x in xs:
        y = x - mean
        m = 1 << int(2 * len(y) - 1).bit_length()
        f = np.fft.rfft(y, m)
        acov[:len(y)] += np.fft.irfft(f * np.conj(f), m)[:len(y)]
    if acov[0] <= 0:
        return 1.0
    acov /= n
    pairs = acov[: width - width % 2].reshape(-1, 2).sum(1)
    stop = np.nonzero(pairs <= 0)[0]
    pairs = np.minimum.accumulate(pairs[: stop[0] if len(stop) else len(pairs)])
    return max(float((2 * pairs.sum() - acov[0]) / acov[0]), 1.0)


def _inverted_bounds(parts: list[np.ndarray], batches: list[np.ndarray], pooled: np.ndarray,
                     est: float, p: float, level: float) -> tuple[float, float]:
    """Bounds of the p-quantile by test inversion: a latency x is inside when p lies in the
    Korn-Graubard interval of the pooled CDF at x, F(x), whose effective sample size comes
    from the replications' spread of their own CDFs at x (never above the i.i.d. count:
    queueing latencies are positively correlated). Tried at pooled order statistics on each
    side of the estimate; (lo, inf) when even the largest one short of the maximum is inside
    (the data cannot bound the quantile), lo 0 likewise below. `parts` and `pooled` sorted."""
    from scipy import stats
    n_all, r = len(pooled), len(parts)
    sizes = np.array([len(s) for s in parts], float)
    k_est = int(np.searchsorted(pooled, est, "left"))
    adj = (_z(level) / _t(level, r - 1)) ** 2
    a = (1 - level) / 2

    bsizes = np.array([len(b) for b in batches], float)
    nb = len(batches)

    def spread(units: list[np.ndarray], size: np.ndarray, x: np.ndarray):
        below = np.array([np.searchsorted(s, x, "right") for s in units], float)   # units x k
        f = below.sum(0) / n_all
        m = len(units)
        return f, m / (m - 1) * ((below - f * size[:, None]) ** 2).sum(0) / n_all**2

    def ends(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f, var = spread(parts, sizes, x)
        # The replications' spread is unbiased but, from few of them, noisy; batches within
        # replications give a steadier (if low) one: the larger of the two.
        if nb > r:
            var = np.maximum(var, spread(batches, bsizes, x)[1])
        inner = (var > 0) & (f > 0) & (f < 1)
        n = np.where(inner, np.minimum(f * (1 - f) / np.where(inner, var, 1), n_all), n_all) * adj
        y = f * n
        with np.errstate(invalid="ignore", divide="ignore"):
            f_lo = np.where(y > 0, stats.beta.ppf(a, y, n - y + 1), 0.0)
            f_hi = np.where(y < n, stats.beta.ppf(1 - a, y + 1, n - y), 1.0)
        return f, f_lo, f_hi

    # Upper side: order statistics above the estimate, denser near it; the maximum is left
    # out (all replications' CDFs are 1 there: their spread says nothing).
    top = n_all - 1 - np.unique(np.geomspace(1, max(n_all - 1 - k_est, 1), CANDIDATES).astype(int))
    top = np.unique(top[(top >= k_est) & (top < n_all - 1)])
    hi = math.inf
    if len(top):
        x = pooled[top]                                   # ascending
        inside = np.nonzero(ends(x)[1] <= p)[0]
        last = inside.max() if len(inside) else -1
        if last < len(x) - 1:                             # else: inside up to the maximum
            hi = float(x[last + 1])                       # the first excluded one beyond
    lo = 0.0
    bot = np.unique(np.geomspace(1, max(k_est, 1), CANDIDATES).astype(int)) - 1
    bot = np.unique(k_est - 1 - bot[(bot >= 0) & (bot < k_est)])[::-1]   # descending
    if len(bot):
        x = pooled[bot]
        inside = np.nonzero(ends(x)[2] >= p)[0]
        last = inside.max() if len(inside) else -1
        if last < len(x) - 1:                             # else: inside down to the minimum
            lo = float(x[last + 1])
    return lo, hi


def _z(level: float) -> float:
    from scipy import stats
    return float(stats.norm.ppf(0.5 + level / 2))


def _cp_level(n: float, p: float, level: float, upper: bool) -> float:
    """Test inversion for a quantile bound: the CDF level u whose Clopper-Pearson interval
    at sample size n has p as its lower end (upper=True; 1 if none does: the quantile is
    not bounded above), or l whose interval has p as its upper end (upper=False; 0 if none)."""
    from scipy import optimize, stats
    a = (1 - level) / 2
    if upper:
        def g(u):
            return (float(stats.beta.ppf(a, u * n, n - u * n + 1)) if u < 1 else a ** (1 / n)) - p
        return 1.0 if g(1.0) <= 0 else float(optimize.brentq(g, p, 1.0, xtol=1e-12))
    def h(v):
        return (float(stats.beta.ppf(1 - a, v * n + 1, n - v * n)) if v > 0 else 1 - a ** (1 / n)) - p
    return 0.0 if h(0.0) >= 0 else float(optimize.brentq(h, 0.0, p, xtol=1e-12))


def _percentile(x: np.ndarray, q: float) -> float:
    if len(x) == 0:
        return math.nan
    # Unfinished requests count as +inf; pick order statistics then, so no inf - inf.
    method = "linear" if np.all(np.isfinite(x)) else "inverted_cdf"
    return float(np.percentile(x, q, method=method))


def trend(first, second, level: float = CI_LEVEL) -> dict:
    """Change of the mean from the first to the second half of the measurement window:
    `first`, `second` one array of latencies per replication. With 2 or more replications
    a paired t interval over them; with one, a Welch t interval between 10 batch means of
    each half (batches of consecutive requests, nearly independent when much longer than
    the latency's correlation). lo = hi = None when a latency is not finite."""
    first = [np.asarray(a, float) for a in first]
    second = [np.asarray(b, float) for b in second]
    if len(first) != len(second) or not first or any(len(a) == 0 for a in first + second):
        raise ValueError("trend needs both halves of every replication, none empty")
    if len(first) >= 2:
        if not all(np.isfinite(x).all() for x in first + second):    # inf - inf: no difference
            return {"mean": None, "lo": None, "hi": None, "replications": [None] * len(first)}
        return interval([np.mean(b) - np.mean(a) for a, b in zip(first, second)], level)
    a, b = first[0], second[0]
    diff = float(np.mean(b) - np.mean(a)) if np.all(np.isfinite(a)) and np.all(np.isfinite(b)) else math.nan
    out = {"mean": _finite(diff), "lo": None, "hi": None, "replications": [_finite(diff)]}
    k = min(10, len(a), len(b))
    if not math.isfinite(diff) or k < 2:
        return out
    ma = np.array([x.mean() for x in np.array_split(a, k)])
    mb = np.array([x.mean() for x in np.array_split(b, k)])
    va, vb = ma.var(ddof=1) / k, mb.var(ddof=1) / k
    if va + vb == 0:
        out["lo"] = out["hi"] = diff
        return out
    df = (va + vb) ** 2 / (va**2 / (k - 1) + vb**2 / (k - 1))
    half = _t(level, df) * math.sqrt(va + vb)
    out["lo"], out["hi"] = diff - half, diff + half
    return out


def prediction_interval(values, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(centre, lo, hi) for one more replication's value of a positive statistic, e.g. the
    P99 of one more window as long as each replication's, taken as log-normal:
    exp(m +- t s sqrt(1 + 1/R)) over the values' logs. Not a confidence interval on the
    mean: with rare slow spells one window's P99 is itself random, and this says how much."""
    v = np.log(np.asarray(values, float))
    m = float(v.mean())
    if len(v) < 2 or not np.all(np.isfinite(v)):
        return math.exp(m), math.nan, math.nan
    h = _t(level, len(v) - 1) * float(v.std(ddof=1)) * math.sqrt(1 + 1 / len(v))
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def describe(samples: np.ndarray) -> dict[str, float]:
    """Mean and the standard percentiles of one replication's samples (inf allowed)."""
    if len(samples) == 0:
        return {"mean_ms": math.nan, **{f"{k}_ms": math.nan for k in PERCENTILES}}
    method = "linear" if np.all(np.isfinite(samples)) else "inverted_cdf"
    pct = np.percentile(samples, list(PERCENTILES.values()), method=method)
    return {"mean_ms": float(np.mean(samples)),
            **{f"{k}_ms": float(p) for k, p in zip(PERCENTILES, pct)}}


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: an unbounded figure (requests that never finished) is null."""
    return float(x) if math.isfinite(x) else None
