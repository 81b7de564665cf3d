"""The fast engine: one replication simulated stage by stage, each stage's events in time order.

A cascade is a feed-forward network: a stage's arrivals are the stage before's departures
(plus the hop), and nothing a stage does depends on a later stage. So the whole first
stage can be simulated, then the second from the first's departures, and so on. Each
stage is a small event loop over its own events (arrivals, batch ends, batch deadlines,
wake-ups, the sampler's instants) in the order SimPy would process them. It drives the
same runtime objects as the SimPy engine (cascade.prepare: nodes, routers, cost models,
episode timelines, streams), so the draws come in the same order and the records are the
same bits.

Order within an instant. SimPy processes events by (time, priority, insertion order). The
insertion order of two events of one stage is the order the stage's own processing made
them, which the loop reproduces. An event from outside the stage (an arrival, a signal, a
sample instant) is placed by the key (time, level, scheduled-at, maker's level): level 0
for an event scheduled before its instant, n + 1 for one scheduled at its own instant by a
level-n event (SimPy runs an instant breadth first: insertion order is FIFO); scheduled-at
is when its level-0 ancestor was scheduled, and the maker's level that of the event that
scheduled it, at that instant. When an outside event and one of the stage's own are equal
on all four, their order depends on how SimPy interleaved other stages' work: the engine
raises `Tie` and the replication runs on SimPy (cascade.run_replication), with the reason.
That takes exact time coincidences between independent sources (constant service times
equal to a hop, integer trace times on sample instants, a controller's interval equal to
the sample interval), never continuous service distributions.

A relay stage is one of these loops too: its pre-infer signals come from an earlier stage
(or the arrivals), so they are known before it runs, and they enter with the ranking
requests, in SimPy's order; the HBM partition controllers are timed events of that stage.
The relay's own methods (signal, submit_rank, take, rank_cost, pre_cost, pre_done, ranked)
are the ones SimPy's relay.relay_worker calls, so the order of work is the same.

Declined (SimPy runs, with the reason): such ties, a replication without requests, and a
relay stage that batches its rankings (`unsupported`).
"""

from __future__ import annotations

import math
from array import array
from heapq import heappop, heappush

import numpy as np

from . import scenario as sc
from .cascade import (N_COLUMNS, Prepared, Replication, StageRecords, StageSampler, busy_totals,
                      sample_interval_ms, stop_ms, timeseries)
from .partition import start_controllers
from .progress import Marks
from .relay import PRE_JOB
from .stage import Job

INF = math.inf
# Where setup-time scheduling sits among events at time 0 (as SimPy's insertion order has
# it): the stop timeout, the source's first wake-up, the sampler's first, requests at t=0.
SETUP_STOP, SETUP_SOURCE, SETUP_SAMPLER, SETUP_CONTROLLERS, SETUP_REQUESTS = -4.0, -3.0, -2.0, -1.5, -1.0

# Internal event kinds.
END, WAKE, DEADLINE, COND = 0, 1, 2, 3
# Node states.
IDLE, WOKEN, BWAIT, BWAIT_FIRED, BUSY = 0, 1, 2, 3, 4


def _vista_table(service) -> bool:
    """A gr service whose table holds a VISTA model (arch not given in the scenario)."""
    if getattr(service, "kind", None) != "gr" or service.arch is not None:
        return False
    from .scenario import _manifest
    try:
        return _manifest(service.table).get("model", {}).get("arch") == "vista"
    except (ValueError, AttributeError):
        return False


class Tie(Exception):
    """Two events at one instant whose order SimPy decides outside the stage."""


def unsupported(scenario: sc.Scenario) -> str | None:
    """Why the fast engine cannot run this scenario, before it starts (None: it can): a
    relay stage that batches its rankings (relay.relay_worker's batches are not mirrored
    here), or a stage with a history store."""
    relay = scenario.relay
    if relay is not None and scenario.stages[relay.stage].batch.max_size > 1:
        return f"stages.{relay.stage}.batch: batched relay ranking runs on SimPy"
    for name, stage in scenario.stages.items():
        if getattr(stage.service, "arch", None) == "vista" or _vista_table(stage.service):
            return f"stages.{name}.service: VISTA's summary store (per-user state) runs on SimPy"
        if getattr(stage, "history_store", None) is not None:
            return (f"stages.{name}.history_store: the tiered history store (its LRU state "
                    f"follows SimPy's service order) runs on SimPy")
    return None


