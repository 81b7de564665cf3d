"""A tiered user-history store on a stage's nodes (SeqVault-style: LASER, arXiv 2602.11562).

Each job of the stage fetches its user's history, `bytes_per_token x L` bytes, from the
fastest tier that holds it: DRAM, SSD, or the remote store (a remote KV service that holds
every user). A fetch from tier k takes `latency_ms[k] + bytes / (gbps[k] x 1e6)` ms and
costs `cpu_ms[k]` of the node's time. Both add to the job's service time on its node, on
top of the stage's own service draw (stage.node_worker): the node's worker is held for the
fetch, a synchronous read, so fetch time also counts as the node's busy time; the CPU
figure (`cpu_ms_per_request`) counts only the store's `cpu_ms`. A batch fetches its users
one after another (the batch's time grows by the sum of its jobs' fetches and CPU costs).
A slow episode on the node stretches the whole job, the fetch included.

Placement, by popularity (hit ratios come from the workload, never from a parameter):

- `lru`: the local tiers form one exclusive chain over users, by bytes. An accessed user
  moves to the head of DRAM (from SSD, or copied from remote); DRAM overflow demotes its
  least recently used users to the head of SSD, SSD overflow drops them (they stay on the
  remote store). A user larger than a tier skips it. With equal sizes the DRAM list
  followed by the SSD list is exactly one LRU stack, so under independent references the
  DRAM hit ratio is Che's at the DRAM capacity and DRAM + SSD's is Che's at the summed one.
- `static`: a hot set fixed before the run. Users in order of popularity (the workload's
  Zipf rank, which is the user id; for a trace, the replication's request counts) fill
  DRAM as a prefix of that order while they fit, then SSD the same way; the rest are
  remote. The DRAM hit ratio is then the Zipf mass of its users.

An `lru` store starts full (`warm_start`, the default), in a draw of LRU's stationary state
under the popularity model (`build`), as a store that has long been serving would be: an
empty one would put a replication's compulsory misses inside the measurement, and the
static hot set (the best an LRU could hold) would bias a short run's hit ratios upwards.

Scope (`scope`): `node` (the default) gives each node its own tiers of the configured
capacities (a per-host SeqVault: with a user-affine router a user's history stays on one
host; with others each node caches what it sees); `shared` gives the stage one store of
these capacities (a disaggregated cache tier). A static hot set is the same either way.

The fast engine (stagewise.py) declines scenarios with a store; SimPy runs them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DRAM, SSD, REMOTE = 0, 1, 2
TIERS = ("dram", "ssd", "remote")
NONE = -1                       # the request never reached the stage's service


@dataclass
class HistoryRecords:
    """Per request (of one replication), at one stage: the tier that served its history
    (-1: not served), its fetch time (ms), the store's CPU time (ms) and the bytes."""

    tier: np.ndarray            # int8
    fetch_ms: np.ndarray
    cpu_ms: np.ndarray
    bytes: np.ndarray           # int64

    @classmethod
    def empty(cls, n: int) -> "HistoryRecords":
        return cls(np.full(n, NONE, np.int8), np.full(n, np.nan), np.full(n, np.nan),
                   np.zeros(n, np.int64))


class Level:
    """One local tier's contents: users (least recently used first) and their bytes."""

    __slots__ = ("code", "capacity", "users", "used")

    def __init__(self, code: int, capacity: int):
        self.code, self.capacity = code, capacity
        self.users: OrderedDict[int, int] = OrderedDict()
        self.used = 0


