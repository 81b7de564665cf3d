"""The HBM embedding hot cache (EMB) of one device, as a fluid model.

A ranking request embeds one row per history token it encodes and one per candidate: up
to ~16k ids. Simulating each id through an LRU list would dominate the run time, so a
device's cache is a few numbers instead:

Popularity. Item ids follow a Zipf law over `items` rows: p_i ~ i^-s.

Hit ratio. For an LRU cache of C rows under independent references, Che's approximation
gives h(C) = sum_i p_i (1 - exp(-p_i T)), where the characteristic time T solves
sum_i (1 - exp(-p_i T)) = C. `CheCurve` tabulates (C(T), h(T)) once over a log grid of T,
with the first 2048 ranks exact and the rest in log-spaced rank bins (each bin's items
share the bin's mean probability); a lookup interpolates in log C.

State. A device holds `rows` (its EMB side / row_bytes) of which `filled` are valid.
Lookups hit with probability h(filled):
- a lookup of n ids misses Binomial(n, 1 - h(filled)) of them (drawn from the stage's
  generator); each missed row is copied host -> device on the critical path and inserted,
  so `filled` grows by the misses, up to `rows`;
- growing the side leaves the new rows empty; a refill loads the next-hottest rows
  asynchronously at the resize bandwidth until the side is full (it does not compete with
  missed rows for the host link: a simplification);
- shrinking the side drops its coldest rows at once: filled = min(filled, rows);
- drift (the trend regime): popularity turns over at `turnover_per_s`, i.e. that fraction
  of the valid rows stops being hot each second (`filled` decays exponentially) and must be
  missed again to come back. The refill does not chase drift: it only fills rows a resize
  added (a prefetcher knows last period's hot set, not the new trend). Stale rows are taken
  as spread evenly over ranks, a simplification (real trending items enter at the top).
  With drift, `filled` settles where misses refill what drift takes away, which can be
  below `rows`: beyond that point a bigger EMB side buys nothing.

The cache starts full (as after a long steady run). A lookup's cost is the gather of its n
rows (the cost table's `emb_gather` phase, measured up to 1024 ids; longer lookups are
extrapolated log-log from the measured curve, which is flat there because launch overhead
dominates, and counted) plus misses x row_bytes / miss bandwidth plus a fixed latency when
anything missed.

Left out: correlation between one user's ids (a returning user's history rows are the same
rows; here every lookup is independent), and embedding updates.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

HEAD_RANKS = 2048
TAIL_BINS = 2000
T_POINTS = 1200


class CheCurve:
    """h(C): the LRU hit ratio of C rows under Zipf(s) popularity over n items (Che)."""

    def __init__(self, items: int, zipf_s: float):
        self.items = int(items)
        p, count = _bins(self.items, zipf_s)
        # T from "the hottest row barely referenced" to "the coldest row certainly".
        ts = np.geomspace(1e-4 / p.max(), 50.0 / p.min(), T_POINTS)
        filled = 1.0 - np.exp(-np.outer(ts, p))          # (T, bins)
        rows = filled @ count
        hit = filled @ (count * p)
        keep = np.concatenate(([True], np.diff(rows) > 1e-9 * rows[1:]))
        rows, hit = rows[keep], np.minimum(hit[keep], 1.0)
        self._log_rows = np.log(rows).tolist()
        self._rows = rows.tolist()
        self._hit = np.maximum.accumulate(hit).tolist()

    def hit(self, rows: float) -> float:
        """Hit ratio of an LRU cache holding `rows` rows."""
        if rows >= self.items:
            return 1.0
        r0 = self._rows[0]
        if rows <= r0:
            return self._hit[0] * max(rows, 0.0) / r0
        x = math.log(rows)
        i = bisect_left(self._log_rows, x)
        if i >= len(self._rows):
            return self._hit[-1]
        x0, x1 = self._log_rows[i - 1], self._log_rows[i]
        t = (x - x0) / (x1 - x0)
        return self._hit[i - 1] + t * (self._hit[i] - self._hit[i - 1])

    def rows_for(self, hit: float) -> float:
        """The inverse: rows an LRU cache needs for this hit ratio."""
        if hit <= self._hit[0]:
            return self._rows[0] * max(hit, 0.0) / self._hit[0]
        if hit >= self._hit[-1]:
            return float(self.items)
        i = bisect_left(self._hit, hit)
        h0, h1 = self._hit[i - 1], self._hit[i]
        t = (hit - h0) / (h1 - h0) if h1 > h0 else 0.0
        return math.exp(self._log_rows[i - 1] + t * (self._log_rows[i] - self._log_rows[i - 1]))


def _bins(n: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(per-item probability, item count) per bin: the head ranks one by one, then
    log-spaced bins whose mass is the midpoint-rule integral of x^-s."""
    head = np.arange(1, min(n, HEAD_RANKS) + 1, dtype=float)
    masses, counts = [head ** -s], [np.ones(len(head))]
    if n > HEAD_RANKS:
        edges = np.unique(np.round(np.geomspace(HEAD_RANKS + 1, n + 1, TAIL_BINS)).astype(np.int64))
        a, b = edges[:-1].astype(float), edges[1:].astype(float)   # bin = ranks a .. b-1
        lo, hi = a - 0.5, b - 0.5
        if abs(s - 1.0) < 1e-12:
            mass = np.log(hi / lo)
        else:
            mass = (hi ** (1 - s) - lo ** (1 - s)) / (1 - s)
        masses.append(mass)
        counts.append(b - a)
    mass, count = np.concatenate(masses), np.concatenate(counts)
    p = mass / count / mass.sum()
    return p, count


