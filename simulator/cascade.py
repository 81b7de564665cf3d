"""One replication of the cascade: build the runtime objects, run SimPy, return records.

Simulated time is in milliseconds throughout. A request is a plain generator process that
visits the stages in order; nodes are worker processes (see stage.py). Records are
written into preallocated numpy arrays while the run goes; nothing is summarised here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import simpy

from . import scenario as sc
from . import service
from .interference import timelines
from .partition import start_controllers
from .relay import Relay, build_relay, relay_worker
from .routing import make_picker
from .stage import Job, Node, Stage, make_dispatch, node_worker
from .workload import RequestBatch, generate


# Sampled columns after (time, stage, node): queue, in service, busy fraction, 3 memory
# figures, 3 split figures and the N_COUNTS per-interval counter differences.
N_COUNTS = 5
N_COLUMNS = 9 + N_COUNTS


@dataclass
class StageRecords:
    node: np.ndarray
    enter_ms: np.ndarray
    start_ms: np.ndarray
    service_ms: np.ndarray
    batch: np.ndarray
    hop_ms: np.ndarray


@dataclass
class Replication:
    """Everything one run produced, as arrays. Times in ms; NaN where never reached."""

    index: int
    requests: RequestBatch
    completion_ms: np.ndarray
    stages: dict[str, StageRecords]
    timeseries: dict[str, np.ndarray]
    busy: dict[str, list[tuple[np.ndarray, np.ndarray]]]   # per stage, per node: (starts, ends)
    end_ms: float                                          # last arrival
    stopped_ms: float                                      # when the run stopped
    extrapolated: dict[str, int]
    relay: Relay | None = None


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
            pick = make_picker(cfg.router, nodes, rngs[2 * k], cfg.affinity.virtual_nodes,
                               cfg.affinity.overload_jobs)
        stages.append(Stage(
            name=name, nodes=nodes, dispatch=make_dispatch(env, cfg.router, nodes, pick, svc),
            pick=pick, service=svc, max_batch=cfg.batch.max_size, max_wait_ms=cfg.batch.max_wait_ms,
            marginal_cost=cfg.batch.marginal_cost, hop_ms=cfg.hop_ms, candidates=cfg.candidates))
    return stages


@dataclass
class Prepared:
    env: simpy.Environment
    requests: RequestBatch
    stages: list[Stage]
    extrapolated: dict[str, int]
    relay: Relay | None


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
    return Prepared(env, reqs, stages, extrapolated, relay)


def run_replication(scenario: sc.Scenario, index: int,
                    adjust: Callable[[Prepared, int], None] | None = None) -> Replication:
    prep = prepare(scenario, index)
    if adjust is not None:
        adjust(prep, index)
    env, reqs, stages, relay = prep.env, prep.requests, prep.stages, prep.relay
    n = len(reqs)
    recs = {s.name: StageRecords(np.full(n, -1, np.int32), *(np.full(n, np.nan) for _ in range(3)),
                                 np.zeros(n, np.int32), np.zeros(n)) for s in stages}
    completion = np.full(n, np.nan)
    state = {"done": 0}
    all_done = env.event()
    signal_after = scenario.relay.signal_after if relay else None

    def send_signal(rid: int, user: int, L: int, M: int) -> None:
        ev = env.timeout(relay.cfg.signal_ms)
        ev.callbacks.append(lambda _: relay.signal(env, rid, user, L, M))

    def request(env: simpy.Environment, rid: int, user: int, L: int, M: int):
        if signal_after == "arrival":
            send_signal(rid, user, L, M)
        for stage in stages:
            rec = recs[stage.name]
            job = Job(rid, user, L, stage.candidates or M, env.now, env.event())
            stage.dispatch(job)
            yield job.done
            rec.node[rid], rec.enter_ms[rid] = job.node, job.enqueued_ms
            rec.start_ms[rid], rec.service_ms[rid], rec.batch[rid] = job.start_ms, job.service_ms, job.batch
            if stage.name == signal_after:
                send_signal(rid, user, L, M)
            if stage.hop_ms:
                rec.hop_ms[rid] = stage.hop_ms
                yield env.timeout(stage.hop_ms)
        completion[rid] = env.now
        state["done"] += 1
        if state["done"] == n:
            all_done.succeed()

    def source(env: simpy.Environment):
        arrivals = reqs.arrival_ms.tolist()
        users, Ls, Ms = reqs.user_id.tolist(), reqs.history_len.tolist(), reqs.candidates.tolist()
        for rid in range(n):
            delay = arrivals[rid] - env.now
            if delay > 0:
                yield env.timeout(delay)
            env.process(request(env, rid, users[rid], Ls[rid], Ms[rid]))

    end_ms = float(reqs.arrival_ms[-1]) if n else 0.0
    dt = scenario.run.sample_interval_ms or max(end_ms / 200, 1e-3)
    samples: list[tuple] = []
    hbm = relay.hbm if relay else None

    def sampler(env: simpy.Environment):
        """Per node: own queue, jobs in service, busy fraction over the last interval,
        prefix-cache bytes (HBM used, HBM pinned, DRAM used) and the interval's prefix hit
        rate on relay nodes, and with an HBM pool its split (EMB bytes, KV capacity), the
        valid EMB rows' bytes, the interval's EMB hit rate and its missed and refilled EMB
        bytes. One extra row per stage (node = -1) holds the stage totals (rates pooled
        over nodes, busy fraction averaged); a shared queue is counted only there."""
        last = {(s.name, nd.index): 0.0 for s in stages for nd in s.nodes}
        caches = {relay.stage.name: relay.caches} if relay else {}
        prev = {}      # (stage, node) -> cumulative counters at the last sample
        while not all_done.triggered:
            yield env.timeout(dt)
            for si, s in enumerate(stages):
                shared = len(s.nodes) > 1 and s.nodes[0].queue is s.nodes[1].queue
                total = np.zeros(N_COLUMNS)
                for nd in s.nodes:
                    busy = nd.busy_until(env.now)
                    key = (s.name, nd.index)
                    frac = (busy - last[key]) / dt
                    last[key] = busy
                    mem = (0, 0, 0)
                    counts = np.zeros(N_COUNTS)     # kv hits, kv lookups, ids, misses, refilled rows
                    split = (0, 0, 0)
                    if s.name in caches:
                        c = caches[s.name][nd.index]
                        mem = (c.used, c.pinned, c.expander.used if c.expander else 0)
                        cum = np.zeros(N_COUNTS)
                        cum[:2] = c.counters.hits, c.counters.hits + c.counters.misses
                        if hbm is not None:
                            pool = hbm.pools[nd.index]
                            e = pool.emb     # as of its last lookup (sampling changes nothing)
                            cum[2:] = e.counters.ids, e.counters.misses, e.counters.refilled_rows
                            split = (pool.emb_bytes, c.capacity, int(e.filled * e.row_bytes))
                        counts = cum - prev.get(key, 0)
                        prev[key] = cum
                    row = np.array((0 if shared else len(nd.queue) + len(nd.pre_queue),
                                    nd.in_service, frac, *mem, *split, *counts), float)
                    samples.append((env.now, si, nd.index, *row))
                    total += row
                if shared:
                    total[0] = len(s.nodes[0].queue)
                total[2] /= len(s.nodes)
                samples.append((env.now, si, -1, *total))

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
    # An overloaded run may never drain: stop at twice the arrival span plus a minute.
    env.run(until=simpy.AnyOf(env, [all_done, env.timeout(2 * end_ms + 60_000)]))

    ts = np.array(samples, dtype=float).reshape(-1, 3 + N_COLUMNS)
    timeseries = {"time_ms": ts[:, 0], "stage": ts[:, 1].astype(np.int32),
                  "node": ts[:, 2].astype(np.int32), "queue_len": ts[:, 3].astype(np.int32),
                  "in_service": ts[:, 4].astype(np.int32), "busy_fraction": ts[:, 5],
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
    busy = {s.name: [(np.array(nd.busy_starts), _ends(nd, env.now)) for nd in s.nodes] for s in stages}
    return Replication(index, reqs, completion, recs, timeseries, busy, end_ms, float(env.now),
                       prep.extrapolated, relay)


def _ends(node: Node, now: float) -> np.ndarray:
    """Batch end times; a batch still in service when the run stopped ends at `now`."""
    ends = np.array(node.busy_ends)
    if len(ends) < len(node.busy_starts):
        ends = np.append(ends, now)
    return ends