def run(scenario: sc.Scenario, prep: Prepared, index: int, progress=None) -> Replication:
    """One replication, stage by stage; `progress(fraction)` hears each stage's arrivals
    pass each 2% of the horizon, a stage counting as its 1/n of the replication."""
    reqs, stages = prep.requests, prep.stages
    n = len(reqs)
    if n == 0:
        raise Tie("no requests")
    end_ms = prep.end_ms
    t_stop = stop_ms(end_ms)
    dt = sample_interval_ms(scenario, end_ms)
    users = memoryview(np.ascontiguousarray(reqs.user_id))
    Ls = memoryview(np.ascontiguousarray(reqs.history_len))
    Ms = memoryview(np.ascontiguousarray(reqs.candidates))
    recs = {s.name: StageRecords.empty(n, s, k == 0) for k, s in enumerate(stages)}

    # The source: a request starts when the source's timeout fires (time prev + delay,
    # scheduled at prev by the source's previous wake-up, a level-0 event), or at once
    # when its arrival is not after the source's clock. Requests at time 0 start during
    # setup, after the sampler's first timeout is made.
    inp = source_events(np.ascontiguousarray(reqs.arrival_ms, dtype=float))
    if inp.exact:           # the first stage's entry times are the source clock: derived
        recs[stages[0].name].enter_ms = None

    relay = prep.relay
    signal_after = relay.cfg.signal_after if relay is not None else None
    signals = None
    if signal_after == "arrival":
        signals = _signals(inp, -1, relay.cfg.signal_ms)
    sims = []
    for si, stage in enumerate(stages):
        smp = StageSampler(si, stage, dt, relay)
        args = (stage, recs[stage.name], inp, users, Ls, Ms, t_stop, dt, smp, n)
        if relay is not None and stage is relay.stage:
            sim = RelayStage(*args, relay=relay, signals=signals, fam=si - 1)
        elif stage.router == "delay":
            sim = DelayStage(*args)
        else:
            sim = QueueStage(*args)
        sim.keep_keys = not stage.hop_ms or stage.name == signal_after or si == len(stages) - 1
        if progress is not None:
            sim.marks = Marks(sim.times(), end_ms, progress, si / len(stages), (si + 1) / len(stages))
        outp = sim.run()
        sim.inp = None                  # done with it (memory: a few arrays per request)
        sims.append(sim)
        if stage.name == signal_after:
            signals = _signals(outp, si, relay.cfg.signal_ms)
        hop = stage.hop_ms
        if hop:     # the hop: a timeout made by the done event (level 1 at c)
            inp = Inputs(0)
            inp.rid = outp.rid
            inp.t = array("d")
            inp.t.frombytes(memoryview(np.frombuffer(outp.t, dtype=float) + hop).cast("B"))
            inp.s, inp.lam, inp.lvl = outp.t, array("b", b"\x01" * len(outp.t)), 0
        else:       # the done event itself (level 1, its batch end's ancestry)
            inp = outp
            inp.lvl = 1

    # Completion: after the last stage and its hop. all_done fires at the last one.
    # (A completion is the last stage's start + service + hop: Replication derives them.)
    t_done = np.frombuffer(inp.t, dtype=float)[: len(inp.rid)]
    ran = t_done < t_stop
    if inp.lvl == 0:
        ran |= t_done == t_stop                 # a level-0 timeout at the stop still fires
    completed = int(ran.sum())
    last = int(np.flatnonzero(ran)[-1]) if completed else None
    del t_done, ran
    # The run stops when AnyOf(all_done, the stop timeout) is processed: all_done is made
    # by the last completion, AnyOf by all_done, two levels on; the stop timeout is the
    # first event at t_stop, its AnyOf the first of the next level.
    if completed == n:
        t_end = inp.t[last]
        k_stop = (t_end, inp.lvl + 2, inp.s[last], inp.lam[last])
    else:
        t_end, k_stop = t_stop, (t_stop, 1, SETUP_STOP, 0)
    k, t = 0, 0.0                   # the sampler's instants up to the end: t_k <= t_end
    while True:
        t = t + dt
        if t > t_end:
            break
        k += 1
    # Interleave the stages' rows: per instant, stage 0's rows, then stage 1's, ...
    widths = [(len(stage.nodes) + 1) * (3 + N_COLUMNS) for stage in stages]
    rows = np.empty((k, sum(widths)))
    col = 0
    for sim, w in zip(sims, widths):
        sim.finish(k_stop)
        rows[:, col:col + w] = np.frombuffer(sim.out, dtype=float)[: k * w].reshape(k, w)
        sim.out = None
        col += w
    return Replication(index, reqs, None, recs, timeseries(rows.reshape(-1), relay),
                       *busy_totals(stages, t_end), end_ms, t_end, prep.extrapolated, relay,
                       prep.warmup_ms, "fast")


def _signals(made: "Inputs", fam: int, signal_ms: float) -> list:
    """The pre-infer signals made by these events (a stage's done events, or the requests'
    starts: fam -1), as (time, level, scheduled-at, maker's level, fam, rank, 0, rid): a
    signal is a timeout of signal_ms made by its request's event, before the request's hop."""
    out = []
    lvl = made.lvl
    for k, (rid, t, s, lam) in enumerate(zip(made.rid, made.t, made.s, made.lam)):
        if signal_ms > 0:
            out.append((t + signal_ms, 0, t, lvl, fam, k, 0, rid))
        else:
            out.append((t, lvl + 1, s, lam, fam, k, 0, rid))
    return out


def source_events(arrival_ms: np.ndarray) -> "Inputs":
    """The first stage's arrivals as SimPy's source makes them: request k starts when the
    source's timeout fires, at prev + (arrival - prev), made at prev (the source's previous
    wake-up, a level-0 event), or at once when its arrival is not after the source's clock.
    Requests at time 0 start during setup, after the sampler's first timeout is made."""
    a = arrival_ms
    n = len(a)
    # The clock moves to each new arrival; prev + (a - prev) is a itself unless rounding
    # says otherwise, which is checked (and then the clock is run one request at a time).
    now = np.maximum.accumulate(np.maximum(a, 0.0))
    prev = np.concatenate(([0.0], now[:-1]))
    moved = a > prev
    exact = bool(np.array_equal((prev + (a - prev))[moved], a[moved]))
    if exact:
        slot = np.where(moved, prev, np.nan)
        first = int(np.argmax(moved)) if moved.any() else n
        slot[first:first + 1] = SETUP_SOURCE
        slot[:first] = SETUP_REQUESTS
        filled = np.where(~np.isnan(slot), np.arange(n), 0)
        slot = slot[np.maximum.accumulate(filled)]
    else:
        now, slot = np.empty(n), np.empty(n)
        t, sl = 0.0, SETUP_REQUESTS
        for k, x in enumerate(a.tolist()):
            delay = x - t
            if delay > 0:
                sl = SETUP_SOURCE if sl == SETUP_REQUESTS else t
                t = t + delay
            now[k], slot[k] = t, sl
    inp = Inputs(0)
    inp.rid = range(n)
    inp.t.frombytes(memoryview(np.ascontiguousarray(now)).cast("B"))
    inp.s.frombytes(memoryview(np.ascontiguousarray(slot)).cast("B"))
    inp.lam = array("b", bytes(n))
    inp.lvl = 0
    inp.exact = exact
    return inp