class LRUPlacement:
    """The exclusive DRAM -> SSD chain of LRU lists over users, by bytes (module doc)."""

    def __init__(self, capacities: dict[int, int]):
        self.levels = [Level(code, cap) for code, cap in sorted(capacities.items())]
        self.where: dict[int, Level] = {}

    def access(self, user: int, size: int) -> int:
        """Serve `user` (its history now `size` bytes): the tier it was read from, after
        which it is at the head of the first tier that can hold it."""
        level = self.where.pop(user, None)
        if level is not None:
            level.used -= level.users.pop(user)
        self._insert(0, user, size)
        return REMOTE if level is None else level.code

    def _insert(self, k: int, user: int, size: int) -> None:
        levels = self.levels
        while k < len(levels) and size > levels[k].capacity:
            k += 1                      # too large for this tier: it goes to the next
        if k == len(levels):
            return                      # only on the remote store
        level = levels[k]
        level.users[user] = size
        level.used += size
        self.where[user] = level
        while level.used > level.capacity:
            victim, vsize = level.users.popitem(last=False)
            level.used -= vsize
            del self.where[victim]
            self._insert(k + 1, victim, vsize)

    def fill(self, bounds: list[tuple[int, int]], sizes: np.ndarray, ids: np.ndarray) -> None:
        """Start full: users in recency order (`ids`, most recent first; `sizes` their
        bytes), the tiers taking the prefixes `bounds` gives (prefix_bounds)."""
        lo = 0
        for (hi, code), level in zip(bounds, self.levels):
            for r in range(hi - 1, lo - 1, -1):          # least recent first: the LRU end
                user, size = int(ids[r]), int(sizes[r])
                level.users[user] = size
                level.used += size
                self.where[user] = level
            lo = hi

    def resident(self) -> dict[int, int]:
        """Bytes held per local tier."""
        return {lv.code: lv.used for lv in self.levels}

    def check(self) -> None:
        """The invariants (for tests): each tier's used bytes are the sum of its users'
        sizes and within its capacity; a user is in at most one tier."""
        seen = set()
        for lv in self.levels:
            assert lv.used == sum(lv.users.values()), (lv.code, lv.used)
            assert 0 <= lv.used <= lv.capacity, (lv.code, lv.used, lv.capacity)
            assert not seen & lv.users.keys()
            seen |= lv.users.keys()
            assert all(self.where[u] is lv for u in lv.users)
        assert seen == self.where.keys()


def prefix_bounds(capacities: dict[int, int], sizes: np.ndarray) -> list[tuple[int, int]]:
    """Tiers (DRAM first) filled by prefixes of an order of users with these sizes: each
    takes the users from where the last stopped while their bytes fit. (end, tier) each."""
    bounds, start = [], 0
    for code, cap in sorted(capacities.items()):
        fits = np.cumsum(sizes[start:], dtype=np.float64) <= cap
        k = start + (int(np.argmin(fits)) if not fits.all() else len(fits))
        bounds.append((k, code))
        start = k
    return bounds


class StaticPlacement:
    """A hot set fixed before the run: `rank_bytes[i]` are the bytes of the i-th most
    popular user (`order[i]` its id, or None when the id is the rank) and the tiers take
    prefixes of that order (module doc)."""

    def __init__(self, capacities: dict[int, int], rank_bytes: np.ndarray,
                 order: np.ndarray | None = None):
        self.bounds = prefix_bounds(capacities, rank_bytes)    # (first rank after the tier, tier)
        self.resident_bytes: dict[int, int] = {}
        lo = 0
        for hi, code in self.bounds:
            self.resident_bytes[code] = int(rank_bytes[lo:hi].sum())
            lo = hi
        self.tier_of = None
        if order is not None:           # trace ids: a dict of the hot users
            self.tier_of = {}
            lo = 0
            for hi, code in self.bounds:
                self.tier_of.update((int(u), code) for u in order[lo:hi])
                lo = hi

    def access(self, user: int, size: int) -> int:
        if self.tier_of is not None:
            return self.tier_of.get(user, REMOTE)
        for hi, code in self.bounds:
            if user < hi:
                return code
        return REMOTE

    def held(self, code: int) -> int:
        """How many users (the most popular ones) tier `code` holds."""
        lo = 0
        for hi, c in self.bounds:
            if c == code:
                return hi - lo
            lo = hi
        return 0

    def resident(self) -> dict[int, int]:
        return dict(self.resident_bytes)

    def check(self) -> None:
        pass