@dataclass(slots=True)
class EmbCounters:
    lookups: int = 0
    ids: int = 0
    misses: int = 0
    refilled_rows: float = 0.0
    dropped_rows: float = 0.0


@dataclass(slots=True)
class EmbeddingCache:
    """One device's EMB side: `rows` capacity, `filled` valid rows (fluid), a refill backlog."""

    curve: CheCurve
    row_bytes: int
    rows: int
    drift: list                  # [(start_ms, turnover per ms)], sorted
    refill_rows_per_ms: float
    filled: float = -1.0
    refill: float = 0.0          # rows a resize added that the refill has not loaded yet
    last_ms: float = 0.0
    counters: EmbCounters = field(default_factory=EmbCounters)

    def __post_init__(self):
        if self.filled < 0:
            self.filled = float(self.rows)    # warm start

    @property
    def capacity_bytes(self) -> int:
        return self.rows * self.row_bytes

    def hit_ratio(self) -> float:
        return self.curve.hit(self.filled)

    def advance(self, now: float) -> None:
        """Apply drift and the async refill up to `now`."""
        dt = now - self.last_ms
        if dt <= 0:
            return
        if self.drift and self.filled > 0:
            self.filled *= math.exp(-self._turnover(self.last_ms, now))
        if self.refill > 0:
            add = min(self.refill, self.refill_rows_per_ms * dt, self.rows - self.filled)
            if add > 0:
                self.filled += add
                self.counters.refilled_rows += add
            self.refill = min(self.refill - max(add, 0.0), self.rows - self.filled)
        self.last_ms = now

    def _turnover(self, t0: float, t1: float) -> float:
        """Integral of the turnover rate over [t0, t1] (piecewise constant)."""
        total, steps = 0.0, self.drift
        for k, (start, rate) in enumerate(steps):
            end = steps[k + 1][0] if k + 1 < len(steps) else math.inf
            lo, hi = max(t0, start), min(t1, end)
            if hi > lo:
                total += rate * (hi - lo)
        return total

    def lookup(self, n: int, now: float, rng: np.random.Generator) -> int:
        """Look up n ids; returns how many missed (and inserts them)."""
        self.advance(now)
        c = self.counters
        c.lookups += 1
        if n <= 0:
            return 0
        miss_p = 1.0 - self.curve.hit(self.filled)
        misses = int(rng.binomial(n, miss_p)) if miss_p > 0 else 0
        if misses:
            self.filled = min(float(self.rows), self.filled + misses)
            self.refill = min(self.refill, self.rows - self.filled)
        c.ids += n
        c.misses += misses
        return misses

    def resize(self, rows: int, now: float) -> None:
        """Set the capacity: shrinking drops the coldest rows, growing queues a refill."""
        self.advance(now)
        if rows < self.rows:
            dropped = max(self.filled - rows, 0.0)
            self.counters.dropped_rows += dropped
            self.filled = min(self.filled, float(rows))
        else:
            self.refill += rows - self.rows
        self.rows = rows
        self.refill = max(min(self.refill, self.rows - self.filled), 0.0)


class EmbCost:
    """Time (ms) of an embedding lookup: gather + missed rows over the miss bandwidth."""

    def __init__(self, row_bytes: int, miss_gbps: float, miss_latency_us: float, gather_curve,
                 uniform):
        self.ms_per_miss = row_bytes / (miss_gbps * 1e9) * 1e3
        self.latency_ms = miss_latency_us / 1e3
        self.gather = gather_curve
        self._u = uniform
        self.max_measured = int(gather_curve.candidates[-1]) if gather_curve is not None else 0
        self.extrapolated = 0
        self._medians: dict[int, float] = {}

    def sample(self, n: int, misses: int) -> float:
        t = misses * self.ms_per_miss + (self.latency_ms if misses else 0.0)
        if self.gather is not None and n > 0:
            if n > self.max_measured:
                self.extrapolated += 1
            t += self.gather.sample_ms(0, n, self._u())
        return t

    def expected(self, n: int, hit: float) -> float:
        """Mean cost of n ids at hit ratio `hit` (for predictions and routing)."""
        if n <= 0:
            return 0.0
        misses = n * (1.0 - hit)
        t = misses * self.ms_per_miss + (self.latency_ms if misses >= 0.5 else 0.0)
        if self.gather is not None:
            g = self._medians.get(n)
            if g is None:
                g = self._medians[n] = self.gather.median_ms(0, n)
            t += g
        return t
