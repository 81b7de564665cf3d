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

With an `hbm` block (hbm_pool.py) the prefix cache shares each device's HBM pool with the
embedding cache: every ranking also embeds its ids (all L history tokens on a prefix miss,
only the short-term tokens when the prefix is cached, plus the M candidates) and every
pre-infer encode its L history tokens; the lookup's gather and missed-row copies add to
the job's service time. The first time a request touches the prefix cache (its signal, or
else its ranking) the prefix's LRU stack depth is recorded with the time a hit saves, for
the partition controllers (partition.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import simpy

from . import scenario as sc
from .prefix_cache import DramTier, PrefixCache
from .routing import make_cost_router
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
    ran: int = 0           # admitted jobs that ran (encode or DRAM reload)
    rejected: int = 0
    time_in_queue_ms: float = 0.0   # summed waiting + service of all pre-infer jobs (Little's law)
    pre_ms: float = 0.0    # device time drawn for pre-infer jobs (before any slow-episode stretch)
    rank_ms: float = 0.0   # device time drawn for rankings (likewise)
    reload_declined: int = 0   # prefix in DRAM, but recomputing was cheaper (`reload: cheaper`)
    fetch_declined: int = 0    # prefix on another instance, but recomputing was cheaper


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
    hbm: object = None               # hbm_pool.Hbm when the scenario has an hbm block
    route: object = None             # (user, L, M, now) -> Node; default: the stage's router
    touched: np.ndarray | None = None   # per request: its prefix reference was recorded

    @property
    def stage_name(self) -> str:
        return self.stage.name

    def __post_init__(self):
        self._medians: dict[tuple, float] = {}
        n = len(self.stage.nodes)
        self._load = [0.0] * n        # per node: moving sum of admitted pre-infer ms
        self._load_t = [0.0] * n      # ... as of this time
        self._batch_scales = getattr(self.phases, "batch_scales", {})
        if self.route is None:
            pick = self.pick
            self.route = lambda user, L, M, now: pick(user)

    # ------------------------------------------------------------------ signals
    def signal(self, env: simpy.Environment, rid: int, user: int, L: int, M: int) -> None:
        """The pre-infer signal for request rid reaches the ranking stage."""
        node = self.route(user, L, M, env.now)
        cache = self.caches[node.index]
        self._reference(node, rid, user, L, M)
        entry = cache.entries.get(user)
        pin = self.cfg.cache.pin == "until_ranked"
        if entry is not None:          # prefix resident or being computed: just pin it
            if pin:
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
        pred_ms = self.median("prefix_encode", L) + self._emb_expected(node, L)
        if (not self.admissible(node, cache, nbytes, pred_ms, env.now)
                or cache.reserve(user, nbytes, env.now, pin) is None):
            self.pre[rid] = REJECTED
            self.counters.rejected += 1
            return
        if pin:
            self.pinned_at[rid] = node.index
        self.pre[rid] = ADMITTED
        self.counters.admitted += 1
        self._load[node.index] = self.pre_load_ms(node, env.now) + pred_ms
        job = Job(rid, user, L, 0, env.now, None, kind=PRE_JOB)
        job.pred_ms = pred_ms
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
        predicted = self.backlog(node, now) + self.median("full_forward", L, M)
        return predicted > self.budget_ms

    def admissible(self, node: Node, cache: PrefixCache, nbytes: int, pred_ms: float,
                   now: float) -> bool:
        """The sequence-aware trigger's bounds: pinned footprint and pre-infer load, both
        counting this job (and, if set, the pending-job cap)."""
        trig = self.cfg.trigger
        if not isinstance(trig, sc.SequenceAwareTrigger):
            return True
        if cache.pinned + nbytes > trig.max_pinned_fraction * cache.capacity:
            return False
        if self.pre_load_ms(node, now) + pred_ms > trig.max_pre_load * trig.load_window_ms:
            return False
        if trig.max_pending is not None:
            pending = sum(1 for j in node.queue if j.kind == PRE_JOB) + len(node.pre_queue)
            return pending < trig.max_pending
        return True

    def pre_load_ms(self, node: Node, now: float) -> float:
        """Admitted pre-infer work on the node as an exponentially decaying sum (time
        constant load_window_ms): about the pre-infer device share x the window."""
        i = node.index
        window = getattr(self.cfg.trigger, "load_window_ms", 1000.0)
        load = self._load[i] * math.exp(-(now - self._load_t[i]) / window) if self._load[i] else 0.0
        self._load[i], self._load_t[i] = load, now
        return load

    @staticmethod
    def backlog(node: Node, now: float) -> float:
        """Predicted work ahead on a node: queued jobs plus the rest of the one in service."""
        rest = node.busy_since + node.current_ms - now if node.busy_since >= 0 else 0.0
        return node.backlog_ms + max(rest, 0.0)

    # ------------------------------------------------------------------ ranking
    def submit_rank(self, job: Job) -> None:
        node = self.route(job.user, job.L, job.M, job.enqueued_ms)
        job.pred_ms = self.expected_rank_ms(node, job.user, job.L, job.M)
        node.backlog_ms += job.pred_ms
        node.submit(job)

    def median(self, name: str, L: int, M: int = 0) -> float:
        """A phase's median time, memoised (predictions ask for the same shapes often)."""
        key = (name, L, M)
        t = self._medians.get(key)
        if t is None:
            t = self._medians[key] = self.phases.median(name, L, M)
        return t

    def expected_rank_ms(self, node: Node, user: int, L: int, M: int) -> float:
        """Median ranking time on this node: cached if the user's prefix is in its HBM
        (resident or being computed), else the full forward pass; under an HBM pool plus
        the embedding lookups at the node's hit ratio."""
        if user in self.caches[node.index].entries:
            return self.median("rank_cached", L, M) + self._emb_expected(node, self._short(M))
        return self.median("full_forward", L, M) + self._emb_expected(node, self._ids(L, M))

    def expected_finish_ms(self, node: Node, user: int, L: int, M: int, now: float) -> float:
        """The hbm_aware router's score: work ahead on the node plus this ranking there."""
        return self.backlog(node, now) + self.expected_rank_ms(node, user, L, M)

    def rank_cost(self, job: Job, node: Node, now: float) -> float:
        """Decide how the ranking runs, apply the cache operations, return its time (ms)."""
        L, M, rid = job.L, job.M, job.rid
        self._reference(node, rid, job.user, L, M)
        phase, extra = self._rank_path(job, node, now)
        t = extra + self.phases.phase(phase, L, M)
        self.counters.rank_ms += t
        return t + self._lookup(job, node, now, t)

    def rank_batch_cost(self, jobs: list[Job], node: Node, now: float) -> float:
        """A batch of rankings (see scenario.Batching): paths decided job by job in queue
        order, then one padded call per compute phase at the group's largest shape."""
        groups: dict[str, list[Job]] = {}
        extras = []
        for job in jobs:
            self._reference(node, job.rid, job.user, job.L, job.M)
            phase, extra = self._rank_path(job, node, now)
            groups.setdefault(phase, []).append(job)
            extras.append(extra)
        t = sum(extras)
        share = {}
        for phase, g in groups.items():        # in the order the batch first meets each phase
            L, M = max(j.L for j in g), max(j.M for j in g)
            tg = self.batch_ms(phase, L, M, len(g))
            t += tg
            for j in g:
                share[j.rid] = tg / len(g)
        self.counters.rank_ms += t
        for job, extra in zip(jobs, extras):
            t += self._lookup(job, node, now, extra + share[job.rid])
        return t

    def batch_ms(self, phase: str, L: int, M: int, n: int) -> float:
        """A padded call of n requests at (L, M): a draw times the measured batch factor, or
        1 + marginal_cost x (n - 1) without batched rows in the table."""
        t = self.phases.phase(phase, L, M)
        if n == 1:
            return t
        scale = self._batch_scales.get(phase)
        return t * (scale.factor(n, L, M) if scale is not None else 1 + self.stage.marginal_cost * (n - 1))

    def _lookup(self, job: Job, node: Node, now: float, t: float) -> float:
        """Under an HBM pool: the embedding lookup a ranking adds (and its KV-miss time for
        the controllers); t is the ranking's own time."""
        if self.hbm is None:
            return 0.0
        L, M, rid = job.L, job.M, job.rid
        outcome = self.prefix[rid]
        if outcome != HIT:
            self.hbm.pools[node.index].interval.kv_miss_ms += max(t - self.median("rank_cached", L, M), 0.0)
        n = self._ids(L, M) if outcome in (MISS, PENDING) else self._short(M)
        return self.hbm.lookup(node.index, n, now, rid)

    def _rank_path(self, job: Job, node: Node, now: float) -> tuple[str, float]:
        """Apply the cache operations of one ranking; return its compute phase and the
        time (ms) it needs before it (a DRAM reload, a remote fetch)."""
        L, M, user, rid = job.L, job.M, job.user, job.rid
        cache = self.caches[node.index]
        self._release_pin(rid, user)
        entry = cache.entries.get(user)
        if entry is not None and not entry.ready:     # its pre-infer has not run yet: drop it
            if entry.pins == 0:
                cache.discard(user)
                if self.cfg.cache.keep_full:
                    self._keep(cache, user, L, now)
            self.prefix[rid] = PENDING
            cache.counters.misses += 1
            return "full_forward", 0.0
        hit = cache.lookup(user, now)
        if hit is not None:
            cache.counters.hits += 1
            self.prefix[rid] = HIT
            if hit.by_pre and hit.hits == 0:
                self.counters.used += 1
            hit.hits += 1
            return "rank_cached", 0.0
        cache.counters.misses += 1
        expander = cache.expander
        if expander is not None and user in expander.entries:
            if self._reload_pays(L, M):
                nbytes = expander.take(user)
                if cache.reserve(user, nbytes, now, pin=False) is not None:
                    cache.fill(user, now)
                self.prefix[rid] = DRAM
                return "rank_cached", self.phases.phase("prefix_reload", L)
            self.counters.reload_declined += 1
        if self.cfg.remote == "fetch":
            for other in self.caches:
                e = other.entries.get(user)
                if other is not cache and e is not None and e.ready:
                    fetch_ms = e.nbytes / (self.cfg.remote_gbps * 1e9) * 1e3
                    if fetch_ms + self.median("rank_cached", L, M) < self.median("full_forward", L, M):
                        self.prefix[rid] = REMOTE
                        return "rank_cached", fetch_ms
                    self.counters.fetch_declined += 1
                    break
        self.prefix[rid] = MISS
        if self.cfg.cache.keep_full:
            self._keep(cache, user, L, now)
        return "full_forward", 0.0

    def _keep(self, cache: PrefixCache, user: int, L: int, now: float) -> None:
        """Keep the history KV a full forward pass computes (the device runs one job at a
        time, so the entry is complete before anything else can look at it)."""
        if user not in cache.entries and cache.reserve(user, self.phases.prefix_bytes(L), now,
                                                       pin=False) is not None:
            cache.fill(user, now)

    def ranked(self, job: Job, node: Node, now: float) -> None:
        """A ranking finished: the controllers count it against the stage budget."""
        if self.hbm is not None:
            it = self.hbm.pools[node.index].interval
            it.rankings += 1
            if now - job.enqueued_ms > self.budget_ms:
                it.late += 1

    # ------------------------------------------------------------------ HBM pool hooks
    def _short(self, M: int) -> int:
        """Ids a ranking with its prefix cached still embeds."""
        return self.hbm.short_term + M * self.hbm.candidate_rows if self.hbm is not None else M

    def _ids(self, L: int, M: int) -> int:
        """Ids a ranking without its prefix embeds."""
        return L + M * self.hbm.candidate_rows if self.hbm is not None else L + M

    def _emb_expected(self, node: Node, n: int) -> float:
        return self.hbm.expected_ms(node.index, n) if self.hbm is not None else 0.0

    def _reference(self, node: Node, rid: int, user: int, L: int, M: int) -> None:
        """Record the first reference of request rid to its prefix, for the controllers:
        the LRU stack depth (None: neither resident nor in the ghost list) and what a hit
        saves: the cheaper miss path (recompute with its L embeddings, or a DRAM reload)
        minus the cached ranking."""
        if self.touched is None or self.touched[rid]:
            return
        self.touched[rid] = True
        cache = self.caches[node.index]
        depth = cache.stack_depth(user)
        if depth is None:
            return
        med = self.median
        cached = med("rank_cached", L, M)
        miss = med("full_forward", L, M) + self._emb_expected(node, self._ids(L, M))
        if cache.expander is not None and cache.expander.capacity > 0 and self._reload_pays(L, M):
            # an evicted prefix would wait in DRAM: the miss path is the reload
            miss = min(miss, med("prefix_reload", L) + cached + self._emb_expected(node, self._short(M)))
        saved = miss - cached - self._emb_expected(node, self._short(M))
        if saved > 0:
            self.hbm.pools[node.index].interval.kv_refs.append((depth, saved))

    def _reload_pays(self, L: int, M: int) -> bool:
        if self.cfg.expander.reload == "always":
            return True
        med = self.median
        return med("prefix_reload", L) + med("rank_cached", L, M) < med("full_forward", L, M)

    def _release_pin(self, rid: int, user: int) -> None:
        k = self.pinned_at[rid]
        if k >= 0:
            self.pinned_at[rid] = -1
            if user in self.caches[k].entries:
                self.caches[k].unpin(user)

    # ------------------------------------------------------------------ the worker's order
    def take(self, node: Node) -> Job:
        """The next job a relay worker serves on a node with work (both engines): by
        `relay.queue`, a pre-infer job first (pre_first), last (rank_first) or in arrival
        order (fifo); its predicted time leaves the node's backlog."""
        order = self.cfg.queue
        if order == "pre_first" and node.pre_queue or order == "rank_first" and not node.queue:
            job = node.pre_queue.popleft()
        else:
            job = node.queue.popleft()
        node.backlog_ms -= job.pred_ms
        return job

    def batching(self, node: Node) -> bool:
        """Whether the next job is a batch of rankings (batch.max_size > 1, a ranking next)."""
        if self.stage.max_batch == 1:
            return False
        if self.cfg.queue == "pre_first" and node.pre_queue or self.cfg.queue == "rank_first" and not node.queue:
            return False
        return node.queue[0].kind != PRE_JOB

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
                or self.median("prefix_reload", L) < self.median("prefix_encode", L)):
            expander.take(job.user)
            t = self.phases.phase("prefix_reload", L)
            self.counters.pre_ms += t
            self.counters.ran += 1
            return t
        t = self.phases.phase("prefix_encode", L)
        if self.hbm is not None:
            t += self.hbm.lookup(node.index, L, now)
            self.hbm.pools[node.index].interval.kv_miss_ms += t
        self.counters.pre_ms += t
        self.counters.ran += 1
        return t

    def pre_done(self, job: Job, node: Node, now: float) -> None:
        cache = self.caches[node.index]
        entry = cache.entries.get(job.user)
        if entry is not None and not entry.ready:
            cache.fill(job.user, now)
            entry.by_pre = True