class HistoryStore:
    """One stage's store at run time: the placements (one per node, or one shared), the
    tiers' costs, and the per-request records."""

    def __init__(self, cfg, placements: list, n_requests: int):
        tiers = cfg.tiers
        spec = {DRAM: tiers.dram, SSD: tiers.ssd, REMOTE: tiers.remote}
        self.bytes_per_token = cfg.bytes_per_token
        self.latency = [t.latency_ms if t else 0.0 for t in spec.values()]
        self.ms_per_byte = [1.0 / (t.gbps * 1e6) if t else 0.0 for t in spec.values()]
        self.cpu = [t.cpu_ms if t else 0.0 for t in spec.values()]
        self.placements = placements
        self.records = HistoryRecords.empty(n_requests)

    def serve(self, node: int, batch) -> float:
        """Fetch each job's history on `node`; record it; return the time the batch gains."""
        place = self.placements[node]
        rec = self.records
        total = 0.0
        for job in batch:
            size = self.bytes_per_token * int(job.L)
            k = place.access(job.user, size)
            fetch = self.latency[k] + size * self.ms_per_byte[k]
            cpu = self.cpu[k]
            rid = job.rid
            rec.tier[rid], rec.fetch_ms[rid], rec.cpu_ms[rid], rec.bytes[rid] = k, fetch, cpu, size
            total += fetch + cpu
        return total


def capacities(cfg) -> dict[int, int]:
    tiers = cfg.tiers
    return {code: t.capacity_bytes for code, t in ((DRAM, tiers.dram), (SSD, tiers.ssd)) if t is not None}


def popularity(workload, reqs, population_rng: np.random.Generator | None):
    """Users by popularity rank: (history tokens, ids or None where the id is the rank,
    reference probabilities).

    Generated users: the id is the Zipf rank, and the lengths are the population's, drawn
    again from the workload's stream (workload.generate draws them first from it). Traces:
    users by request count in this replication (ties: smaller id first), each at its
    longest L, with probabilities their request shares."""
    from . import scenario as sc
    from .workload import UserPopulation
    if isinstance(workload.arrivals, sc.TraceArrivals):
        uid, L = np.asarray(reqs.user_id), np.asarray(reqs.history_len)
        users, inv, counts = np.unique(uid, return_inverse=True, return_counts=True)
        longest = np.zeros(len(users), np.int64)
        np.maximum.at(longest, inv, L)
        order = np.lexsort((users, -counts))
        return longest[order], users[order], counts[order] / max(counts.sum(), 1)
    pop = UserPopulation(workload.users, population_rng)
    if reqs is not None and len(reqs) and not np.array_equal(pop.history_len[reqs.user_id], reqs.history_len):
        raise RuntimeError("history_store: the user population could not be reproduced")
    p = np.diff(pop.cdf, prepend=0.0)
    return pop.history_len, None, p


