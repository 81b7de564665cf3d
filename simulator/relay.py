"""RelayGR on a ranking stage: pre-infer signals, triggers, the prefix caches, and the
worker that decides each job's cost from the cache state when the job starts.

Flow. When a request finishes `relay.signal_after` (or arrives), a pre-infer signal
travels `signal_ms` to the instance the ranking router picks for that user. There the
trigger decides whether to pre-infer; if so the user's prefix bytes are reserved and
pinned in that instance's HBM cache and a pre-infer job joins the queue. The job costs
`prefix_encode(L)` (or `prefix_reload(L)` if the DRAM expander holds the prefix). When the
ranking request starts, the instance looks for the prefix: HBM hit -> `rank_cached`; DRAM
-> `prefix_reload + rank_cached` (if cheaper, or always); held by another instance and
`remote: fetch` -> network transfer + `rank_cached`; else `full_forward`. A pre-infer job
whose ranking request started before it ran on the same instance is cancelled (wasted).
A request's pin is released when its ranking starts, wherever that is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from . import scenario as sc
from .prefix_cache import DramTier, PrefixCache
from .service import GRPhases
from .stage import Job, Node, Stage, serve

# Ranking outcome codes (requests.parquet `<stage>_prefix`).
MISS, HIT, DRAM, REMOTE, PENDING = 0, 1, 2, 3, 4
PREFIX_OUTCOMES = {MISS: "miss", HIT: "hit", DRAM: "dram", REMOTE: "remote", PENDING: "pending"}
# Pre-infer signal outcome codes (requests.parquet `pre_infer`).
NOT_SIGNALLED, ADMITTED, ALREADY_CACHED, REJECTED, NOT_TRIGGERED = 0, 1, 2, 3, 4
PRE_OUTCOMES = {NOT_SIGNALLED: "not_signalled", ADMITTED: "admitted", ALREADY_CACHED: "already_cached",
                REJECTED: "rejected", NOT_TRIGGERED: "not_triggered"}
PRE_JOB = 1


@dataclass
class PreInferCounters:
    admitted: int = 0
    used: int = 0          # admitted jobs whose prefix served at least one ranking hit
    cancelled: int = 0     # dropped before running: their ranking already started there
    rejected: int = 0
    time_in_queue_ms: float = 0.0   # summed waiting + service of all pre-infer jobs (Little's law)


@dataclass
class Relay:
    cfg: sc.Relay
    stage: Stage
    phases: GRPhases
    caches: list[PrefixCache]
    pick: object                     # the stage's router: user -> Node
    budget_ms: float
    pinned_at: np.ndarray            # per request: node index holding its pin, -1 if none
    prefix: np.ndarray               # per request: ranking outcome code
    pre: np.ndarray                  # per request: signal outcome code
    counters: PreInferCounters = field(default_factory=PreInferCounters)

    # ------------------------------------------------------------------ signals
    def signal(self, env: simpy.Environment, rid: int, user: int, L: int, M: int) -> None:
        """The pre-infer signal for request rid reaches the ranking stage."""
        node = self.pick(user)
        cache = self.caches[node.index]
        entry = cache.entries.get(user)
        if entry is not None:          # prefix resident or being computed: just pin it
            if entry.pins == 0:
                cache.pinned += entry.nbytes
            entry.pins += 1
            self.pinned_at[rid] = node.index
            self.pre[rid] = ALREADY_CACHED
            return
        if not self.triggered(node, L, M, env.now):
            self.pre[rid] = NOT_TRIGGERED
            return
        nbytes = self.phases.prefix_bytes(L)
        if not self.admissible(node, cache, nbytes) or cache.reserve(user, nbytes, env.now) is None:
            self.pre[rid] = REJECTED
            self.counters.rejected += 1
            return
        self.pinned_at[rid] = node.index
        self.pre[rid] = ADMITTED
        self.counters.admitted += 1
        job = Job(rid, user, L, 0, env.now, None, kind=PRE_JOB)
        job.pred_ms = self.phases.median("prefix_encode", L)
        if self.cfg.queue == "fifo":
            node.submit(job)
        else:
            node.pre_queue.append(job)
            node.wake()
        node.backlog_ms += job.pred_ms

    def triggered(self, node: Node, L: int, M: int, now: float) -> bool:
        trig = self.cfg.trigger
        if isinstance(trig, sc.NoTrigger):
            return False
        if isinstance(trig, sc.AllTrigger):
            return True
        if isinstance(trig, sc.LengthTrigger):
            return L >= trig.min_history_len
        predicted = self.backlog(node, now) + self.phases.median("full_forward", L, M)
        return predicted > self.budget_ms

    def admissible(self, node: Node, cache: PrefixCache, nbytes: int) -> bool:
        trig = self.cfg.trigger
        if not isinstance(trig, sc.SequenceAwareTrigger):
            return True
        pending = sum(1 for j in node.queue if j.kind == PRE_JOB) + len(node.pre_queue)
        return (pending < trig.max_pending
                and cache.pinned + nbytes <= trig.max_pinned_fraction * cache.capacity)

    @staticmethod
    def backlog(node: Node, now: float) -> float:
        """Predicted work ahead on a node: queued jobs plus the rest of the one in service."""
        rest = node.busy_since + node.current_ms - now if node.busy_since >= 0 else 0.0
        return node.backlog_ms + max(rest, 0.0)

    # ------------------------------------------------------------------ ranking
    def submit_rank(self, job: Job) -> None:
        node = self.pick(job.user)
        cached = job.user in self.caches[node.index].entries
        job.pred_ms = self.phases.median("rank_cached" if cached else "full_forward", job.L, job.M)
        node.backlog_ms += job.pred_ms
        node.submit(job)

    def rank_cost(self, job: Job, node: Node, now: float) -> float:
        """Decide how the ranking runs, apply the cache operations, return its time (ms)."""
        L, M, user, rid = job.L, job.M, job.user, job.rid
        cache = self.caches[node.index]
        self._release_pin(rid, user)
        entry = cache.entries.get(user)
        if entry is not None and not entry.ready:     # its pre-infer has not run yet: drop it
            if entry.pins == 0:
                cache.discard(user)
            self.prefix[rid] = PENDING
            cache.counters.misses += 1
            return self.phases.phase("full_forward", L, M)
        hit = cache.lookup(user, now)
        if hit is not None:
            cache.counters.hits += 1
            self.prefix[rid] = HIT
            if hit.by_pre and hit.hits == 0:
                self.counters.used += 1
            hit.hits += 1
            return self.phases.phase("rank_cached", L, M)
        cache.counters.misses += 1
        expander = cache.expander
        if expander is not None and user in expander.entries and self._reload_pays(L, M):
            nbytes = expander.take(user)
            if cache.reserve(user, nbytes, now, pin=False) is not None:
                cache.fill(user, now)
            self.prefix[rid] = DRAM
            return self.phases.phase("prefix_reload", L) + self.phases.phase("rank_cached", L, M)
        if self.cfg.remote == "fetch":
            for other in self.caches:
                e = other.entries.get(user)
                if other is not cache and e is not None and e.ready:
                    self.prefix[rid] = REMOTE
                    fetch_ms = e.nbytes / (self.cfg.remote_gbps * 1e9) * 1e3
                    return fetch_ms + self.phases.phase("rank_cached", L, M)
        self.prefix[rid] = MISS
        return self.phases.phase("full_forward", L, M)

    def _reload_pays(self, L: int, M: int) -> bool:
        if self.cfg.expander.reload == "always":
            return True
        med = self.phases.median
        return med("prefix_reload", L) + med("rank_cached", L, M) < med("full_forward", L, M)

    def _release_pin(self, rid: int, user: int) -> None:
        k = self.pinned_at[rid]
        if k >= 0:
            self.pinned_at[rid] = -1
            if user in self.caches[k].entries:
                self.caches[k].unpin(user)

    # ------------------------------------------------------------------ pre-infer jobs
    def pre_cost(self, job: Job, node: Node, now: float) -> float:
        """Cost of a pre-infer job; 0 if it was cancelled while it waited."""
        cache = self.caches[node.index]
        entry = cache.entries.get(job.user)
        if entry is None or entry.ready:
            self.counters.cancelled += 1
            return 0.0
        expander, L = cache.expander, job.L
        if expander is not None and job.user in expander.entries and (
                self.cfg.expander.reload == "always"
                or self.phases.median("prefix_reload", L) < self.phases.median("prefix_encode", L)):
            expander.take(job.user)
            return self.phases.phase("prefix_reload", L)
        return self.phases.phase("prefix_encode", L)

    def pre_done(self, job: Job, node: Node, now: float) -> None:
        cache = self.caches[node.index]
        entry = cache.entries.get(job.user)
        if entry is not None and not entry.ready:
            cache.fill(job.user, now)
            entry.by_pre = True


def relay_worker(env: simpy.Environment, relay: Relay, node: Node):
    """One job at a time; pre-infer and ranking jobs share the device."""
    order = relay.cfg.queue
    while True:
        while not node.queue and not node.pre_queue:
            node.wakeup = env.event()
            yield node.wakeup
        if order == "pre_first" and node.pre_queue or order == "rank_first" and not node.queue:
            job = node.pre_queue.popleft()
        else:
            job = node.queue.popleft()
        node.backlog_ms -= job.pred_ms
        if job.kind == PRE_JOB:
            t = relay.pre_cost(job, node, env.now)
            if t > 0:
                yield from serve(env, node, 1, t)
            relay.pre_done(job, node, env.now)
            relay.counters.time_in_queue_ms += env.now - job.enqueued_ms
        else:
            start = env.now
            t = relay.rank_cost(job, node, start)
            yield from serve(env, node, 1, t)
            job.node, job.start_ms, job.service_ms, job.batch = node.index, start, t, 1
            job.done.succeed()


def build_relay(scenario: sc.Scenario, stage: Stage, n_requests: int) -> Relay:
    cfg = scenario.relay
    budget = (cfg.trigger.budget_ms if isinstance(cfg.trigger, sc.SequenceAwareTrigger)
              and cfg.trigger.budget_ms else scenario.slo.stage_p99_ms.get(cfg.stage, scenario.slo.p99_ms))
    ttl = cfg.cache.ttl_s * 1000 if cfg.cache.policy == "ttl" else None
    caches = [PrefixCache(cfg.cache.hbm_bytes, ttl,
                          DramTier(cfg.expander.dram_bytes) if cfg.expander.dram_bytes else None)
              for _ in stage.nodes]
    relay = Relay(cfg, stage, stage.service, caches, stage.pick, budget,
                  np.full(n_requests, -1, np.int32), np.zeros(n_requests, np.int8),
                  np.zeros(n_requests, np.int8))
    stage.dispatch = relay.submit_rank
    return relay