def _leading_ranks(queue, limit: int) -> int:
    """How many ranking jobs stand at the head of the queue (up to limit)."""
    n = 0
    for job in queue:
        if job.kind == PRE_JOB or n == limit:
            break
        n += 1
    return n


def relay_worker(env: simpy.Environment, relay: Relay, node: Node):
    """Pre-infer and ranking jobs share the device: a pre-infer job runs alone, rankings
    one at a time or (batch.max_size > 1) as the run of rankings at the queue's head."""
    bind = getattr(relay.phases, "bind", None)     # a cost model that depends on the node's state
    max_batch, max_wait = relay.stage.max_batch, relay.stage.max_wait_ms
    while True:
        while not node.queue and not node.pre_queue:
            node.wakeup = env.event()
            yield node.wakeup
        if relay.batching(node):
            yield from _hold_open(env, node, max_batch, max_wait)
            yield from _serve_batch(env, relay, node, max_batch, bind)
            continue
        job = relay.take(node)
        if bind is not None:
            bind(node, env.now)
        if job.kind == PRE_JOB:
            t = relay.pre_cost(job, node, env.now)
            if t > 0:
                yield from serve(env, node, 1, t)
            relay.pre_done(job, node, env.now)
            relay.counters.time_in_queue_ms += env.now - job.enqueued_ms
        else:
            start = env.now
            t = yield from serve(env, node, 1, relay.rank_cost(job, node, start))
            job.node, job.start_ms, job.service_ms, job.batch = node.index, start, t, 1
            relay.ranked(job, node, env.now)
            job.done.succeed()


