"""One HBM pool per device of the relay stage, split between the embedding cache (EMB)
and the prefix KV cache (HELM).

    device HBM = weights + activation reserve + pool,   pool >= EMB side + KV side

The EMB side is a whole number of rows (embedding_cache.py); the KV side is the relay's
PrefixCache capacity. `HbmPool.set_emb_bytes` moves the boundary: when EMB grows, the KV
side shrinks first (evicting unpinned prefixes, LRU first) and EMB takes only what KV
actually gave up, since pinned prefixes (awaiting their ranking) are never dropped; when
EMB shrinks it drops its coldest rows and KV grows for free. So after every operation
emb bytes + KV capacity <= pool and KV used <= KV capacity.

`Hbm` is the runtime side of a scenario's `hbm` + `embedding` blocks for one replication:
the pools, the lookup cost model, the generator the misses are drawn from, per-request
records, and the per-interval observations the partition controllers read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import scenario as sc
from .embedding_cache import CheCurve, EmbCost, EmbeddingCache
from .prefix_cache import GhostList, PrefixCache
from .service import Draws


@dataclass
class Interval:
    """What a device saw since its controller last looked."""

    kv_refs: list = field(default_factory=list)   # (LRU stack depth bytes, ms a hit saves)
    rankings: int = 0
    late: int = 0                                 # rankings whose stage sojourn overran the budget
    emb_ms: float = 0.0                           # time spent on embedding lookups
    kv_miss_ms: float = 0.0                       # recompute / reload time a cached prefix would save
    ids: int = 0
    misses: int = 0


@dataclass
class HbmPool:
    index: int
    pool_bytes: int
    emb: EmbeddingCache
    kv: PrefixCache
    min_emb_bytes: int
    max_emb_bytes: int
    boundary: list = field(default_factory=list)   # (time ms, emb bytes) at start and every move
    moves: int = 0
    interval: Interval = field(default_factory=Interval)

    @property
    def emb_bytes(self) -> int:
        return self.emb.capacity_bytes

    def set_emb_bytes(self, target: float, now: float) -> int:
        """Move the boundary toward `target` EMB bytes (within the bounds); returns the EMB
        bytes reached, which fall short when pinned prefixes hold the KV side."""
        rb = self.emb.row_bytes
        target = min(max(int(target), self.min_emb_bytes), self.max_emb_bytes)
        rows, cur = target // rb, self.emb.rows
        if rows > cur:
            kv_cap = self.kv.resize(self.pool_bytes - rows * rb, now)
            rows = min(rows, (self.pool_bytes - kv_cap) // rb)
            if rows > cur:
                self.emb.resize(rows, now)
        elif rows < cur:
            self.emb.resize(rows, now)
            self.kv.resize(self.pool_bytes - rows * rb, now)
        if self.emb.rows != cur:
            self.moves += 1
            self.boundary.append((now, self.emb_bytes))
        return self.emb_bytes

    def take_interval(self) -> Interval:
        out, self.interval = self.interval, Interval()
        return out


@lru_cache(maxsize=8)
def che_curve(items: int, zipf_s: float) -> CheCurve:
    return CheCurve(items, zipf_s)


class Hbm:
    """The HBM pools of a relay stage's devices and the embedding lookups on them."""

    def __init__(self, scenario: sc.Scenario, caches: list[PrefixCache], gather_curve,
                 rng: np.random.Generator, n_requests: int):
        cfg, emb = scenario.hbm, scenario.embedding
        stage = scenario.stages[scenario.relay.stage]
        device = scenario.device(stage.nodes.device)
        self.cfg, self.emb_cfg = cfg, emb
        self.pool_bytes = device.hbm_bytes - cfg.weights_bytes - cfg.activation_reserve_bytes
        self.curve = che_curve(emb.items, emb.zipf_s)
        self.rng = rng
        self.cost = EmbCost(emb.row_bytes, emb.miss_gbps or device.host_link_gbps,
                            emb.miss_latency_us, gather_curve,
                            Draws(rng, lambda r, n: r.uniform(0, 1, n)).next)
        self.short_term = emb.short_term_tokens
        self.candidate_rows = emb.candidate_rows
        start, lo, hi = cfg.bounds()
        rb = emb.row_bytes
        drift = [(d.start_s * 1000.0, d.turnover_per_s / 1000.0) for d in emb.drift]
        refill = cfg.resize.emb_refill_gbps * 1e6 / rb          # rows per ms
        adaptive = not isinstance(cfg.partition, sc.StaticPartition)
        self.pools = []
        for i, kv in enumerate(caches):
            rows = int(start * self.pool_bytes) // rb
            kv.capacity = self.pool_bytes - rows * rb
            if adaptive and cfg.ghost_fraction > 0:
                kv.ghost = GhostList(int(cfg.ghost_fraction * self.pool_bytes))
            pool = HbmPool(i, self.pool_bytes, EmbeddingCache(self.curve, rb, rows, drift, refill),
                           kv, int(lo * self.pool_bytes), int(hi * self.pool_bytes))
            pool.boundary.append((0.0, pool.emb_bytes))
            self.pools.append(pool)
        self.adaptive = adaptive
        self.ids = np.zeros(n_requests, np.int32)        # ranking lookups, per request
        self.misses = np.zeros(n_requests, np.int32)
        self.emb_ms = np.zeros(n_requests)

    def lookup(self, node: int, n: int, now: float, rid: int = -1) -> float:
        """Embed n ids on a device; returns the time it adds (ms). rid >= 0: a ranking."""
        pool = self.pools[node]
        misses = pool.emb.lookup(n, now, self.rng)
        t = self.cost.sample(n, misses)
        it = pool.interval
        it.ids += n
        it.misses += misses
        it.emb_ms += t
        if rid >= 0:
            self.ids[rid], self.misses[rid], self.emb_ms[rid] = n, misses, t
        return t

    def expected_ms(self, node: int, n: int) -> float:
        return self.cost.expected(n, self.pools[node].emb.hit_ratio())