class Inputs:
    """Events entering a stage, in SimPy's order: request ids and their keys (time,
    scheduled-at, that event's level); the level at their own instant is `lvl`, one value
    for all. A stage's departures come out in the same form."""

    __slots__ = ("rid", "t", "s", "lam", "lvl", "exact")

    def __init__(self, n: int):
        self.rid, self.t, self.s, self.lam = array("q"), array("d"), array("d"), array("b")
        self.lvl = 0
        self.exact = False      # source only: the clock is cascade.source_clock's, exactly

    def add(self, rid: int, t: float, s: float, lam: int) -> None:
        self.rid.append(rid)
        self.t.append(t)
        self.s.append(s)
        self.lam.append(lam)


SOURCES = ("an arrival", "the stage's own event", "a sample instant", "a signal", "a controller")


def _first_of_equal(stage, ta: float, th: float, ts: float, in_lvl, in_s, in_lam, ai: int, heap, ts_s0) -> int:
    """Which of an arrival (0), the heap's next event (1) and a sample (2), two or more at
    the same time, SimPy would run first: by (level in the instant, scheduling order). -1
    when all are at infinity (the stage is done). Only exact ties come here, off the hot path."""
    t = min(ta, th, ts)
    if t == INF:
        return -1
    cands = []
    if ta == t:
        cands.append((in_lvl, in_s[ai], in_lam[ai], 0))
    if th == t:
        h = heap[0]
        cands.append((h[1], h[2], h[3], 1))
    if ts == t:
        cands.append((0, ts_s0, 0, 2))
    cands.sort()
    if len(cands) > 1 and cands[0][:3] == cands[1][:3]:
        raise _tie(stage, t, cands)
    return cands[0][3]


def _tie(stage, t, cands) -> Tie:
    a, b = (SOURCES[c[-1]] for c in cands[:2])
    return Tie(f"stage {stage.name}: {a} and {b} at t={t!r} ms, made at the same instant "
               f"by events of other stages (SimPy's interleaving decides their order)")


class _StageSim:
    """Shared machinery: inputs, the sample instants, the stop rule."""

    def __init__(self, stage, rec, inp, users, Ls, Ms, t_stop, dt, sampler, n):
        self.stage, self.rec, self.inp = stage, rec, inp
        self.users, self.Ls, self.Ms, self.M_fixed = users, Ls, Ms, stage.candidates
        self.t_stop, self.dt, self.sampler, self.n = t_stop, dt, sampler, n
        self.out = array("d")
        self.ts, self.ts_s0 = 0.0 + dt, SETUP_SAMPLER      # the next sample instant
        # The departures' full keys matter to a next stage reached without a hop (and to
        # signals made here); otherwise their times are enough.
        self.keep_keys = True
        self.marks = Marks((), 0.0, None)       # progress reports: none unless run() sets them

    def times(self):
        """The times of the arrivals the stage's loop counts (for its progress marks)."""
        return self.inp.t

    def finish(self, k_stop: tuple) -> None:
        """Samples after the stage's last event, up to the run's end (nothing changes);
        k_stop: the key of the event that stops the run (of a level >= 1)."""
        ts, dt, smp, out = self.ts, self.dt, self.sampler, self.out
        while ts <= k_stop[0]:
            smp.sample(ts, out)
            ts = ts + dt
        self.ts = ts


class DelayStage(_StageSim):
    """`router: delay`: every job is served at once for its drawn time; no queue, no node
    state. A job draws at its arrival; it leaves in the order SimPy's timeouts fire."""

    def run(self) -> Inputs:
        sample = self.stage.service.sample
        inp, t_stop = self.inp, self.t_stop
        Ls, Ms, M_fixed = self.Ls, self.Ms, self.M_fixed
        rec = self.rec
        node, start, service, batch = (memoryview(a) for a in (rec.node, rec.start_ms,
                                                                rec.service_ms, rec.batch))
        enter = memoryview(rec.enter_ms) if rec.enter_ms is not None else None
        lvl = inp.lvl
        ends = []
        marks = self.marks
        mk = marks.first
        for k in range(len(inp.rid)):
            t = inp.t[k]
            if t > t_stop or (t == t_stop and lvl > 0):
                break
            if k == mk:
                mk = marks(k)
            rid = inp.rid[k]
            s = sample(Ls[rid], M_fixed or Ms[rid])
            if not s > 0:
                raise Tie("a delay stage drew a service time <= 0")
            ends.append((t + s, t, k, rid, s))
        ends.sort()     # SimPy: by time, then insertion (arrival time, then arrival order)
        outp = Inputs(0)
        for c, t, _k, rid, s in ends:
            if c >= t_stop:      # the done event (level 1) would come after the stop
                break
            node[rid], start[rid], service[rid], batch[rid] = 0, t, s, 1
            if enter is not None:
                enter[rid] = t
            outp.add(rid, c, t, lvl)      # its timeout was made at t by a level-lvl event
        return outp      # its nodes stay empty: finish() takes every sample