def _hold_open(env: simpy.Environment, node: Node, max_batch: int, max_wait: float):
    """Wait (at most max_wait after the head job arrived) for a full batch of rankings."""
    if max_wait <= 0:
        return
    deadline = node.queue[0].enqueued_ms + max_wait
    while _leading_ranks(node.queue, max_batch) < max_batch and env.now < deadline:
        node.wakeup = env.event()
        yield node.wakeup | env.timeout(deadline - env.now)
        node.wakeup = None


def _serve_batch(env: simpy.Environment, relay: Relay, node: Node, max_batch: int, bind):
    batch = [node.queue.popleft() for _ in range(_leading_ranks(node.queue, max_batch))]
    for job in batch:
        node.backlog_ms -= job.pred_ms
    if bind is not None:
        bind(node, env.now)
    start = env.now
    n = len(batch)
    cost = relay.rank_cost(batch[0], node, start) if n == 1 else relay.rank_batch_cost(batch, node, start)
    t = yield from serve(env, node, n, cost)
    for job in batch:
        job.node, job.start_ms, job.service_ms, job.batch = node.index, start, t, n
        relay.ranked(job, node, env.now)
        job.done.succeed()


def build_relay(scenario: sc.Scenario, stage: Stage, n_requests: int,
                rng: np.random.Generator | None = None) -> Relay:
    """The relay of a stage; with an `hbm` block its caches live in HBM pools (the
    embedding misses are drawn from `rng`)."""
    cfg = scenario.relay
    budget = (cfg.trigger.budget_ms if isinstance(cfg.trigger, sc.SequenceAwareTrigger)
              and cfg.trigger.budget_ms else scenario.slo.stage_p99_ms.get(cfg.stage, scenario.slo.p99_ms))
    ttl = cfg.cache.ttl_s * 1000 if cfg.cache.policy == "ttl" else None
    caches = [PrefixCache(cfg.cache.hbm_bytes or 0, ttl,
                          DramTier(cfg.expander.dram_bytes) if cfg.expander.dram_bytes else None)
              for _ in stage.nodes]
    relay = Relay(cfg, stage, stage.service, caches, stage.pick, budget,
                  np.full(n_requests, -1, np.int32), np.zeros(n_requests, np.int8),
                  np.zeros(n_requests, np.int8))
    if scenario.hbm is not None:
        from .hbm_pool import Hbm
        relay.hbm = Hbm(scenario, caches, _gather_curve(scenario), rng, n_requests)
        if relay.hbm.adaptive:
            relay.touched = np.zeros(n_requests, bool)
    if scenario.stages[cfg.stage].router == "hbm_aware":
        relay.route = make_cost_router(stage.nodes, relay.expected_finish_ms)
    stage.dispatch = relay.submit_rank
    return relay


def _gather_curve(scenario: sc.Scenario):
    """The cost table's emb_gather curve, or None (`embedding.gather: none`)."""
    if scenario.embedding.gather == "none":
        return None
    from simrec.calibration.table import load_table
    from .errors import InputError
    service = scenario.stages[scenario.relay.stage].service
    try:
        return load_table(service.table).curve("emb_gather", "isolated")   # measured isolated only
    except InputError as e:
        raise InputError(f"{e.message}; set embedding.gather: none to leave the gather out",
                         e.source, "embedding.gather") from None
