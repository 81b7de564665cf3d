"""Routers: which node of a stage's pool gets a job (ranking request or pre-infer signal).

A router is a function `pick(user) -> Node`. Affinity routers hash the user id on a
consistent-hash ring with virtual nodes, so a user's pre-infer signal and its ranking
request meet on the same instance; the fallback variant leaves the ring when the home
instance is overloaded. Ties between equally loaded nodes are broken uniformly at random
from the stage's routing stream (a draw only when there is a tie), so identical nodes get
identical shares; the lowest index would take every tie (94% against 55% utilisation on
eight identical nodes at moderate load).

A router is a plain state machine: it reads node state, and the load-based ones keep an
index of it (`LeastLoaded`) that the nodes update through their `watch` hook, so a pick
costs O(log N), not a scan of the pool. Both engines drive the same router objects.

`hbm_aware` (HELM's EMB/KV-aware routing) needs the relay's cache state, so the relay
installs it with `make_cost_router`: the node with the least expected finish time, i.e.
its predicted backlog plus this ranking's predicted time there, which is short where the
user's prefix is resident and where the embedding hit ratio is high. Until the relay installs it (and for anything but the relay) it is least-loaded.
"""

from __future__ import annotations

from bisect import bisect_left
from heapq import heapify, heappop, heappush
from typing import Callable

import numpy as np

from .service import Draws

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser: a fixed, well-spread 64-bit hash (Python's hash() is not)."""
    x = (int(x) + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class HashRing:
    """Consistent hashing of user ids onto node indices, `virtual_nodes` points per node."""

    def __init__(self, n_nodes: int, virtual_nodes: int):
        points = sorted((mix64((node << 20) | v), node) for node in range(n_nodes)
                        for v in range(virtual_nodes))
        self.keys = [p for p, _ in points]
        self.owner = [o for _, o in points]

    def node_of(self, user: int) -> int:
        i = bisect_left(self.keys, mix64(user ^ 0x5BD1E995))
        return self.owner[i % len(self.keys)]


def load(node) -> int:
    """Jobs waiting at or being served by a node (its own queues only)."""
    return len(node.queue) + len(node.pre_queue) + node.in_service


class LeastLoaded:
    """`min(nodes, key=load)` in O(log N): a heap of (load, index) entries kept current by
    `update`, which every node calls (its `watch`) after its load changes. Stale entries
    are skipped lazily and the heap is rebuilt when they pile up. With `indexed=False` it
    scans instead: for node owners that change loads without telling (the relay worker
    drops a cancelled pre-infer job silently).

    Ties: with `tie` (a uniform [0, 1) draw), a pick among several least-loaded nodes
    takes one of them uniformly, by index order; without it, the lowest index. The tied
    set depends only on the loads (`cur`), never on the heap's layout, so both engines
    (the fast one updates `cur` and `heap` in line) draw the same nodes."""

    __slots__ = ("nodes", "cur", "heap", "indexed", "tie")

    def __init__(self, nodes: list, indexed: bool = True, tie: Callable[[], float] | None = None):
        self.nodes, self.indexed, self.tie = nodes, indexed, tie
        self.cur = [load(nd) for nd in nodes]
        self.heap = [(l, i) for i, l in enumerate(self.cur)]
        heapify(self.heap)
        if indexed:
            for nd in nodes:
                nd.watch = self.update

    def update(self, node) -> None:
        i = node.index
        now = len(node.queue) + len(node.pre_queue) + node.in_service
        if now != self.cur[i]:
            self.cur[i] = now
            heappush(self.heap, (now, i))
            if len(self.heap) > 4 * len(self.cur) + 64:
                self.rebuild()

    def rebuild(self) -> None:
        """Drop the stale entries (in place: an engine may hold the list)."""
        self.heap[:] = [(l, j) for j, l in enumerate(self.cur)]
        heapify(self.heap)

    def pick(self, user: int = 0):
        """The least-loaded node (the index's first entry that is current; a tie drawn)."""
        heap, cur = self.heap, self.cur
        while True:
            l, i = heap[0]
            if cur[i] == l:
                break
            heappop(heap)
        # Another entry of load l (current or stale) has ancestors of load l, so it shows
        # in the root's children: when neither holds l, node i is the only least-loaded.
        if self.tie is None or not ((len(heap) > 1 and heap[1][0] == l) or (len(heap) > 2 and heap[2][0] == l)):
            return self.nodes[i]
        return self.nodes[self._draw([j for j, c in enumerate(cur) if c == l])]

    def scan(self, user: int = 0):
        loads = [load(nd) for nd in self.nodes]
        least = min(loads)
        if self.tie is None:
            return self.nodes[loads.index(least)]
        return self.nodes[self._draw([j for j, c in enumerate(loads) if c == least])]

    def _draw(self, tied: list[int]) -> int:
        return tied[0] if len(tied) == 1 else tied[int(self.tie() * len(tied))]

    def __call__(self, user: int = 0):
        return self.pick(user) if self.indexed else self.scan(user)


def make_picker(kind: str, nodes: list, rng: np.random.Generator, virtual_nodes: int = 64,
                overload_jobs: int = 8, indexed: bool = True) -> Callable[[int], object]:
    """The router of a stage. `indexed`: the nodes report load changes (see LeastLoaded)."""
    n = len(nodes)
    if n == 1:
        only = nodes[0]
        return lambda user: only
    uniform = Draws(rng, lambda r, k: r.uniform(0, 1, k)).next   # the stage's routing stream
    if kind == "round_robin":
        state = {"next": 0}

        def round_robin(user: int):
            i = state["next"]
            state["next"] = (i + 1) % n
            return nodes[i]
        return round_robin
    if kind in ("least_loaded", "hbm_aware"):
        router = LeastLoaded(nodes, indexed, tie=uniform)
        return router.pick if indexed else router.scan
    if kind in ("affinity", "affinity_fallback"):
        ring = HashRing(n, virtual_nodes)
        if kind == "affinity":
            return lambda user: nodes[ring.node_of(user)]
        router = LeastLoaded(nodes, indexed, tie=uniform)
        least = router.pick if indexed else router.scan

        def affinity_fallback(user: int):
            home = nodes[ring.node_of(user)]
            return home if load(home) < overload_jobs else least(user)
        return affinity_fallback
    if kind == "random":
        return lambda user: nodes[int(uniform() * n)]
    if kind == "power_of_two":
        def power_of_two(user: int):
            a = int(uniform() * n)
            b = (a + 1 + int(uniform() * (n - 1))) % n   # a different node, uniformly
            return min(nodes[a], nodes[b], key=load)
        return power_of_two
    raise ValueError(kind)


def make_cost_router(nodes: list, cost: Callable) -> Callable:
    """route(user, L, M, now) -> the node of least cost(node, user, L, M, now)."""
    def hbm_aware(user: int, L: int, M: int, now: float):
        best, best_cost = nodes[0], cost(nodes[0], user, L, M, now)
        for nd in nodes[1:]:
            c = cost(nd, user, L, M, now)
            if c < best_cost:
                best, best_cost = nd, c
        return best
    return hbm_aware
