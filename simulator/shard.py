"""Fleet scale by sharding: a cascade split into independent sub-clusters by user hash.

When can a cluster shard? Its one key stage routes by user hash (`router: affinity`), so a
user's requests always meet the same key node; every other stage is stateless per request
and its routing does not look across the pool (`random`, or `delay`: no queue). Then the
users whose key node falls in shard k's range of key nodes (contiguous, sizes as even as
possible) form a sub-cluster that shares nothing with the others:

- key stage: shard k owns its range of nodes and routes on the *fleet's* hash ring, so each
  user lands on the node it has in the unsharded fleet (node indices offset back on merge);
- arrivals: a Poisson stream (also diurnal or piecewise) split by user is, by the marking
  theorem, an independent Poisson stream per shard at rate x share_k, where share_k is the
  Zipf weight of the shard's users; each shard draws it from its own stream, users from the
  population restricted to its users (the population and its history lengths are the
  fleet's, drawn from the fleet's seed). Sessions belong to one user, so session starts
  split the same way and a session never spans shards. A trace is split row by row by the
  user's key node: exactly the trace's rows, each in one shard;
- other stages: node counts split in proportion to share_k (largest remainder, at least
  one each), so a random-routed node sees the fleet's per-node rate;
- every shard has its own seed (derived from the fleet's and the shard index), so service
  draws are independent across shards.

So a sharded run is the same system in distribution, not the same sample path: its records
differ from the unsharded run's (other random streams), its metrics agree within their CIs.
What cannot shard is refused in one line (`cannot_shard`): a shared queue or a router that
balances across the whole pool (least_loaded, power_of_two, round_robin, hbm_aware,
affinity_fallback's fallback), burst arrivals (one burst process modulates the whole
fleet), a count of requests (it fixes the fleet's total), an adaptive replication count
(decided on the fleet's P99), history stores (a tier's hits depend on which users share
it), host-scoped slow episodes (a host may straddle shards), and relay stages (their
per-request outcomes and caches are not merged yet).

The merge is exact: per replication, the shards' requests interleave by arrival time (ties
by shard, then by the shard's order) and are numbered again, node indices are offset by
the shard's first node, per-node busy times concatenate in fleet order, and time-series
stage totals add up over shards (busy fraction averaged over all the fleet's nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import scenario as sc
from .cascade import (Prepared, Replication, StageRecords, run_replication, stream, warmup_cut_ms)
from .errors import InputError
from .routing import MASK64
from .workload import (RequestBatch, UserPopulation, arrival_times_s, draw, generate,
                       session_arrivals)

SHARD_TAG = 0x5AD       # spawn-key tag of the shards' own streams (apart from the replications')
STATELESS = ("random", "delay")


def key_stage(scenario: sc.Scenario) -> str | None:
    names = [n for n, s in scenario.stages.items() if s.router == "affinity"]
    return names[0] if len(names) == 1 else None


def cannot_shard(scenario: sc.Scenario, shards: int) -> str | None:
    """Why this scenario cannot split into `shards` independent sub-clusters (None: it can)."""
    affinity = [n for n, s in scenario.stages.items() if s.router == "affinity"]
    if len(affinity) != 1:
        return ("sharding needs exactly one stage routed by user hash (router: affinity), "
                f"found {len(affinity)}")
    key = affinity[0]
    for name, st in scenario.stages.items():
        if name == key:
            pass
        elif st.router == "shared":
            return f"stages.{name}: one shared queue spans the whole fleet"
        elif st.router == "affinity_fallback":
            return f"stages.{name}: affinity_fallback falls back to least_loaded across the whole fleet"
        elif st.router not in STATELESS:
            return (f"stages.{name}.router {st.router} balances across the whole fleet's pool "
                    f"(only random and delay split by shard)")
        if st.history_store is not None:
            return f"stages.{name}.history_store: a tier's hits depend on which users share it"
        if st.interference is not None and st.interference.scope == "host":
            return f"stages.{name}.interference: a host-scoped timeline may straddle shards"
        if st.nodes.count < shards:
            return f"stages.{name} has {st.nodes.count} nodes, fewer than the {shards} shards"
    if scenario.relay is not None or scenario.hbm is not None:
        return "relay and HBM pool outcomes and caches are not merged across shards"
    arrivals = scenario.workload.arrivals
    if isinstance(arrivals, sc.BurstArrivals):
        return "burst arrivals: one burst process modulates the whole fleet's rate together"
    trace = isinstance(arrivals, sc.TraceArrivals)
    if scenario.run.requests is not None and not trace:
        return "run.requests fixes the fleet's total; give run.duration_s instead"
    if scenario.run.p99_halfwidth_rel is not None:
        return "run.p99_halfwidth_rel adds replications by the fleet's P99; give a fixed run.replications"
    return None


# -- the fleet's hash ring, vectorised (routing.HashRing, bit for bit) ----------------------

def mix64(x: np.ndarray) -> np.ndarray:
    """routing.mix64 on uint64 arrays (numpy's uint64 arithmetic wraps mod 2**64)."""
    x = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Ring:
    """The key stage's consistent-hash ring over the fleet's nodes, as arrays."""

    def __init__(self, n_nodes: int, virtual_nodes: int):
        node = np.repeat(np.arange(n_nodes, dtype=np.uint64), virtual_nodes)
        v = np.tile(np.arange(virtual_nodes, dtype=np.uint64), n_nodes)
        points = mix64((node << np.uint64(20)) | v)
        order = np.lexsort((node, points))           # as sorted((point, node)) does
        self.keys, self.owner = points[order], node[order].astype(np.int64)

    def node_of(self, users: np.ndarray) -> np.ndarray:
        h = mix64(np.asarray(users, np.int64).astype(np.uint64) ^ np.uint64(0x5BD1E995))
        return self.owner[np.searchsorted(self.keys, h, side="left") % len(self.keys)]


def ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """(first node, count) per shard: contiguous, sizes as even as possible."""
    sizes = [n // shards + (k < n % shards) for k in range(shards)]
    return [(sum(sizes[:k]), sizes[k]) for k in range(shards)]


def split_counts(count: int, shares: list[float]) -> list[int]:
    """count nodes in proportion to the shares: largest remainder, at least one each."""
    exact = [count * s for s in shares]
    out = [max(1, math.floor(e)) for e in exact]
    order = sorted(range(len(shares)), key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    i = 0
    while sum(out) < count:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > count:        # the minimum of one took nodes: give back from the largest
        k = max((j for j in range(len(out)) if out[j] > 1), key=lambda j: (out[j] - exact[j], j))
        out[k] -= 1
    return out


@dataclass
class Plan:
    """How a fleet scenario splits: per shard, its share of the traffic and per stage its
    (first node, count) in the fleet's numbering."""

    key: str
    shares: list[float]
    nodes: list[dict[str, tuple[int, int]]]

    def as_dict(self) -> dict:
        return {"shards": len(self.shares), "key_stage": self.key, "shares": self.shares,
                "nodes": [{k: list(v) for k, v in n.items()} for n in self.nodes],
                "rule": "key stage: contiguous ranges of the fleet's hash ring nodes; other stages: "
                        "node counts in proportion to each shard's share (largest remainder, >= 1)"}


def plan(scenario: sc.Scenario, shards: int) -> Plan:
    """The shards of a scenario, refused in one line where it cannot shard."""
    if not isinstance(shards, int) or not 1 <= shards <= 4096:
        raise InputError(f"must be an integer from 1 to 4096 (got {shards!r})", "--shards")
    why = cannot_shard(scenario, shards)
    if why is not None:
        raise InputError(f"cannot shard: {why}", "--shards")
    key = key_stage(scenario)
    cfg = scenario.stages[key]
    own = ranges(cfg.nodes.count, shards)
    home = _user_nodes(scenario)
    bounds = np.array([lo for lo, _ in own] + [cfg.nodes.count])
    shard_of = np.searchsorted(bounds, home, side="right") - 1
    shares = np.bincount(shard_of, weights=_weights(scenario), minlength=shards)
    shares = (shares / shares.sum()).tolist()
    if min(shares) == 0:
        raise InputError(f"cannot shard: a shard would get no users (too few users for {shards} shards)",
                         "--shards")
    per_stage = {name: (ranges(cfg.nodes.count, shards) if name == key else
                        _offsets(split_counts(st.nodes.count, shares)))
                 for name, st in scenario.stages.items()}
    return Plan(key, shares, [{name: per_stage[name][k] for name in scenario.stages}
                              for k in range(shards)])


def _offsets(counts: list[int]) -> list[tuple[int, int]]:
    return [(sum(counts[:k]), c) for k, c in enumerate(counts)]


def _ring(scenario: sc.Scenario) -> Ring:
    cfg = scenario.stages[key_stage(scenario)]
    return Ring(cfg.nodes.count, cfg.affinity.virtual_nodes)


def _trace(scenario: sc.Scenario) -> RequestBatch | None:
    if isinstance(scenario.workload.arrivals, sc.TraceArrivals):
        return generate(scenario.workload, scenario.run, None)
    return None


def _user_nodes(scenario: sc.Scenario) -> np.ndarray:
    """The key node of each user (population) or of each trace row."""
    trace = _trace(scenario)
    users = trace.user_id if trace is not None else np.arange(scenario.workload.users.count)
    return _ring(scenario).node_of(users)


def _weights(scenario: sc.Scenario) -> np.ndarray | None:
    """Each user's share of the traffic (Zipf), or None for a trace (rows count alike)."""
    if _trace(scenario) is not None:
        return None
    u = scenario.workload.users
    w = np.arange(1, u.count + 1, dtype=float) ** -u.zipf_s
    return w / w.sum()


# -- one shard -------------------------------------------------------------------------------

def shard_seed(seed: int, k: int) -> int:
    """Shard k's run.seed: derived from the fleet's (so its service draws are its own), < 2**53."""
    return int(np.random.SeedSequence(seed, spawn_key=(SHARD_TAG, k)).generate_state(1, np.uint64)[0]
               >> np.uint64(11))


def shard_scenario(scenario: sc.Scenario, p: Plan, k: int) -> sc.Scenario:
    """Shard k's own scenario: its node counts, its share of the rate, its own seed, and the
    fleet's warm-up and sample interval (so the shards' windows and samples line up)."""
    data = scenario.model_dump(mode="json")
    for name, (_, count) in p.nodes[k].items():
        data["stages"][name]["nodes"]["count"] = count
    if data["workload"].get("rate_qps") is not None:
        data["workload"]["rate_qps"] = scenario.workload.rate_qps * p.shares[k]
    run = data["run"]
    run["seed"] = shard_seed(scenario.run.seed, k)
    trace = _trace(scenario)
    if run.get("warmup_s") is None and trace is not None:
        run["warmup_s"] = warmup_cut_ms(scenario, trace.arrival_ms) / 1000.0
    if run.get("sample_interval_ms") is None:
        span_ms = (scenario.run.duration_s * 1000.0 if scenario.run.duration_s is not None
                   else float(trace.arrival_ms[-1]))
        run["sample_interval_ms"] = max(span_ms / 200, 1e-3)
    return sc.Scenario.model_validate(data)


class _ShardUsers:
    """The fleet's population restricted to one shard's users (for `pick`)."""

    def __init__(self, population: UserPopulation, mine: np.ndarray):
        pmf = np.diff(population.cdf, prepend=0.0)
        self.ids = np.flatnonzero(mine)
        w = pmf[self.ids]
        self.cdf = np.cumsum(w) / w.sum()

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        idx = np.searchsorted(self.cdf, rng.uniform(0, 1, n), side="right")
        return self.ids[np.minimum(idx, len(self.ids) - 1)]


def shard_requests(scenario: sc.Scenario, p: Plan, k: int, index: int) -> RequestBatch:
    """Shard k's requests in replication `index` (see the module docstring)."""
    lo, count = p.nodes[k][p.key]
    trace = _trace(scenario)
    if trace is not None:
        home = _ring(scenario).node_of(trace.user_id)
        rows = (home >= lo) & (home < lo + count)
        return RequestBatch(trace.arrival_ms[rows], trace.user_id[rows], trace.history_len[rows],
                            trace.candidates[rows])
    w = scenario.workload
    population = UserPopulation(w.users, stream(scenario.run.seed, index, 1)[0])   # the fleet's
    home = _ring(scenario).node_of(np.arange(w.users.count))
    users = _ShardUsers(population, (home >= lo) & (home < lo + count))
    rng = np.random.default_rng(np.random.SeedSequence(scenario.run.seed,
                                                       spawn_key=(index, SHARD_TAG, k)))
    rate = w.rate_qps * p.shares[k]
    if w.users.sessions.mean_requests > 1:
        times_s, uid = session_arrivals(w.model_copy(update={"rate_qps": rate}), scenario.run, users, rng)
    else:
        times_s = arrival_times_s(w.arrivals, rate, rng, scenario.run.duration_s, None)
        uid = users.pick(rng, len(times_s))
    cands = np.maximum(1, np.rint(draw(w.candidates, rng, len(times_s)))).astype(np.int64)
    return RequestBatch(times_s * 1000.0, uid.astype(np.int64), population.history_len[uid], cands)


def run_shard(task: tuple[dict, int, int, int]) -> Replication:
    """One replication of one shard (a worker's task: plain data in, records out)."""
    from .loader import validate
    fleet_data, shards, k, index = task
    fleet = validate(fleet_data, "<fleet>")
    p = plan(fleet, shards)
    sub = shard_scenario(fleet, p, k)
    key_lo = p.nodes[k][p.key][0]
    trace = _trace(fleet)
    ids = np.unique(trace.user_id) if trace is not None else np.arange(fleet.workload.users.count)
    local = (_ring(fleet).node_of(ids) - key_lo).tolist()      # each user's node in this shard
    where = dict(zip(ids.tolist(), local)).__getitem__ if trace is not None else local.__getitem__

    def adjust(prep: Prepared, _index: int) -> None:
        from .stage import make_dispatch
        reqs = shard_requests(fleet, p, k, index)
        prep.requests = reqs
        for s in prep.stages:
            M = np.full(len(reqs), s.candidates) if s.candidates else reqs.candidates
            check = getattr(s.service, "check", None)
            prep.extrapolated[s.name] = check(reqs.history_len, M) if check else 0
            if s.name == p.key:           # route on the fleet's ring, in this shard's numbering
                nodes = s.nodes
                s.pick = lambda user: nodes[where(user)]
                s.dispatch = make_dispatch(prep.env, "affinity", nodes, s.pick, s.service)
        prep.warmup_ms = warmup_cut_ms(sub, reqs.arrival_ms)
        prep.end_ms = float(reqs.arrival_ms[-1]) if len(reqs) else 0.0
        for s in prep.stages:
            for nd in s.nodes:
                nd.window_lo_ms, nd.window_hi_ms = prep.warmup_ms, prep.end_ms

    return run_replication(sub, index, adjust)


def merge(scenario: sc.Scenario, p: Plan, reps: list[Replication]) -> Replication:
    """One fleet replication from its shards' (in shard order), exactly (module docstring)."""
    index = reps[0].index
    arrival = np.concatenate([r.requests.arrival_ms for r in reps])
    order = np.argsort(arrival, kind="stable")       # ties: by shard, then the shard's order
    cat = lambda arrays: np.concatenate(arrays)[order]
    reqs = RequestBatch(arrival[order], cat([r.requests.user_id for r in reps]),
                        cat([r.requests.history_len for r in reps]),
                        cat([r.requests.candidates for r in reps]))
    stages, busy, window_busy = {}, {}, {}
    small = np.iinfo(np.int16).max
    for si, (name, cfg) in enumerate(scenario.stages.items()):
        cols = [r.columns(name) for r in reps]
        offs = [0 if cfg.router == "delay" else p.nodes[k][name][0] for k in range(len(reps))]
        node = cat([np.where(c["node"] >= 0, c["node"] + o, -1) for c, o in zip(cols, offs)])
        rec = StageRecords(node.astype(np.int16 if cfg.nodes.count <= small else np.int32),
                           cat([c["start_ms"] for c in cols]), cat([c["service_ms"] for c in cols]),
                           cat([c["batch"] for c in cols]).astype(
                               np.int16 if cfg.batch.max_size <= small else np.int32),
                           reps[0].stages[name].hop,
                           cat([c["enter_ms"] for c in cols]) if si == 0 else None)
        stages[name] = rec
        busy[name] = np.concatenate([r.busy_ms[name] for r in reps])
        window_busy[name] = np.concatenate([r.window_busy_ms[name] for r in reps])
    notes = sorted({r.engine_note for r in reps if r.engine_note})
    out = Replication(index, reqs, cat([r.completion_ms for r in reps]), stages,
                      _merge_timeseries(scenario, p, reps), busy, window_busy,
                      max(r.end_ms for r in reps), max(r.stopped_ms for r in reps),
                      {n: sum(r.extrapolated[n] for r in reps) for n in scenario.stages}, None,
                      reps[0].warmup_ms, "simpy" if any(r.engine == "simpy" for r in reps) else "fast",
                      "; ".join(notes) or None)
    return out.compact()


def _merge_timeseries(scenario: sc.Scenario, p: Plan, reps: list[Replication]) -> dict:
    """Per-node rows with fleet node indices; one stage-total row (node -1) per stage and
    sample instant, summed over shards (a shard that has stopped sampling is idle then)."""
    names = list(scenario.stages)
    parts = []
    for k, r in enumerate(reps):
        ts = dict(r.timeseries)
        offs = np.array([p.nodes[k][n][0] for n in names])
        node = ts["node"]
        ts["node"] = np.where(node >= 0, node + offs[ts["stage"]], -1).astype(np.int32)
        counts = np.array([p.nodes[k][n][1] for n in names], float)
        total = node < 0
        ts["busy_fraction"] = np.where(total, ts["busy_fraction"] * counts[ts["stage"]], ts["busy_fraction"])
        parts.append(ts)
    cols = {c: np.concatenate([t[c] for t in parts]) for c in parts[0]}
    fleet_counts = np.array([scenario.stages[n].nodes.count for n in names], float)
    per_node = cols["node"] >= 0
    tot = ~per_node
    key = np.stack([cols["time_ms"][tot], cols["stage"][tot].astype(float)])
    uniq, inv = np.unique(key, axis=1, return_inverse=True)
    inv = inv.ravel()
    merged_tot = {}
    for c, v in cols.items():
        vals = v[tot]
        if c == "time_ms":
            merged_tot[c] = uniq[0]
        elif c == "stage":
            merged_tot[c] = uniq[1].astype(np.int32)
        elif c == "node":
            merged_tot[c] = np.full(uniq.shape[1], -1, np.int32)
        else:
            s = np.zeros(uniq.shape[1])
            np.add.at(s, inv, vals.astype(float))
            if c == "busy_fraction":
                s = s / fleet_counts[uniq[1].astype(int)]
            merged_tot[c] = s.astype(v.dtype)
    out = {c: np.concatenate([v[per_node], merged_tot[c]]) for c, v in cols.items()}
    order = np.lexsort((out["node"], out["node"] < 0, out["stage"], out["time_ms"]))
    return {c: v[order] for c, v in out.items()}


def simulate_sharded(scenario: sc.Scenario, shards: int, executor: str = "local",
                     workers: int | None = None, ray_address: str | None = None,
                     progress=None):
    """Run the fleet as `shards` independent sub-clusters on the executor and merge them
    into one Results (as `simulate` gives), its summary saying how it was split."""
    from .executors import execute
    from .results import replication_metrics, summarise
    p = plan(scenario, shards)
    data = scenario.model_dump(mode="json")
    R = scenario.run.replications
    tasks = [(data, shards, k, r) for r in range(R) for k in range(shards)]
    done: dict[int, Replication] = {}
    merged: list[Replication | None] = [None] * R
    per_rep: list[dict | None] = [None] * R

    def finish(i: int, rep: Replication) -> None:
        done[i] = rep
        r = i // shards
        if all(r * shards + k in done for k in range(shards)):
            merged[r] = merge(scenario, p, [done.pop(r * shards + k) for k in range(shards)])
            per_rep[r] = replication_metrics(scenario, merged[r])
            if progress is not None:
                progress(sum(m is not None for m in merged), R)
    execute(run_shard, tasks, list(range(len(tasks))), finish, executor, workers, ray_address)
    results = summarise(scenario, merged, per_rep)
    results.summary["shards"] = p.as_dict()
    return results
