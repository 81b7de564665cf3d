"""One replication of the cascade: build the runtime objects, run an engine, return records.

Simulated time is in milliseconds throughout. Two engines run a replication:

- SimPy (here), the reference: a request is a plain generator process that visits the
  stages in order; nodes are worker processes (see stage.py);
- the fast engine (stagewise.py): the same runtime objects, simulated stage by stage, each
  stage's events in time order. A cascade is feed-forward, so this is exact; the engine
  gives byte-identical records, or declines with a reason and SimPy runs instead.

`run.engine` picks one (simpy | fast | auto; auto, the default: fast wherever it is exact).
Records are written into preallocated numpy arrays while the run goes (compact: a stage's
entry time and hop are derived from the stage before, see `Replication.columns`); nothing
is summarised here.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from . import scenario as sc
from . import history_store, service
from .interference import timelines
from .partition import start_controllers
from .progress import Marks
from .relay import Relay, build_relay, relay_worker
from .routing import make_picker
from .stage import Armed, Job, Node, Stage, make_dispatch, node_worker
from .workload import RequestBatch, generate

ENGINES = ("simpy", "fast", "auto")
DEFAULT_ENGINE = "auto"


# Sampled columns after (time, stage, node): queue, in service, busy fraction, 3 memory
# figures, 3 split figures and the N_COUNTS per-interval counter differences.
N_COUNTS = 5
N_COLUMNS = 9 + N_COUNTS


@dataclass
class StageRecords:
    """One stage's per-request records. A request that never finished the stage has node
    -1, NaN times and batch 0. Only the first stage keeps entry times (the source's clock);
    a later stage's entry is the stage before's start + service + hop, which is exactly
    the simulated clock there (see `Replication.columns`)."""

    node: np.ndarray             # int16 (int32 for pools of more than 32,767 nodes)
    start_ms: np.ndarray
    service_ms: np.ndarray
    batch: np.ndarray            # int16 (int32 for batches of more than 32,767 jobs)
    hop: float                   # the stage's hop to the next stage (ms)
    enter_ms: np.ndarray | None = None   # first stage only, until `Replication.compact`

    @classmethod
    def empty(cls, n: int, stage: Stage, first: bool) -> "StageRecords":
        small = np.iinfo(np.int16).max
        return cls(np.full(n, -1, np.int16 if len(stage.nodes) <= small else np.int32),
                   np.full(n, np.nan), np.full(n, np.nan),
                   np.zeros(n, np.int16 if stage.max_batch <= small else np.int32), stage.hop_ms,
                   np.full(n, np.nan) if first else None)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.node, self.start_ms, self.service_ms, self.batch,
                                      self.enter_ms) if a is not None)


@dataclass
class RelayRecords:
    """What is read of a finished relay once its replication's metrics are taken (the
    requests table's relay columns): plain arrays, so a pool worker can send it back
    (the live `Relay` holds SimPy processes)."""

    stage_name: str
    prefix: np.ndarray
    pre: np.ndarray
    hbm: "HbmRecords | None" = None


@dataclass
class HbmRecords:
    ids: np.ndarray
    misses: np.ndarray
    emb_ms: np.ndarray


@dataclass
class Replication:
    """Everything one run produced, as arrays. Times in ms; NaN where never reached."""

    index: int
    requests: RequestBatch
    completion: np.ndarray | None           # None once `compact` found it derivable
    stages: dict[str, StageRecords]
    timeseries: dict[str, np.ndarray]
    busy_ms: dict[str, np.ndarray]          # per stage: each node's busy time over the run
    window_busy_ms: dict[str, np.ndarray]   # per stage: each node's busy time in the window
    end_ms: float                           # last arrival
    stopped_ms: float                       # when the run stopped
    extrapolated: dict[str, int]
    relay: Relay | RelayRecords | None = None
    warmup_ms: float = 0.0                  # the measurement window is [warmup_ms, end_ms]
    engine: str = "simpy"                   # the engine that ran it
    engine_note: str | None = None          # why the fast engine did not (None: it did, or not asked)
    history: dict | None = None             # per stage with a history store: its HistoryRecords

    def columns(self, name: str, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """A stage's full record columns (of `rows`): node, enter_ms, start_ms, service_ms,
        batch, hop_ms."""
        names = list(self.stages)
        k = names.index(name)
        rec = self.stages[name]
        start = rec.start_ms[rows]
        done = ~np.isnan(start)
        if k == 0:
            enter = rec.enter_ms[rows] if rec.enter_ms is not None else np.where(
                done, source_clock(self.requests.arrival_ms)[rows], np.nan)
        else:
            prev = self.stages[names[k - 1]]
            enter = np.where(done, prev.start_ms[rows] + prev.service_ms[rows] + prev.hop, np.nan)
        hop = np.where(done, rec.hop, 0.0) if rec.hop else np.zeros(len(done))
        return {"node": rec.node[rows].astype(np.int32), "enter_ms": enter, "start_ms": start,
                "service_ms": rec.service_ms[rows], "batch": rec.batch[rows].astype(np.int32),
                "hop_ms": hop}

    @property
    def completion_ms(self) -> np.ndarray:
        """When each request left the last stage and its hop (NaN: never)."""
        if self.completion is not None:
            return self.completion
        return self._derived_completion()

    def _derived_completion(self) -> np.ndarray:
        last = list(self.stages.values())[-1]
        c = last.start_ms + last.service_ms + last.hop
        return np.where(c <= stop_ms(self.end_ms), c, np.nan) if last.hop else c

    def compact(self) -> "Replication":
        """Drop what the other records give exactly (the first stage's entry times, the
        completions); a replication then holds its workload and 20 bytes per request and
        stage."""
        first = next(iter(self.stages.values()))
        if first.enter_ms is not None:
            derived = np.where(np.isnan(first.start_ms), np.nan, source_clock(self.requests.arrival_ms))
            if np.array_equal(derived, first.enter_ms, equal_nan=True):
                first.enter_ms = None
        if self.completion is not None and np.array_equal(self._derived_completion(), self.completion,
                                                          equal_nan=True):
            self.completion = None
        return self

    def detached(self) -> "Replication":
        """This replication with its relay reduced to `RelayRecords`: picklable, for a
        pool worker to return once `replication_metrics` has read the live relay."""
        r = self.relay
        if isinstance(r, Relay):
            hbm = None if r.hbm is None else HbmRecords(r.hbm.ids, r.hbm.misses, r.hbm.emb_ms)
            self.relay = RelayRecords(r.stage_name, r.prefix, r.pre, hbm)
        return self

    @property
    def busy(self) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        """Per stage, per node, one (start, end) pair spanning the node's total busy time.
        Busy intervals themselves are not kept (a node's memory would grow with its jobs);
        this shape serves callers that sum them."""
        return {name: [(np.zeros(1), np.array([b])) for b in busy.tolist()]
                for name, busy in self.busy_ms.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-request arrays (records and the workload)."""
        r = self.requests
        return (sum(x.nbytes for x in (r.arrival_ms, r.user_id, r.history_len, r.candidates))
                + (self.completion.nbytes if self.completion is not None else 0)
                + sum(s.nbytes for s in self.stages.values()))


def source_clock(arrival_ms: np.ndarray) -> np.ndarray:
    """The source's clock when each request starts: it moves to each later arrival (as
    prev + (arrival - prev), which is the arrival but for rounding: `compact` checks)."""
    return np.maximum.accumulate(np.maximum(arrival_ms, 0.0)) if len(arrival_ms) else arrival_ms


def warmup_cut_ms(scenario: sc.Scenario, arrival_ms: np.ndarray) -> float:
    """Configured warm-up, else 10% of the run (by time, or by request count)."""
    if scenario.run.warmup_s is not None:
        return scenario.run.warmup_s * 1000.0
    if scenario.run.duration_s is not None:
        return 0.1 * scenario.run.duration_s * 1000.0
    return float(arrival_ms[len(arrival_ms) // 10]) if len(arrival_ms) else 0.0


def stream(seed: int, replication: int, n: int) -> list[np.random.Generator]:
    """n independent generators for one replication; independent of how many replications run."""
    child = np.random.SeedSequence(seed, spawn_key=(replication,))
    return [np.random.default_rng(s) for s in child.spawn(n)]


def build_stages(env: simpy.Environment, scenario: sc.Scenario,
                 rngs: list[np.random.Generator], index: int = 0) -> list[Stage]:
    stages = []
    relay_stage = scenario.relay.stage if scenario.relay else None
    for k, (name, cfg) in enumerate(scenario.stages.items()):
        nodes = [Node(i) for i in range(cfg.nodes.count)]
        device = scenario.device(getattr(cfg.service, "device", None) or cfg.nodes.device)
        svc = service.build(cfg.service, rngs[2 * k + 1], f"stages.{name}.service",
                            relay=name == relay_stage, device=device)
        if cfg.interference is not None:        # a declared block: every job on the node
            for nd, ep in zip(nodes, timelines(cfg.interference, len(nodes), scenario.run.seed, index, 2 * k)):
                nd.episodes = ep
        if getattr(svc, "interference", None) is not None:     # a profile's: the cost model applies it
            svc.episodes = timelines(svc.interference, len(nodes), scenario.run.seed, index, 2 * k + 1)
        pick = None
        if cfg.router not in ("shared", "delay"):
            # A relay worker changes loads without telling the router's index: scan there.
            pick = make_picker(cfg.router, nodes, rngs[2 * k], cfg.affinity.virtual_nodes,
                               cfg.affinity.overload_jobs, indexed=name != relay_stage)
        armed = Armed(nodes) if cfg.router == "shared" else None
        stages.append(Stage(
            name=name, nodes=nodes, dispatch=make_dispatch(env, cfg.router, nodes, pick, svc, armed),
            pick=pick, service=svc, max_batch=cfg.batch.max_size, max_wait_ms=cfg.batch.max_wait_ms,
            marginal_cost=cfg.batch.marginal_cost, hop_ms=cfg.hop_ms, candidates=cfg.candidates,
            router=cfg.router, armed=armed))
    return stages


@dataclass
class Prepared:
    env: simpy.Environment
    requests: RequestBatch
    stages: list[Stage]
    extrapolated: dict[str, int]
    relay: Relay | None
    warmup_ms: float = 0.0
    end_ms: float = 0.0


def prepare(scenario: sc.Scenario, index: int) -> Prepared:
    """Workload and runtime objects of one replication, with every request shape checked
    against the cost tables up front (so a bad shape fails before the run, not in it)."""
    # Streams: workload, two per stage, then the embedding misses (appended last, so the
    # others are the same with or without an HBM pool).
    rngs = stream(scenario.run.seed, index, 2 + 2 * len(scenario.stages))
    env = simpy.Environment()
    reqs = generate(scenario.workload, scenario.run, rngs[0])
    stages = build_stages(env, scenario, rngs[1:-1], index)
    extrapolated = {}
    for s in stages:
        M = np.full(len(reqs), s.candidates) if s.candidates else reqs.candidates
        check = getattr(s.service, "check", None)
        extrapolated[s.name] = check(reqs.history_len, M) if check else 0
    relay = None
    if scenario.relay is not None:
        stage = next(s for s in stages if s.name == scenario.relay.stage)
        relay = build_relay(scenario, stage, len(reqs), rngs[-1])
    for k, (s, cfg) in enumerate(zip(stages, scenario.stages.values())):
        if cfg.history_store is not None:
            s.history = history_store.build(cfg.history_store, scenario.workload, reqs, len(s.nodes),
                                            scenario.run.seed, index, k)
    cut = warmup_cut_ms(scenario, reqs.arrival_ms)
    end_ms = float(reqs.arrival_ms[-1]) if len(reqs) else 0.0
    for s in stages:
        for nd in s.nodes:
            nd.window_lo_ms, nd.window_hi_ms = cut, end_ms
    return Prepared(env, reqs, stages, extrapolated, relay, cut, end_ms)


def run_replication(scenario: sc.Scenario, index: int,
                    adjust: Callable[[Prepared, int], None] | None = None,
                    engine: str | None = None,
                    progress: Callable[[float], None] | None = None) -> Replication:
    """One replication on the engine asked for (default: `run.engine`, else auto).

    auto and fast run the fast engine when it is exact for the scenario; otherwise, or if
    it meets a case it cannot order exactly, SimPy runs the replication (from the same
    streams) and `Replication.engine_note` says why. `progress(fraction)`, if given, is
    called as simulated time passes each 2% of the arrivals' span (simrec.progress)."""
    engine = engine or getattr(scenario.run, "engine", None) or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    note, prep = None, None
    if engine != "simpy":
        from . import stagewise
        note = stagewise.unsupported(scenario)
        if note is None:
            prep = prepare(scenario, index)
            if adjust is not None:
                adjust(prep, index)
            try:
                return stagewise.run(scenario, prep, index, progress).compact()
            except stagewise.Tie as e:
                note, prep = str(e), None       # its streams are spent: start again
    prep = prepare(scenario, index)
    if adjust is not None:
        adjust(prep, index)
    rep = run_simpy(scenario, prep, index, progress)
    rep.engine_note = note
    return rep.compact()


def sample_interval_ms(scenario: sc.Scenario, end_ms: float) -> float:
    return scenario.run.sample_interval_ms or max(end_ms / 200, 1e-3)


def stop_ms(end_ms: float) -> float:
    """An overloaded run may never drain: it stops at twice the arrival span plus a minute."""
    return 2 * end_ms + 60_000


def run_simpy(scenario: sc.Scenario, prep: Prepared, index: int,
              progress: Callable[[float], None] | None = None) -> Replication:
    """The reference engine: SimPy processes for the requests, the nodes and the sampler;
    the source reports `progress` (read-only: nothing it does is an event)."""
    env, reqs, stages, relay = prep.env, prep.requests, prep.stages, prep.relay
    n = len(reqs)
    recs = {s.name: StageRecords.empty(n, s, k == 0) for k, s in enumerate(stages)}
    enter0 = recs[stages[0].name].enter_ms
    completion = np.full(n, np.nan)
    state = {"done": 0}
    all_done = env.event()
    signal_after = scenario.relay.signal_after if relay else None

    def send_signal(rid: int, user: int, L: int, M: int) -> None:
        ev = env.timeout(relay.cfg.signal_ms)
        ev.callbacks.append(lambda _: relay.signal(env, rid, user, L, M))

    # Per stage, what a request needs (records written through memoryviews: no copies).
    plan = [(s.dispatch, *(memoryview(a) for a in (recs[s.name].node, recs[s.name].start_ms,
                                                    recs[s.name].service_ms, recs[s.name].batch)),
             s.candidates, s.hop_ms, s.name == signal_after) for s in stages]
    enter0_mv, completion_mv = memoryview(enter0), memoryview(completion)

    def request(env: simpy.Environment, rid: int, user: int, L: int, M: int):
        if signal_after == "arrival":
            send_signal(rid, user, L, M)
        first = True
        for dispatch, r_node, r_start, r_service, r_batch, cand, hop, signal_here in plan:
            job = Job(rid, user, L, cand or M, env.now, env.event())
            dispatch(job)
            yield job.done
            if first:
                enter0_mv[rid] = job.enqueued_ms
                first = False
            r_node[rid] = job.node
            r_start[rid], r_service[rid], r_batch[rid] = job.start_ms, job.service_ms, job.batch
            if signal_here:
                send_signal(rid, user, L, M)
            if hop:
                yield env.timeout(hop)
        completion_mv[rid] = env.now
        state["done"] += 1
        if state["done"] == n:
            all_done.succeed()

    def source(env: simpy.Environment):
        # memoryviews index to Python numbers without copying the columns
        arrivals, users, Ls, Ms = (memoryview(np.ascontiguousarray(c)) for c in (
            reqs.arrival_ms, reqs.user_id, reqs.history_len, reqs.candidates))
        marks = Marks(np.ascontiguousarray(reqs.arrival_ms, dtype=float), prep.end_ms, progress)
        mk = marks.first
        for rid in range(n):
            delay = arrivals[rid] - env.now
            if delay > 0:
                yield env.timeout(delay)
            if rid == mk:
                mk = marks(rid)
            env.process(request(env, rid, users[rid], Ls[rid], Ms[rid]))

    end_ms = prep.end_ms
    dt = sample_interval_ms(scenario, end_ms)
    samples = array("d")
    hbm = relay.hbm if relay else None

    samplers = [StageSampler(si, s, dt, relay) for si, s in enumerate(stages)]

    def sampler(env: simpy.Environment):
        while not all_done.triggered:
            yield env.timeout(dt)
            for smp in samplers:
                smp.sample(env.now, samples)

    for s in stages:
        for nd in s.nodes:
            if relay is not None and s is relay.stage:
                env.process(relay_worker(env, relay, nd))
            else:
                env.process(node_worker(env, s, nd))
    env.process(source(env))
    env.process(sampler(env))
    if hbm is not None:
        start_controllers(env, hbm)
    if n == 0:
        all_done.succeed()
    env.run(until=simpy.AnyOf(env, [all_done, env.timeout(stop_ms(end_ms))]))
    now = float(env.now)
    rep = Replication(index, reqs, completion, recs, timeseries(samples, relay),
                      *busy_totals(stages, now), end_ms, now, prep.extrapolated, relay,
                      prep.warmup_ms, "simpy")
    rep.history = {s.name: s.history.records for s in stages if s.history is not None} or None
    return rep


def busy_totals(stages: list[Stage], now: float) -> tuple[dict, dict]:
    """Per stage, per node: busy time over the run and in the measurement window, a batch
    still in service when the run stopped counted up to `now`."""
    return ({s.name: np.array([nd.busy_until(now) for nd in s.nodes]) for s in stages},
            {s.name: np.array([nd.busy_in_window(now) for nd in s.nodes]) for s in stages})


class StageSampler:
    """One stage's rows of the time series, taken at each sample instant.

    Per node: own queue, jobs in service, busy fraction over the last interval,
    prefix-cache bytes (HBM used, HBM pinned, DRAM used) and the interval's prefix hit
    rate on relay nodes, and with an HBM pool its split (EMB bytes, KV capacity), the
    valid EMB rows' bytes, the interval's EMB hit rate and its missed and refilled EMB
    bytes. One extra row per stage (node = -1) holds the stage totals (rates pooled
    over nodes, busy fraction averaged); a shared queue is counted only there. Sampling
    changes nothing, so both engines take the same rows."""

    def __init__(self, si: int, stage: Stage, dt: float, relay: Relay | None):
        self.si, self.stage, self.dt = si, stage, dt
        nodes = stage.nodes
        self.shared = len(nodes) > 1 and nodes[0].queue is nodes[1].queue
        self.caches = relay.caches if relay is not None and relay.stage is stage else None
        self.hbm = relay.hbm if self.caches is not None else None
        self.last = [0.0] * len(nodes)
        self.prev: list = [0] * len(nodes)     # cumulative counters at the last sample

    def sample(self, now: float, out: array) -> None:
        """Append this stage's rows at `now` to `out` (flat: 3 + N_COLUMNS values a row)."""
        if self.caches is not None:
            return self._sample_caches(now, out)
        si, dt, last, shared = self.si, self.dt, self.last, self.shared
        nodes = self.stage.nodes
        ext = out.extend
        q_tot = s_tot = f_tot = 0.0
        for nd in nodes:
            i = nd.index
            busy = nd.busy_ms + (now - nd.busy_since if nd.busy_since >= 0 else 0.0)   # busy_until
            frac = (busy - last[i]) / dt
            last[i] = busy
            q = 0 if shared else len(nd.queue) + len(nd.pre_queue)
            s = nd.in_service
            ext((now, si, i, q, s, frac, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))   # N_COLUMNS - 3 zeros
            q_tot += q
            s_tot += s
            f_tot += frac
        if shared:
            q_tot = len(nodes[0].queue)
        ext((now, si, -1, q_tot, s_tot, f_tot / len(nodes), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def _sample_caches(self, now: float, out: array) -> None:
        si, dt, last, prev, hbm = self.si, self.dt, self.last, self.prev, self.hbm
        nodes = self.stage.nodes
        total = np.zeros(N_COLUMNS)
        for nd in nodes:
            busy = nd.busy_until(now)
            i = nd.index
            frac = (busy - last[i]) / dt
            last[i] = busy
            c = self.caches[i]
            mem = (c.used, c.pinned, c.expander.used if c.expander else 0)
            split = (0, 0, 0)
            cum = np.zeros(N_COUNTS)     # kv hits, kv lookups, ids, misses, refilled rows
            cum[:2] = c.counters.hits, c.counters.hits + c.counters.misses
            if hbm is not None:
                pool = hbm.pools[i]
                e = pool.emb     # as of its last lookup (sampling changes nothing)
                cum[2:] = e.counters.ids, e.counters.misses, e.counters.refilled_rows
                split = (pool.emb_bytes, c.capacity, int(e.filled * e.row_bytes))
            counts = cum - prev[i]
            prev[i] = cum
            row = np.array((0 if self.shared else len(nd.queue) + len(nd.pre_queue),
                            nd.in_service, frac, *mem, *split, *counts), float)
            out.extend((now, si, i))
            out.extend(row.tolist())
            total += row
        if self.shared:
            total[0] = len(nodes[0].queue)
        total[2] /= len(nodes)
        out.extend((now, si, -1))
        out.extend(total.tolist())


def timeseries(samples, relay: Relay | None) -> dict[str, np.ndarray]:
    """The sampler's rows (flat: an array('d') or ndarray) as columns, each its own array
    (see StageSampler for what a row holds)."""
    hbm = relay.hbm if relay else None
    ts = np.asarray(samples if isinstance(samples, np.ndarray) else np.frombuffer(samples, dtype=float))
    ts = ts.reshape(-1, 3 + N_COLUMNS)
    timeseries = {"time_ms": ts[:, 0].copy(), "stage": ts[:, 1].astype(np.int32),
                  "node": ts[:, 2].astype(np.int32), "queue_len": ts[:, 3].astype(np.int32),
                  "in_service": ts[:, 4].astype(np.int32), "busy_fraction": ts[:, 5].copy(),
                  "hbm_used_bytes": ts[:, 6].astype(np.int64), "hbm_pinned_bytes": ts[:, 7].astype(np.int64),
                  "dram_used_bytes": ts[:, 8].astype(np.int64)}
    if relay is not None:
        kv_hits, kv_lookups, ids, misses, refilled = (ts[:, 12 + k] for k in range(N_COUNTS))
        with np.errstate(invalid="ignore", divide="ignore"):
            timeseries["kv_hit_rate"] = np.where(kv_lookups > 0, kv_hits / kv_lookups, np.nan)
            if hbm is not None:
                rb = hbm.emb_cfg.row_bytes
                timeseries.update({
                    "emb_bytes": ts[:, 9].astype(np.int64), "kv_capacity_bytes": ts[:, 10].astype(np.int64),
                    "emb_filled_bytes": ts[:, 11].astype(np.int64),
                    "emb_hit_rate": np.where(ids > 0, 1.0 - misses / ids, np.nan),
                    "emb_miss_bytes": (misses * rb).astype(np.int64),
                    "emb_refill_bytes": np.round(refilled * rb).astype(np.int64)})
    return timeseries
