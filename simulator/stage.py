"""A stage: a pool of nodes served one batch at a time, and a dispatcher.

Either each node has its own FIFO queue and a router picks the node on arrival, or
(`router: shared`) all nodes pull from one FIFO queue, which is the M/M/c discipline.

A node's worker is a plain SimPy generator: wait for work, optionally hold the batch open
until it is full or the oldest job has waited `max_wait_ms`, serve it, repeat.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
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
    index: int
    queue: deque = field(default_factory=deque)
    pre_queue: deque = field(default_factory=deque)   # pre-infer jobs, when prioritised apart
    wakeup: simpy.Event | None = None
    in_service: int = 0
    busy_ms: float = 0.0           # total busy time so far
    busy_since: float = -1.0       # start of the current batch, -1 when idle
    current_ms: float = 0.0        # service time of the current batch
    backlog_ms: float = 0.0        # predicted work queued (relay stages keep this)
    busy_starts: list = field(default_factory=list)
    busy_ends: list = field(default_factory=list)
    episodes: object = None        # interference.Episodes: slow spells on this node, or None

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self.wake()

    def wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.succeed()
            self.wakeup = None

    def busy_until(self, now: float) -> float:
        """Busy time accumulated up to `now`, counting the batch in progress."""
        return self.busy_ms + (now - self.busy_since if self.busy_since >= 0 else 0.0)


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
    while True:
        while not queue:   # a shared queue may be emptied by a sibling before we run
            node.wakeup = env.event()
            yield node.wakeup
        if max_batch > 1 and max_wait > 0:
            deadline = queue[0].enqueued_ms + max_wait
            while len(queue) < max_batch and env.now < deadline:
                node.wakeup = env.event()
                yield node.wakeup | env.timeout(deadline - env.now)
                node.wakeup = None
            if not queue:
                continue
        n = min(len(queue), max_batch)
        batch = [queue.popleft() for _ in range(n)]
        now = env.now
        if bind is not None:
            bind(node, now)
        t = yield from serve(env, node, n, batch_service_ms(stage, batch))
        for job in batch:
            job.node = node.index
            job.start_ms, job.service_ms, job.batch = now, t, n
            job.done.succeed()


def serve(env: simpy.Environment, node: Node, n: int, t: float):
    """Hold the node busy with n jobs for t ms (stretched by a slow episode the node is in),
    keeping its busy accounting. Returns the time it took."""
    if node.episodes is not None:
        t *= node.episodes.factor_at(env.now)
    node.in_service, node.busy_since, node.current_ms = n, env.now, t
    node.busy_starts.append(env.now)
    yield env.timeout(t)
    node.busy_ms += t
    node.in_service, node.busy_since = 0, -1.0
    node.busy_ends.append(env.now)
    return t


def make_dispatch(env: simpy.Environment, kind: str, nodes: list[Node],
                  pick: Callable[[int], Node] | None, service: ServiceTime) -> Callable[[Job], None]:
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

    def to_shared_queue(job: Job) -> None:
        shared.append(job)
        for nd in nodes:
            if nd.wakeup is not None:
                nd.wakeup.succeed()
                nd.wakeup = None
                return
    return to_shared_queue
