"""Slow episodes: spells during which every job a node starts runs slower.

Real servers have them (host contention, clock or power management, a neighbour's work): for
seconds at a time every job runs 1.5-2x its usual time, and a tail percentile is made inside
them. Per-job i.i.d. noise cannot produce that, because the slow jobs come in a row and the
queue builds. A scenario declares episodes in a stage's `interference:` block, or a fitted
serving profile (`serving_profile.py`) brings its own; both become the `Interference` config
here and the same `Episodes` timelines at run time.

A timeline alternates normal spells, exponential with mean 60 / rate_per_min s, and episodes
with drawn durations and slowdowns. It is generated lazily as simulated time advances, so it
costs nothing for a long run and needs no horizon. Queries must not go back in time; SimPy
runs every process in time order, so a timeline shared by the nodes of one host is queried in
order too. A declared block stretches every job its node starts (`stage.serve`); a profile's
episodes reach each job through its size class's elasticity (`serving_profile.InServing`).
"""

from __future__ import annotations

import numpy as np

from . import scenario as sc
from .workload import draw

_BLOCK = 256
STREAM_KEY = 10_000     # interference streams: SeedSequence children apart from the others


class Episodes:
    """One node's (or one host's) episode timeline."""

    __slots__ = ("_rng", "_cfg", "_mean_gap_ms", "start_ms", "end_ms", "factor", "_buf", "_i", "count")

    def __init__(self, cfg: sc.Interference, rng: np.random.Generator):
        self._rng, self._cfg = rng, cfg
        self._mean_gap_ms = 60_000.0 / cfg.rate_per_min
        self._buf: list[tuple[float, float, float]] = []
        self._i = 0
        self.count = 0                 # episodes started so far
        self.start_ms, self.end_ms, self.factor = -1.0, 0.0, 1.0
        self._next()

    def _next(self) -> None:
        if self._i >= len(self._buf):
            r, c = self._rng, self._cfg
            gaps = r.exponential(self._mean_gap_ms, _BLOCK)
            durs = draw(c.duration_s, r, _BLOCK) * 1000.0
            facs = draw(c.slowdown, r, _BLOCK)
            self._buf = list(zip(gaps.tolist(), durs.tolist(), facs.tolist()))
            self._i = 0
        gap, dur, fac = self._buf[self._i]
        self._i += 1
        self.start_ms = self.end_ms + gap
        self.end_ms = self.start_ms + dur
        self.factor = fac
        self.count += 1

    def factor_at(self, now: float) -> float:
        """The slowdown of a job starting at `now` (1 outside episodes)."""
        while now >= self.end_ms:
            self._next()
        return self.factor if now >= self.start_ms else 1.0


def timelines(cfg: sc.Interference, n_nodes: int, seed: int, replication: int, stage_index: int,
              ) -> list[Episodes]:
    """One timeline per node; with scope host, consecutive nodes of a host share theirs."""
    per_host = cfg.nodes_per_host if cfg.scope == "host" else 1
    n_hosts = -(-n_nodes // per_host)
    seq = np.random.SeedSequence(seed, spawn_key=(replication, STREAM_KEY + stage_index))
    hosts = [Episodes(cfg, np.random.default_rng(s)) for s in seq.spawn(n_hosts)]
    return [hosts[i // per_host] for i in range(n_nodes)]
