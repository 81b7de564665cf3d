"""A stage: a pool of nodes served one batch at a time, and a dispatcher.

Either each node has its own FIFO queue and a router picks the node on arrival, or
(`router: shared`) all nodes pull from one FIFO queue, which is the M/M/c discipline.

A node's worker is a plain SimPy generator: wait for work, optionally hold the batch open
until it is full or the oldest job has waited `max_wait_ms`, serve it, repeat. The fast
engine (stagewise.py) drives the same Node state without SimPy; whatever a policy reads
from a node (its queues, what it serves, its busy time, the end of its last batch) means
the same under both engines.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from typing import Callable

import simpy

from .service import ServiceTime


@dataclass(slots=True)
class Job:
    """One request's visit to one stage."""

    rid: int
    user: int
    L: int
    M: int
    enqueued_ms: float
    done: simpy.Event | None
    node: int = -1
    start_ms: float = 0.0
    service_ms: float = 0.0
    batch: int = 0
    kind: int = 0              # 0: the request's own work; relay.PRE_JOB: a pre-infer job
    pred_ms: float = 0.0       # predicted service time, for backlog-aware policies


@dataclass(slots=True)
class Node:
    """One node's state. Busy time is kept as running sums (the whole run, and the
    measurement window [window_lo_ms, window_hi_ms]), not as a list of intervals, so a
    node's memory does not grow with the jobs it serves."""

    index: int
    queue: deque = field(default_factory=deque)
    pre_queue: deque = field(default_factory=deque)   # pre-infer jobs, when prioritised apart
    wakeup: simpy.Event | None = None
    in_service: int = 0
    busy_ms: float = 0.0           # total busy time of finished batches
    busy_since: float = -1.0       # start of the current batch, -1 when idle
    current_ms: float = 0.0        # service time of the current batch
    backlog_ms: float = 0.0        # predicted work queued (relay stages keep this)
    last_end_ms: float = -math.inf # end of the last finished batch (-inf: none yet)
    batches: int = 0               # finished batches
    window_lo_ms: float = 0.0
    window_hi_ms: float = math.inf
    window_busy_ms: float = 0.0    # busy time of finished batches inside the window
    episodes: object = None        # interference.Episodes: slow spells on this node, or None
    watch: Callable | None = None  # called after the node's load changes (a router's index)

    @property
    def busy_ends(self) -> tuple:
        """The end of the last finished batch, as a sequence (empty before the first)."""
        return () if self.batches == 0 else (self.last_end_ms,)

    def submit(self, job) -> None:
        self.queue.append(job)
        self.wake()

    def wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.succeed()
            self.wakeup = None
        if self.watch is not None:     # a pre-infer job may have joined pre_queue
            self.watch(self)

    def busy_until(self, now: float) -> float:
        """Busy time accumulated up to `now`, counting the batch in progress."""
        return self.busy_ms + (now - self.busy_since if self.busy_since >= 0 else 0.0)

    def start_batch(self, now: float, n: int, t: float) -> None:
        """(The jobs just left the queue for service: the node's load is unchanged.)"""
        self.in_service, self.busy_since, self.current_ms = n, now, t

    def end_batch(self, now: float, t: float) -> None:
        self.busy_ms += t
        span = min(now, self.window_hi_ms) - max(self.busy_since, self.window_lo_ms)
        if span > 0:
            self.window_busy_ms += span
        self.in_service, self.busy_since = 0, -1.0
        self.last_end_ms = now
        self.batches += 1
        if self.watch is not None:
            self.watch(self)

    def busy_in_window(self, now: float) -> float:
        """Busy time inside the window, a batch in progress at `now` counted up to `now`."""
        if self.busy_since < 0:
            return self.window_busy_ms
        span = min(now, self.window_hi_ms) - max(self.busy_since, self.window_lo_ms)
        return self.window_busy_ms + (span if span > 0 else 0.0)


@dataclass(slots=True)
class Stage:
    name: str
    nodes: list[Node]
    dispatch: Callable[[Job], None]
    pick: Callable[[int], Node] | None     # the router (None for a shared queue)
    service: ServiceTime
    max_batch: int
    max_wait_ms: float
    marginal_cost: float
    hop_ms: float
    candidates: int | None
    router: str = "round_robin"            # the scenario's router kind (shared, delay, ...)
    armed: "Armed | None" = None           # shared queue: the nodes waiting for work
    history: object = None                 # history_store.HistoryStore of this stage, or None