def streams(seed: int, index: int, k: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(the workload's stream again, to redraw the population; the warm start's own stream
    for stage k, apart from every stream the run draws from)."""
    from .cascade import stream
    warm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1 << 30, k)))
    return stream(seed, index, 1)[0], warm


def build(cfg, workload, reqs, nodes: int, seed: int, index: int, k: int) -> HistoryStore:
    """Stage k's store (`nodes` nodes) for replication `index`'s requests.

    A warm LRU start is a draw of LRU's stationary state under independent references:
    with user i referenced as a Poisson process of rate p_i, the time since its last
    reference is exponential with rate p_i, and an LRU chain holds the users in order of
    that age (most recent at the head of DRAM) as far as they fit. Each node's store gets
    its own draw (a node sees a random share of the references: the same order law)."""
    caps = capacities(cfg)
    if cfg.placement == "lru" and not (cfg.warm_start and caps):
        places = [LRUPlacement(caps) for _ in range(1 if cfg.scope == "shared" else nodes)]
        return HistoryStore(cfg, places * nodes if cfg.scope == "shared" else places, len(reqs))
    population_rng, warm_rng = streams(seed, index, k)
    tokens, order, p = popularity(workload, reqs, population_rng)
    rank_bytes = tokens.astype(np.int64) * cfg.bytes_per_token
    if cfg.placement == "static":
        return HistoryStore(cfg, [StaticPlacement(caps, rank_bytes, order)] * nodes, len(reqs))
    ids = order if order is not None else np.arange(len(rank_bytes))
    places = []
    for _ in range(1 if cfg.scope == "shared" else nodes):
        live = np.flatnonzero(p > 0)
        age = warm_rng.exponential(size=len(live)) / p[live]
        recent = live[np.argsort(age, kind="stable")]
        lru = LRUPlacement(caps)
        lru.fill(prefix_bounds(caps, rank_bytes[recent]), rank_bytes[recent], ids[recent])
        places.append(lru)
    return HistoryStore(cfg, places * nodes if cfg.scope == "shared" else places, len(reqs))


def zipf_mass(count: int, s: float, users: int) -> float:
    """The request share of the `users` most popular of `count` Zipf(s) users."""
    w = np.arange(1, count + 1, dtype=float) ** -s
    return float(w[:users].sum() / w.sum())


def che_hit_ratios(p: np.ndarray, size: np.ndarray, capacity: float) -> float:
    """Che's approximation of an LRU cache's hit ratio under independent references with
    popularities `p` and sizes `size` (bytes): the characteristic time T solves
    sum_i size_i (1 - exp(-p_i T)) = capacity; the hit ratio is sum_i p_i (1 - exp(-p_i T))."""
    from scipy.optimize import brentq
    p = np.asarray(p, float) / np.sum(p)
    size = np.asarray(size, float)
    if size.sum() <= capacity:
        return 1.0
    f = lambda logt: float(np.sum(size * -np.expm1(-p * np.exp(logt)))) - capacity
    logt = brentq(f, -50.0, 80.0, xtol=1e-10)
    return float(np.sum(p * -np.expm1(-p * np.exp(logt))))


# ---------------------------------------------------------------- results (results.py calls these)
def metrics(rep, measured: np.ndarray) -> dict:
    """summary.json figures per stage with a store, over measured requests that reached
    it: hit ratio and bytes fetched per tier, fetch latency mean and P99, the store's CPU
    ms per request, and the bytes local tiers held at the end of the run. {} without a store."""
    stores = getattr(rep, "history", None)
    if not stores:
        return {}
    out = {}
    for name, r in stores.items():
        tier = r.tier[measured]
        served = tier != NONE
        n = int(served.sum())
        fetch, cpu, size = r.fetch_ms[measured][served], r.cpu_ms[measured][served], r.bytes[measured][served]
        tier = tier[served]
        nan = float("nan")
        out[name] = {
            "hit_ratio": {t: float((tier == k).sum() / n) if n else nan for k, t in enumerate(TIERS)},
            "bytes_fetched": {t: int(size[tier == k].sum()) for k, t in enumerate(TIERS)},
            "fetch_ms_mean": float(fetch.mean()) if n else nan,
            "fetch_ms_p99": float(np.percentile(fetch, 99)) if n else nan,
            "cpu_ms_per_request": float(cpu.mean()) if n else nan,
            "bytes_per_request": float(size.mean()) if n else nan,
        }
    return {"history": out}


METRICS = (*(f"hit_ratio.{t}" for t in TIERS), *(f"bytes_fetched.{t}" for t in TIERS),
           "fetch_ms_mean", "fetch_ms_p99", "cpu_ms_per_request", "bytes_per_request")


def metric_names(scenario) -> set[str]:
    """The flat metric names `metrics` adds (for sweep.metric_names)."""
    return {f"history.{name}.{m}" for name, st in scenario.stages.items()
            if st.history_store is not None for m in METRICS}


def columns(rep, rows: slice = slice(None)) -> dict:
    """requests.parquet columns per stage with a store: `<stage>_history_tier` (dram, ssd,
    remote; none where the request never reached the stage) and `<stage>_history_fetch_ms`."""
    import pyarrow as pa
    stores = getattr(rep, "history", None)
    if not stores:
        return {}
    labels = pa.array(["none", *TIERS])
    out = {}
    for name, r in stores.items():
        codes = (r.tier[rows].astype(np.int16) + 1).astype(np.int8)
        out[f"{name}_history_tier"] = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), labels)
        out[f"{name}_history_fetch_ms"] = r.fetch_ms[rows]
    return out