class QueueStage(_StageSim):
    """Nodes with their own FIFO queues (a router picks on arrival) or one shared FIFO
    queue, serving batches: node_worker's states, driven by events in SimPy's order."""

    def run(self) -> Inputs:
        stage = self.stage
        if stage.router != "shared" and not (stage.max_batch > 1 and stage.max_wait_ms > 0):
            return self.run_routed()
        return self.run_general()

    def run_routed(self) -> Inputs:
        """The common case, written out: a router, FIFO per node, no batch deadline (a
        batch is whatever is queued, up to max_batch, when the node turns to it). A node
        is idle (its wakeup armed), woken (the wakeup fired, the worker not yet back) or
        busy. An arrival at an idle node starts it at once unless another event shares
        the instant; then the wake-up goes through the heap in SimPy's order."""
        stage, rec = self.stage, self.rec
        nodes = stage.nodes
        N = len(nodes)
        pick = stage.pick
        svc = stage.service
        sample = svc.sample
        bind = getattr(svc, "bind", None)
        max_batch, mc = stage.max_batch, stage.marginal_cost
        inp = self.inp
        in_rid, in_s, in_lam, in_lvl = inp.rid, inp.s, inp.lam, inp.lvl
        n_in = len(in_rid)
        in_t = inp.t
        in_t.append(INF)                                       # a sentinel (the input is ours)
        users, Ls, Ms, M_fixed = self.users, self.Ls, self.Ms, self.M_fixed
        t_stop, dt, smp, out = self.t_stop, self.dt, self.sampler, self.out
        r_node, r_start, r_service, r_batch = (memoryview(a) for a in (
            rec.node, rec.start_ms, rec.service_ms, rec.batch))
        r_enter = memoryview(rec.enter_ms) if rec.enter_ms is not None else None
        enq = array("d", bytes(8 * self.n)) if r_enter is not None else None
        queues = [nd.queue for nd in nodes]
        episodes = [nd.episodes for nd in nodes]
        any_episodes = any(e is not None for e in episodes)
        armed = [True] * N
        cur = [None] * N
        lam_of = [0] * N            # the level of the event that started the current batch
        # The router's load index, updated in line (see routing.LeastLoaded.update).
        watcher = getattr(nodes[0].watch, "__self__", None) if N else None
        if watcher is not None and not hasattr(watcher, "cur"):
            raise Tie("a node watcher the fast engine does not know")
        ll_cur = watcher.cur if watcher is not None else None
        ll_heap = watcher.heap if watcher is not None else None
        ll_limit = 4 * N + 64
        in_svc = [0] * N
        # (time, level, scheduled-at, its maker's level, seq, node); a sentinel
        heap: list = [(INF, 0, INF, 0, 0, 0)]
        seq = 0
        outp = Inputs(0)
        o_rid, o_t, o_s, o_lam = outp.rid, outp.t, outp.s, outp.lam
        ts, ts_s0 = self.ts, self.ts_s0
        ai = 0
        marks = self.marks
        mk = marks.first
        loads_seen = 0
        simple = max_batch == 1 and bind is None      # one job a batch, a plain cost model
        keep_keys = self.keep_keys
        w_lo, w_hi = (nodes[0].window_lo_ms, nodes[0].window_hi_ms) if N else (0.0, INF)
        assert all(nd.window_lo_ms == w_lo and nd.window_hi_ms == w_hi for nd in nodes)

        def begin(i, now, lvl):
            """Node i turns to its queue at `now` (in a level-lvl event): take a batch."""
            nonlocal seq
            q = queues[i]
            nd = nodes[i]
            nb = len(q)
            if nb == 1 or max_batch == 1:
                r = q.popleft()
                batch = r
                nb = 1
                if bind is not None:
                    bind(nd, now)
                t = sample(Ls[r], M_fixed or Ms[r])
            else:
                if nb > max_batch:
                    nb = max_batch
                batch = tuple(q.popleft() for _ in range(nb))
                if bind is not None:
                    bind(nd, now)
                r = batch[0]
                t = sample(Ls[r], M_fixed or Ms[r])
                t = t + mc * sum(sample(Ls[j], M_fixed or Ms[j]) for j in batch[1:])
            if any_episodes:
                ep = episodes[i]
                if ep is not None:
                    t *= ep.factor_at(now)
            if not t > 0:
                raise Tie("a batch's service time is <= 0")
            nd.in_service, nd.busy_since, nd.current_ms = nb, now, t
            in_svc[i] = nb
            cur[i] = batch
            lam_of[i] = lvl
            seq += 1
            heappush(heap, (now + t, 0, now, lvl, seq, i))

        ta, th = in_t[0], INF        # the next arrival's time, the heap's first
        while True:
            if ta < th and ta < ts:
                which = 0
            elif th < ta and th < ts:
                which = 1
            elif ts < ta and ts < th:
                which = 2
            else:
                which = _first_of_equal(stage, ta, th, ts, in_lvl, in_s, in_lam, ai, heap, ts_s0)
                if which < 0:
                    break
            if which == 0:                          # an arrival
                t = ta
                if t > t_stop or (t == t_stop and in_lvl > 0):
                    break
                if ai == mk:
                    mk = marks(ai)
                rid = in_rid[ai]
                ai += 1
                ta = in_t[ai]
                if enq is not None:
                    enq[rid] = t
                nd = pick(users[rid])
                i = nd.index
                q = queues[i]
                q.append(rid)
                if ll_cur is not None:
                    load = len(q) + in_svc[i]
                    if load != ll_cur[i]:
                        ll_cur[i] = load
                        heappush(ll_heap, (load, i))
                        loads_seen += 1
                        if loads_seen > ll_limit:       # the index's stale entries: rebuild
                            loads_seen = 0
                            if len(ll_heap) > ll_limit:
                                watcher.rebuild()
                if armed[i]:
                    armed[i] = False
                    if ta > t and th > t and ts > t:  # nothing else at this instant
                        if simple:                  # begin(i, t, in_lvl + 1), in line
                            q.popleft()
                            st = sample(Ls[rid], M_fixed or Ms[rid])
                            if any_episodes and episodes[i] is not None:
                                st *= episodes[i].factor_at(t)
                            if not st > 0:
                                raise Tie("a batch's service time is <= 0")
                            nd.in_service, nd.busy_since, nd.current_ms = 1, t, st
                            in_svc[i] = 1
                            cur[i] = rid
                            lam_of[i] = in_lvl + 1
                            seq += 1
                            c = t + st
                            heappush(heap, (c, 0, t, in_lvl + 1, seq, i))
                            if c < th:
                                th = c
                        else:
                            begin(i, t, in_lvl + 1)
                            th = heap[0][0]
                    else:                           # the wake-up, at the next level
                        seq += 1
                        heappush(heap, (t, in_lvl + 1, in_s[ai - 1], in_lam[ai - 1], seq, i))
                        th = heap[0][0]
            elif which == 1:                        # a batch ends, or a woken node resumes
                ev = heappop(heap)
                t = ev[0]
                lvl = ev[1]
                if t > t_stop or (t == t_stop and lvl > 0):
                    break
                i = ev[5]
                if lvl > 0:                         # the wake-up: the worker is back
                    begin(i, t, lvl)
                    th = heap[0][0]
                    continue
                nd = nodes[i]
                batch = cur[i]
                t_serv = nd.current_ms
                st = nd.busy_since
                nb = in_svc[i]
                # Node.end_batch, in line.
                nd.busy_ms += t_serv
                span = (t if t < w_hi else w_hi) - (st if st > w_lo else w_lo)
                if span > 0:
                    nd.window_busy_ms += span
                nd.in_service, nd.busy_since = 0, -1.0
                nd.last_end_ms = t
                nd.batches += 1
                in_svc[i] = 0
                q = queues[i]
                if ll_cur is not None:
                    load = len(q)
                    if load != ll_cur[i]:
                        ll_cur[i] = load
                        heappush(ll_heap, (load, i))
                        loads_seen += 1
                        if loads_seen > ll_limit:
                            loads_seen = 0
                            if len(ll_heap) > ll_limit:
                                watcher.rebuild()
                if t < t_stop:                      # the jobs' done events (level 1) run
                    if nb == 1:
                        rid = batch
                        r_node[rid] = i
                        r_start[rid] = st
                        r_service[rid] = t_serv
                        r_batch[rid] = 1
                        if r_enter is not None:
                            r_enter[rid] = enq[rid]
                        o_rid.append(rid)
                        o_t.append(t)
                        if keep_keys:
                            o_s.append(st)
                            o_lam.append(lam_of[i])
                    else:
                        for rid in batch:
                            r_node[rid] = i
                            r_start[rid] = st
                            r_service[rid] = t_serv
                            r_batch[rid] = nb
                            if r_enter is not None:
                                r_enter[rid] = enq[rid]
                            o_rid.append(rid)
                            o_t.append(t)
                            if keep_keys:
                                o_s.append(st)
                                o_lam.append(lam_of[i])
                if not q:
                    armed[i] = True
                    th = heap[0][0]
                elif simple:                        # begin(i, t, 0), in line
                    rid = q.popleft()
                    st = sample(Ls[rid], M_fixed or Ms[rid])
                    if any_episodes and episodes[i] is not None:
                        st *= episodes[i].factor_at(t)
                    if not st > 0:
                        raise Tie("a batch's service time is <= 0")
                    nd.in_service, nd.busy_since, nd.current_ms = 1, t, st
                    in_svc[i] = 1
                    cur[i] = rid
                    lam_of[i] = 0
                    seq += 1
                    heappush(heap, (t + st, 0, t, 0, seq, i))
                    th = heap[0][0]
                else:
                    begin(i, t, 0)
                    th = heap[0][0]
            else:                                   # a sample instant
                if ts > t_stop:
                    break
                if ai >= n_in and len(heap) == 1:
                    break                           # no work left: finish() takes the rest
                smp.sample(ts, out)
                ts, ts_s0 = ts + dt, ts
        self.ts, self.ts_s0 = ts, ts_s0
        return outp

    def run_general(self) -> Inputs:
        """Any queue stage: a shared queue, batch deadlines (node_worker's waits)."""
        stage, rec = self.stage, self.rec
        nodes = stage.nodes
        N = len(nodes)
        shared = stage.router == "shared"
        pick = stage.pick
        svc = stage.service
        sample = svc.sample
        bind = getattr(svc, "bind", None)
        max_batch, max_wait, mc = stage.max_batch, stage.max_wait_ms, stage.marginal_cost
        batching = max_batch > 1 and max_wait > 0
        inp = self.inp
        in_rid, in_s, in_lam, in_lvl = inp.rid, inp.s, inp.lam, inp.lvl
        n_in = len(in_rid)
        in_t = inp.t
        in_t.append(INF)
        users, Ls, Ms, M_fixed = self.users, self.Ls, self.Ms, self.M_fixed
        t_stop, dt, smp, out = self.t_stop, self.dt, self.sampler, self.out
        r_node, r_start, r_service, r_batch = (memoryview(a) for a in (
            rec.node, rec.start_ms, rec.service_ms, rec.batch))
        r_enter = memoryview(rec.enter_ms) if rec.enter_ms is not None else None
        enq = array("d", bytes(8 * self.n))
        queues = [nd.queue for nd in nodes]
        state = [IDLE] * N
        armed = [True] * N          # node.wakeup is set (the worker waits on it)
        tok = [0] * N
        deadline = [0.0] * N
        cur = [None] * N            # the batch in service
        lam_of = [0] * N
        armed_heap = list(range(N)) if shared else None   # shared queue: waiting nodes by index
        # (time, level, scheduled-at, its maker's level, seq, kind, node, token); a sentinel
        heap: list = [(INF, 0, INF, 0, 0, END, 0, 0)]
        outp = Inputs(0)
        o_rid, o_t, o_s, o_lam = outp.rid, outp.t, outp.s, outp.lam
        ts, ts_s0 = self.ts, self.ts_s0
        st_ = {"seq": 0}
        ai = 0
        marks = self.marks
        mk = marks.first

        def push(t, lvl, s, lam, kind, i, tk):
            st_["seq"] += 1
            heappush(heap, (t, lvl, s, lam, st_["seq"], kind, i, tk))

        # A step runs inside an event with key (now, lvl, s, lam): a delayed event it makes
        # has key (t, 0, now, lvl), an event for this instant (now, lvl + 1, s, lam).
        def start(i, now, lvl):
            """Take a batch off node i's queue and serve it (node_worker after the waits)."""
            q = queues[i]
            nb = len(q)
            if nb > max_batch:
                nb = max_batch
            nd = nodes[i]
            batch = tuple(q.popleft() for _ in range(nb))
            if bind is not None:
                bind(nd, now)
            r = batch[0]
            t = sample(Ls[r], M_fixed or Ms[r])
            if nb > 1:
                t = t + mc * sum(sample(Ls[j], M_fixed or Ms[j]) for j in batch[1:])
            ep = nd.episodes
            if ep is not None:
                t *= ep.factor_at(now)
            if not t > 0:
                raise Tie("a batch's service time is <= 0")
            nd.start_batch(now, nb, t)
            cur[i] = batch
            lam_of[i] = lvl
            state[i] = BUSY
            push(now + t, 0, now, lvl, END, i, 0)

        def bwait(i, now, lvl):
            """Hold the batch open: wait for a job or the deadline."""
            state[i] = BWAIT
            armed[i] = True
            tok[i] += 1
            if shared:
                heappush(armed_heap, i)
            dl = deadline[i]
            push(now + (dl - now), 0, now, lvl, DEADLINE, i, tok[i])

        def top(i, now, lvl):
            """The top of node_worker's loop: wait for work, or start on it."""
            q = queues[i]
            if not q:
                state[i] = IDLE
                armed[i] = True
                tok[i] += 1
                if shared:
                    heappush(armed_heap, i)
                return
            if batching:
                dl = enq[q[0]] + max_wait
                deadline[i] = dl
                if len(q) < max_batch and now < dl:
                    bwait(i, now, lvl)
                    return
            start(i, now, lvl)

        def on_cond(i, now, lvl):
            armed[i] = False
            q = queues[i]
            if len(q) < max_batch and now < deadline[i]:
                bwait(i, now, lvl)
            elif not q:
                top(i, now, lvl)
            else:
                start(i, now, lvl)

        while True:
            ta = in_t[ai]
            th = heap[0][0]
            if ta < th and ta < ts:
                which = 0
            elif th < ta and th < ts:
                which = 1
            elif ts < ta and ts < th:
                which = 2
            else:
                which = _first_of_equal(stage, ta, th, ts, in_lvl, in_s, in_lam, ai, heap, ts_s0)
                if which < 0:
                    break
            if which == 0:                          # an arrival
                t = ta
                if t > t_stop or (t == t_stop and in_lvl > 0):
                    break
                if ai == mk:
                    mk = marks(ai)
                rid = in_rid[ai]
                s, lam = in_s[ai], in_lam[ai]
                ai += 1
                enq[rid] = t
                if shared:
                    queues[0].append(rid)
                    i = -1
                    while armed_heap:
                        j = heappop(armed_heap)
                        if armed[j]:
                            i = j
                            break
                else:
                    nd = pick(users[rid])
                    i = nd.index
                    nd.queue.append(rid)
                    if nd.watch is not None:
                        nd.watch(nd)
                    if not armed[i]:
                        continue
                if i >= 0:                          # wake node i: its event, a level on
                    armed[i] = False
                    if state[i] == IDLE:
                        state[i] = WOKEN
                    push(t, in_lvl + 1, s, lam, WAKE, i, tok[i])
                continue
            if which == 2:                          # a sample instant
                if ts > t_stop:
                    break
                if ai >= n_in and all(x == IDLE for x in state):
                    break                           # no work left: finish() takes the rest
                smp.sample(ts, out)
                ts, ts_s0 = ts + dt, ts
                continue
            ev = heap[0]                            # one of the stage's own events
            t, lvl = ev[0], ev[1]
            if t > t_stop or (t == t_stop and lvl > 0):
                break
            heappop(heap)
            kind, i = ev[5], ev[6]
            if kind == END:
                nd = nodes[i]
                batch = cur[i]
                cur[i] = None
                t_serv = nd.current_ms
                st = nd.busy_since
                nd.end_batch(t, t_serv)
                if t < t_stop:                      # the jobs' done events (level 1) run
                    nb = len(batch)
                    lam = lam_of[i]
                    for rid in batch:
                        r_node[rid] = i
                        r_start[rid] = st
                        r_service[rid] = t_serv
                        r_batch[rid] = nb
                        if r_enter is not None:
                            r_enter[rid] = enq[rid]
                        o_rid.append(rid)
                        o_t.append(t)
                        o_s.append(st)
                        o_lam.append(lam)
                top(i, t, 0)
            elif ev[7] != tok[i]:
                pass                                # a wait that is over (its timeout lingers)
            elif kind == WAKE:
                if state[i] == WOKEN:
                    top(i, t, lvl)
                elif state[i] == BWAIT:             # the wakeup fires the condition
                    state[i] = BWAIT_FIRED
                    push(t, lvl + 1, ev[2], ev[3], COND, i, tok[i])
            elif kind == DEADLINE:
                if state[i] == BWAIT:
                    state[i] = BWAIT_FIRED
                    push(t, 1, ev[2], ev[3], COND, i, tok[i])
            elif kind == COND:
                if state[i] == BWAIT_FIRED:
                    on_cond(i, t, lvl)
        self.ts, self.ts_s0 = ts, ts_s0
        return outp


