"""Confidence intervals across independent replications.

Each replication gives one estimate of a metric (a mean, a percentile, a rate). The
replications are independent (separate seed streams, each with its own warm-up removed),
so the estimates are i.i.d. and a Student-t interval over them is valid even though the
latencies inside one run are autocorrelated. With one replication no interval is given.
"""

from __future__ import annotations

import math

import numpy as np

CI_LEVEL = 0.95
CI_METHOD = "Student-t interval over independent replications (replication/deletion)"
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


def interval(values, level: float = CI_LEVEL) -> dict:
    """Mean of per-replication estimates with its t confidence interval."""
    v = np.asarray(values, float)
    mean = float(np.mean(v)) if len(v) else math.nan
    lo = hi = None
    if len(v) >= 2 and np.all(np.isfinite(v)):
        from scipy import stats          # lazily: scipy.stats costs a second to import
        half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v))
        lo, hi = mean - float(half), mean + float(half)
    return {"mean": _finite(mean), "lo": lo, "hi": hi, "replications": [_finite(x) for x in v]}


def prediction_interval(values, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(centre, lo, hi) for one more replication's value of a positive statistic, e.g. the
    P99 of one more window as long as each replication's, taken as log-normal:
    exp(m +- t s sqrt(1 + 1/R)) over the values' logs. Not a confidence interval on the
    mean: with rare slow spells one window's P99 is itself random, and this says how much."""
    v = np.log(np.asarray(values, float))
    m = float(v.mean())
    if len(v) < 2 or not np.all(np.isfinite(v)):
        return math.exp(m), math.nan, math.nan
    from scipy import stats
    h = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * float(v.std(ddof=1)) * math.sqrt(1 + 1 / len(v))
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def describe(samples: np.ndarray) -> dict[str, float]:
    """Mean and the standard percentiles of one replication's samples (inf allowed)."""
    if len(samples) == 0:
        return {"mean_ms": math.nan, **{f"{k}_ms": math.nan for k in PERCENTILES}}
    # Unfinished requests count as +inf; pick order statistics then, so no inf - inf.
    method = "linear" if np.all(np.isfinite(samples)) else "inverted_cdf"
    pct = np.percentile(samples, list(PERCENTILES.values()), method=method)
    return {"mean_ms": float(np.mean(samples)),
            **{f"{k}_ms": float(p) for k, p in zip(PERCENTILES, pct)}}


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: an unbounded figure (requests that never finished) is null."""
    return float(x) if math.isfinite(x) else None