def batch_service_ms(stage: Stage, batch: list[Job]) -> float:
    """The first job's draw plus marginal_cost times each other job's draw."""
    sample = stage.service.sample
    first = sample(batch[0].L, batch[0].M)
    if len(batch) == 1:
        return first
    return first + stage.marginal_cost * sum(sample(j.L, j.M) for j in batch[1:])


def node_worker(env: simpy.Environment, stage: Stage, node: Node):
    """Serve the node's queue forever, one batch at a time."""
    queue, max_batch, max_wait = node.queue, stage.max_batch, stage.max_wait_ms
    bind = getattr(stage.service, "bind", None)     # a cost model that depends on the node's state
    refresh = getattr(stage.service, "refresh", None)   # a cost model with per-user state
    armed = stage.armed
    while True:
        while not queue:   # a shared queue may be emptied by a sibling before we run
            node.wakeup = env.event()
            if armed is not None:
                armed.push(node)
            yield node.wakeup
        if max_batch > 1 and max_wait > 0:
            deadline = queue[0].enqueued_ms + max_wait
            while len(queue) < max_batch and env.now < deadline:
                node.wakeup = env.event()
                if armed is not None:
                    armed.push(node)
                yield node.wakeup | env.timeout(deadline - env.now)
                node.wakeup = None
            if not queue:
                continue
        n = min(len(queue), max_batch)
        batch = [queue.popleft() for _ in range(n)]
        now = env.now
        if bind is not None:
            bind(node, now)
        t = batch_service_ms(stage, batch)
        if refresh is not None:               # VISTA: stale summaries recomputed in line
            t += refresh(batch, now)
        if stage.history is not None:         # the users' history fetches and the store's CPU
            t += stage.history.serve(node.index, batch)
        if node.episodes is not None:         # serve(), in line
            t *= node.episodes.factor_at(now)
        node.start_batch(now, n, t)
        yield env.timeout(t)
        node.end_batch(env.now, t)
        for job in batch:
            job.node = node.index
            job.start_ms, job.service_ms, job.batch = now, t, n
            job.done.succeed()


def serve(env: simpy.Environment, node: Node, n: int, t: float):
    """Hold the node busy with n jobs for t ms (stretched by a slow episode the node is in),
    keeping its busy accounting. Returns the time it took."""
    if node.episodes is not None:
        t *= node.episodes.factor_at(env.now)
    node.start_batch(env.now, n, t)
    yield env.timeout(t)
    node.end_batch(env.now, t)
    return t


class Armed:
    """The nodes of a shared queue that wait for work (their `wakeup` is set), lowest index
    first: what `for node in nodes: if node.wakeup is not None` finds, in O(log N). Entries
    go stale when a node stops waiting without being picked; they are skipped lazily."""

    __slots__ = ("nodes", "heap")

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        self.heap: list[int] = []

    def push(self, node: Node) -> None:
        heappush(self.heap, node.index)
        if len(self.heap) > 4 * len(self.nodes) + 64:
            self.heap = [nd.index for nd in self.nodes if nd.wakeup is not None]
            heapify(self.heap)

    def first(self) -> Node | None:
        """The lowest-index waiting node, taken off the heap (None if none waits)."""
        heap, nodes = self.heap, self.nodes
        while heap:
            nd = nodes[heappop(heap)]
            if nd.wakeup is not None:
                return nd
        return None


def make_dispatch(env: simpy.Environment, kind: str, nodes: list[Node],
                  pick: Callable[[int], Node] | None, service: ServiceTime,
                  armed: Armed | None = None) -> Callable[[Job], None]:
    """How a stage hands a job to its nodes: a router's pick, one shared FIFO queue, or
    (`delay`) no queue at all: an infinite-server stage that only adds its service time."""
    if kind == "delay":
        def delay(job: Job) -> None:
            t = service.sample(job.L, job.M)
            job.node, job.start_ms, job.service_ms, job.batch = 0, env.now, t, 1
            env.timeout(t).callbacks.append(lambda _: job.done.succeed())
        return delay
    if kind != "shared":
        return lambda job: pick(job.user).submit(job)
    shared: deque = deque()
    for nd in nodes:
        nd.queue = shared
    armed = armed or Armed(nodes)

    def to_shared_queue(job: Job) -> None:
        shared.append(job)
        nd = armed.first()
        if nd is not None:
            nd.wakeup.succeed()
            nd.wakeup = None
    return to_shared_queue