class _Env:
    """What the relay's methods and the partition controllers ask of SimPy: the clock,
    timeouts (to wait on) and processes (the controllers, started by the stage)."""

    __slots__ = ("now", "procs")

    def __init__(self):
        self.now = 0.0
        self.procs = []

    def timeout(self, delay: float) -> float:
        return delay

    def process(self, gen) -> None:
        self.procs.append(gen)


class _Waker:
    """A node's `wakeup` under the fast engine: succeeding it queues the worker's resumption
    one level on, in the current event's instant (what SimPy's event would do)."""

    __slots__ = ("sim", "i")

    def __init__(self, sim, i):
        self.sim, self.i = sim, i

    def succeed(self) -> None:
        self.sim.wake(self.i)


ARRIVE, SIGNAL, CONTROL = 10, 11, 12
R_IDLE, R_WOKEN, R_BUSY = 0, 1, 2


class RelayStage(_StageSim):
    """The relay's ranking stage: relay_worker's order of work (one job at a time, pre-infer
    jobs and rankings sharing the device), driven by ranking arrivals, pre-infer signals,
    the partition controllers' ticks and the stage's own events, in SimPy's order."""

    def __init__(self, *args, relay, signals, fam):
        super().__init__(*args)
        self.relay = relay
        ext = [(t, lvl, s, lam, fam, k, 1, ARRIVE, rid) for k, (rid, t, s, lam) in enumerate(
            zip(self.inp.rid, self.inp.t, self.inp.s, self.inp.lam)) for lvl in (self.inp.lvl,)]
        ext += [(t, lvl, s, lam, f, k, sub, SIGNAL, rid) for t, lvl, s, lam, f, k, sub, rid in (signals or ())]
        ext.sort()
        for a, b in zip(ext, ext[1:]):      # same key, different makers: SimPy's interleaving
            if a[:4] == b[:4] and a[4] != b[4]:
                raise Tie(f"stage {self.stage.name}: a signal and a ranking at t={a[0]!r} ms, made "
                          f"at the same instant by events of two other stages")
        self.ext = ext
        self.mk = None                            # the next progress mark (set by _loop)
        self.n_rank = len(self.inp.rid)
        self.arrived = self.ranked_ = 0           # rankings dispatched, and done (or stopped)
        self.env = _Env()
        self.heap: list = []
        self.seq = 0
        n = len(self.stage.nodes)
        self.state = [R_IDLE] * n
        self.cur: list = [None] * n
        self.lam_of = [0] * n
        self.ctx = (0.0, 0, SETUP_REQUESTS, 0)     # the event being processed: its key
        self.outp = Inputs(0)
        for i, nd in enumerate(self.stage.nodes):
            nd.wakeup = _Waker(self, i)               # every worker starts waiting
        if relay.hbm is not None:
            start_controllers(self.env, relay.hbm)
            for k, gen in enumerate(self.env.procs):   # their first timeouts, made at setup
                self.push(next(gen), 0, SETUP_CONTROLLERS, 0, CONTROL, k)

    def push(self, t, lvl, s, lam, kind, i) -> None:
        self.seq += 1
        heappush(self.heap, (t, lvl, s, lam, self.seq, kind, i))

    # ---------------------------------------------------------------- the worker
    def wake(self, i) -> None:
        now, lvl, s, lam = self.ctx
        self.state[i] = R_WOKEN
        self.push(now, lvl + 1, s, lam, WAKE, i)

    def top(self, i, now, lvl) -> None:
        """relay_worker at the top of its loop, inside an event of level lvl at `now`."""
        relay = self.relay
        nd = self.stage.nodes[i]
        while True:
            if not nd.queue and not nd.pre_queue:
                self.state[i] = R_IDLE
                nd.wakeup = _Waker(self, i)
                return
            job = relay.take(nd)
            bind = getattr(relay.phases, "bind", None)
            if bind is not None:
                bind(nd, now)
            if job.kind == PRE_JOB:
                t = relay.pre_cost(job, nd, now)
                if t > 0:
                    return self.serve(i, job, t, now, lvl)
                relay.pre_done(job, nd, now)
                relay.counters.time_in_queue_ms += now - job.enqueued_ms
                continue
            t = relay.rank_cost(job, nd, now)
            return self.serve(i, job, t, now, lvl)

    def serve(self, i, job, t, now, lvl) -> None:
        nd = self.stage.nodes[i]
        if nd.episodes is not None:
            t *= nd.episodes.factor_at(now)
        if not t > 0:
            raise Tie("a relay job's service time is <= 0")
        nd.start_batch(now, 1, t)
        self.state[i] = R_BUSY
        self.cur[i] = job
        self.lam_of[i] = lvl
        self.push(now + t, 0, now, lvl, END, i)

    def end(self, i, t) -> None:
        relay, rec = self.relay, self.rec
        nd = self.stage.nodes[i]
        job = self.cur[i]
        self.cur[i] = None
        t_serv, st = nd.current_ms, nd.busy_since
        nd.end_batch(t, t_serv)
        if job.kind == PRE_JOB:
            relay.pre_done(job, nd, t)
            relay.counters.time_in_queue_ms += t - job.enqueued_ms
        else:
            self.ranked_ += 1
            job.node, job.start_ms, job.service_ms, job.batch = i, st, t_serv, 1
            relay.ranked(job, nd, t)
            if t < self.t_stop:                   # its done event (level 1) runs
                rid = job.rid
                rec.node[rid], rec.start_ms[rid], rec.service_ms[rid], rec.batch[rid] = i, st, t_serv, 1
                if rec.enter_ms is not None:
                    rec.enter_ms[rid] = job.enqueued_ms
                self.outp.add(rid, t, st, self.lam_of[i])
        self.top(i, t, 0)

    def times(self):
        return np.array([e[0] for e in self.ext], dtype=float)

    # ---------------------------------------------------------------- the loop
    def run(self) -> Inputs:
        """Until every ranking is done (or the stop): the rankings' records are then final.
        What is left (pre-infer jobs, signals, ticks) runs in finish(), up to the run's end."""
        self._loop((self.t_stop, 1, SETUP_STOP, 0), work=True)
        self.outp.lvl = 1
        return self.outp

    def finish(self, k_stop: tuple) -> None:
        self._loop(k_stop, work=False)

    def _loop(self, k_stop: tuple, work: bool) -> None:
        """Events in SimPy's order while their key is before k_stop; with `work`, only
        until the last ranking request is done."""
        relay, stage, heap, ext = self.relay, self.stage, self.heap, self.ext
        users, Ls, Ms, M_fixed = self.users, self.Ls, self.Ms, self.M_fixed
        dt, smp, out, env = self.dt, self.sampler, self.out, self.env
        ai = getattr(self, "ai", 0)
        n_ext = len(ext)
        n_rank = self.n_rank
        ts, ts_s0 = self.ts, self.ts_s0
        state = self.state
        marks = self.marks
        mk = marks.first if self.mk is None else self.mk
        while True:
            if work and self.ranked_ == n_rank and self.arrived == n_rank:
                break
            e = ext[ai] if ai < n_ext else None
            h = heap[0] if heap else None
            cands = [(ts, 0, ts_s0, 0, 2)]
            if e is not None:
                cands.append((e[0], e[1], e[2], e[3], 0))
            if h is not None:
                cands.append((h[0], h[1], h[2], h[3], 1))
            cands.sort()
            c = cands[0]
            if len(cands) > 1 and cands[1][:4] == c[:4]:
                raise _tie(stage, c[0], [x[1:] for x in cands])
            if c[:4] >= k_stop[:4]:
                if c[:4] == k_stop[:4]:
                    raise _tie(stage, c[0], [c[1:], (*k_stop[1:], 1)])
                break
            t, lvl = c[0], c[1]
            if c[4] == 2:                           # a sample instant
                smp.sample(ts, out)
                ts, ts_s0 = ts + dt, ts
                continue
            self.ctx = c[:4]
            env.now = t
            if c[4] == 0:                           # a ranking arrives, or a signal
                if ai == mk:
                    mk = marks(ai)
                ai += 1
                rid = e[8]
                if e[7] == ARRIVE:
                    self.arrived += 1
                    job = Job(rid, users[rid], Ls[rid], M_fixed or Ms[rid], t, None)
                    relay.stage.dispatch(job)       # relay.submit_rank
                else:
                    relay.signal(env, rid, users[rid], Ls[rid], Ms[rid])
                continue
            heappop(heap)
            kind, i = h[5], h[6]
            if kind == END:
                self.end(i, t)
            elif kind == WAKE:
                if state[i] == R_WOKEN:
                    self.top(i, t, lvl)
            else:                                   # a controller's tick
                gen = env.procs[i]
                delay = gen.send(None)
                self.push(t + delay, 0, t, 0, CONTROL, i)
        self.ai, self.mk = ai, mk
        self.ts, self.ts_s0 = ts, ts_s0
