"""The offered load: arrival times, users and their shapes, generated before the run.

Generating the whole arrival schedule up front (vectorised numpy) keeps the SimPy model
small and makes a replication's workload independent of what the cluster does with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import scenario as sc
from .trace import read_trace


@dataclass(slots=True)
class RequestBatch:
    """Columns of the generated requests, sorted by arrival (ms)."""

    arrival_ms: np.ndarray
    user_id: np.ndarray
    history_len: np.ndarray
    candidates: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_ms)


def draw(dist: sc.Distribution, rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws from a scenario distribution (floats)."""
    if isinstance(dist, sc.ConstantDist):
        return np.full(n, dist.value, float)
    if isinstance(dist, sc.UniformDist):
        return rng.uniform(dist.low, dist.high, n)
    if isinstance(dist, sc.LognormalDist):
        sigma2 = np.log1p(dist.cv**2)
        return rng.lognormal(np.log(dist.mean) - sigma2 / 2, np.sqrt(sigma2), n)
    if isinstance(dist, sc.EmpiricalDist):
        values = np.asarray(dist.values, float)
        p = None if dist.weights is None else np.asarray(dist.weights) / np.sum(dist.weights)
        return rng.choice(values, size=n, p=p)
    raise TypeError(dist)


def rate_at(arrivals: sc.Arrivals, rate_qps: float, t_s: np.ndarray) -> np.ndarray:
    """Instantaneous rate (per second) of a deterministic time-varying process."""
    if isinstance(arrivals, sc.DiurnalArrivals):
        return rate_qps * (1 + arrivals.amplitude * np.sin(2 * np.pi * (t_s + arrivals.phase_s)
                                                          / arrivals.period_s))
    if isinstance(arrivals, sc.PiecewiseArrivals):
        starts = np.array([s.start_s for s in arrivals.steps])
        factors = np.array([s.factor for s in arrivals.steps])
        return rate_qps * factors[np.searchsorted(starts, t_s, side="right") - 1]
    raise TypeError(arrivals)


def arrival_times_s(arrivals: sc.Arrivals, rate_qps: float, rng: np.random.Generator,
                    horizon_s: float | None, count: int | None) -> np.ndarray:
    """Arrival instants in seconds, up to a horizon or a count (exactly one is given)."""
    if isinstance(arrivals, sc.PoissonArrivals):
        if count is not None:
            return np.cumsum(rng.exponential(1 / rate_qps, count))
        return _poisson_until(rng, rate_qps, horizon_s)
    if isinstance(arrivals, (sc.DiurnalArrivals, sc.PiecewiseArrivals)):
        if isinstance(arrivals, sc.DiurnalArrivals):
            peak = rate_qps * (1 + arrivals.amplitude)
        else:
            peak = rate_qps * max(s.factor for s in arrivals.steps)
            if count is not None and arrivals.steps[-1].factor == 0:
                raise ValueError("a count of arrivals needs a final piecewise rate > 0")
        return _thinned(lambda t: rate_at(arrivals, rate_qps, t), peak, rng, horizon_s, count)
    if isinstance(arrivals, sc.BurstArrivals):
        return _mmpp(arrivals, rate_qps, rng, horizon_s, count)
    raise TypeError(arrivals)


def _poisson_until(rng: np.random.Generator, rate: float, horizon_s: float) -> np.ndarray:
    chunks, t = [], 0.0
    while t < horizon_s:
        n = max(16, int(rate * (horizon_s - t) * 1.1) + 16)
        times = t + np.cumsum(rng.exponential(1 / rate, n))
        chunks.append(times)
        t = times[-1]
    times = np.concatenate(chunks)
    return times[times < horizon_s]


def _thinned(rate_fn, peak: float, rng, horizon_s, count) -> np.ndarray:
    """Lewis-Shedler thinning of a Poisson process at the peak rate."""
    out, t, total = [], 0.0, 0
    while True:
        n = 4096
        cand = t + np.cumsum(rng.exponential(1 / peak, n))
        keep = cand[rng.uniform(0, peak, n) < rate_fn(cand)]
        t = cand[-1]
        if horizon_s is not None:
            out.append(keep[keep < horizon_s])
            if t >= horizon_s:
                break
        else:
            out.append(keep)
            total += len(keep)
            if total >= count:
                break
    times = np.concatenate(out)
    return times if count is None else times[:count]


def _mmpp(b: sc.BurstArrivals, rate_qps: float, rng, horizon_s, count) -> np.ndarray:
    """Two-state Markov-modulated Poisson process: calm and burst periods."""
    out, t, total, burst = [], 0.0, 0, False
    while (horizon_s is None or t < horizon_s) and (count is None or total < count):
        length = rng.exponential(b.mean_burst_s if burst else b.mean_calm_s)
        end = t + length if horizon_s is None else min(t + length, horizon_s)
        rate = rate_qps * (b.burst_factor if burst else 1.0)
        n = rng.poisson(rate * (end - t))
        times = np.sort(rng.uniform(t, end, n))
        out.append(times)
        total += n
        t, burst = end, not burst
    times = np.concatenate(out) if out else np.empty(0)
    return times if count is None else times[:count]


class UserPopulation:
    """Zipf-popular users, each with a history length drawn once."""

    def __init__(self, users: sc.Users, rng: np.random.Generator):
        ranks = np.arange(1, users.count + 1, dtype=float)
        weights = ranks ** -users.zipf_s
        self.cdf = np.cumsum(weights) / weights.sum()
        lengths = np.maximum(users.min_history_len, np.rint(draw(users.history_len, rng, users.count)))
        if users.max_history_len is not None:
            lengths = np.minimum(lengths, users.max_history_len)
        self.history_len = lengths.astype(np.int64)

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = np.searchsorted(self.cdf, rng.uniform(0, 1, n), side="right")
        return np.minimum(idx, len(self.cdf) - 1)


def session_arrivals(workload: sc.Workload, run: sc.RunControl, users: UserPopulation,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sessions start by the arrival process at rate / mean_requests; each belongs to one
    Zipf-drawn user and holds a geometric number of requests (mean `mean_requests`)
    separated by exponential gaps (mean `mean_gap_s`). Sessions start from well before 0
    so the run opens in steady state; the long-run rate stays rate_qps."""
    ses = workload.users.sessions
    rate = workload.rate_qps / ses.mean_requests
    lead = 10 * (ses.mean_requests - 1) * ses.mean_gap_s
    horizon = run.duration_s if run.duration_s is not None else 1.3 * run.requests / workload.rate_qps
    while True:
        # Sessions that started before 0 arrive at the process's rate at time 0; from 0 on,
        # session starts follow the arrival process itself (time-varying rates stay in place).
        rate0 = float(rate_at(workload.arrivals, rate, np.zeros(1))[0]) if isinstance(
            workload.arrivals, (sc.DiurnalArrivals, sc.PiecewiseArrivals)) else rate
        before = _poisson_until(rng, rate0, lead) - lead if rate0 > 0 and lead > 0 else np.empty(0)
        starts = np.concatenate([before, arrival_times_s(workload.arrivals, rate, rng, horizon, None)])
        sizes = rng.geometric(1 / ses.mean_requests, len(starts))
        owner = users.pick(rng, len(starts))
        first_of = np.cumsum(sizes) - sizes                       # index of each session's first
        gaps = rng.exponential(ses.mean_gap_s, int(sizes.sum()))
        gaps[first_of] = 0.0
        offsets = np.cumsum(gaps)
        offsets -= np.repeat(offsets[first_of], sizes)             # restart the sum per session
        times = np.repeat(starts, sizes) + offsets
        uid = np.repeat(owner, sizes)
        keep = (times >= 0) & (times < horizon)
        times, uid = times[keep], uid[keep]
        order = np.argsort(times, kind="stable")
        times, uid = times[order], uid[order]
        if run.requests is None:
            return times, uid
        if len(times) >= run.requests:
            return times[:run.requests], uid[:run.requests]
        horizon *= 2


def generate(workload: sc.Workload, run: sc.RunControl, rng: np.random.Generator) -> RequestBatch:
    """All requests of one replication."""
    if isinstance(workload.arrivals, sc.TraceArrivals):
        batch = RequestBatch(*read_trace(workload.arrivals.path))
        if run.requests is not None:
            batch = RequestBatch(*(c[:run.requests] for c in (batch.arrival_ms, batch.user_id,
                                                              batch.history_len, batch.candidates)))
        if run.duration_s is not None:
            keep = batch.arrival_ms < run.duration_s * 1000
            batch = RequestBatch(batch.arrival_ms[keep], batch.user_id[keep],
                                 batch.history_len[keep], batch.candidates[keep])
        return batch
    users = UserPopulation(workload.users, rng)
    sessions = workload.users.sessions
    if sessions.mean_requests > 1:
        times_s, uid = session_arrivals(workload, run, users, rng)
    else:
        times_s = arrival_times_s(workload.arrivals, workload.rate_qps, rng, run.duration_s, run.requests)
        uid = users.pick(rng, len(times_s))
    n = len(times_s)
    cands = np.maximum(1, np.rint(draw(workload.candidates, rng, n))).astype(np.int64)
    return RequestBatch(times_s * 1000.0, uid.astype(np.int64), users.history_len[uid], cands)
