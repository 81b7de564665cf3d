"""A real serving testbed: one device serves a torch GR ranking model to an open-loop workload.

This is what simrec's fidelity is measured against (DESIGN.md, "Fidelity"). One worker
executes jobs strictly in arrival order (FIFO) on one GPU (or the CPU). Arrivals come from
a schedule computed before the run (Poisson, seeded); when the queue is empty the worker
sleeps until the next arrival, so the device really idles between jobs. Users are
Zipf-popular; each user has one history length, padded to a bucket of the cost table's
grid; every request ranks the same number M of candidates.

Policies:

- ``full``: each ranking request runs ``full_forward(L, M)``.
- ``relay``: a request's pre-infer signal arrives ``lead_ms`` before its ranking request.
  For L >= the threshold it computes the user's prefix K/V (``encode_prefix``) into an
  HBM cache bounded in bytes with LRU eviction, unless that user's prefix is already
  there (resident or being computed: then the signal only pins it). A ranking request
  whose user's prefix is ready runs only ``rank_cached``.

The cache semantics are simrec's own (``simulator/prefix_cache.py``, used here as is, and
``simulator/relay.py``, mirrored line for line for a length trigger, a FIFO queue, no DRAM
tier): an entry is pinned from its pre-infer admission until that request's ranking
starts; admission is refused if the unpinned bytes cannot make room; unpinned entries are
evicted in LRU order; a pending pre-infer whose ranking started first is cancelled. The
cache holds the real K/V tensors, so the memory they take is really taken.

Arrivals are admitted between jobs (a single-threaded server): when the worker becomes
free at time t (a job's end, or the arrival it slept until), it admits exactly the arrivals
up to t, then starts the next job; later ones wait for the next job boundary. That is the
simulator's order of decisions: a job's cache decision sees the signals that arrived before
its ideal start max(arrival, previous end), and no later ones. Admitting a signal late
changes nothing else: the only cache change at the end of a job is a pre-infer fill, and
the entry being filled is pinned, so it takes no part in an eviction meanwhile.

Timing uses the host clock (``time.perf_counter``); the device is synchronised after every
job. Per job the log holds: kind (rank / pre), request id, user, L, M, arrival, start, end
(ms since the run's time zero), ``service_ms`` = end - start, ``overhead_ms`` = start -
max(arrival, previous job's end) (host time between the worker becoming free for the job
and starting it: arrival bookkeeping, loop, wake-up lateness), ``latency_ms`` = end -
arrival (ranking jobs), the cache outcome and the phase that ran. Pre-infer signals that
made no job (``skipped``: prefix already cached; ``rejected``: no room) are logged as
``pre`` rows without times.

Each run folder is a serving log (calibration/FORMAT.md, "Serving-log format"):
``jobs.parquet`` (the documented columns plus ``phase``; a cancelled pre-infer job, one whose
prefix was dropped before it ran, keeps its start and end) and ``run.yaml`` (device, table,
policy, lead_ms, warmup_s; ``meta``: configuration, plan, cache counters, summary). simrec
derives the scenario of the same system from the log (``simrec.fidelity.scenario_dict``).

Runs with torch, numpy, pandas, pyarrow and pyyaml alone (no simrec, no pydantic), so it
works on a bare GPU machine from the repository root::

    python -m calibration.testbed --table /tmp/h100_testbed --out /tmp/runs --policy full \\
        --loads 0.3,0.6,0.85 --requests 24000,30000,45000
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import tarfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from .gr_models import GRModel, GRSpec, Phases, build_model

POLICIES = ("full", "relay")
RANK, PRE = 0, 1
KINDS = {RANK: "rank", PRE: "pre"}
# Job outcomes (jobs.parquet `outcome`).
NONE, HIT, MISS, PENDING, COMPUTED, CANCELLED, SKIPPED, REJECTED = range(8)
OUTCOMES = {NONE: "none", HIT: "hit", MISS: "miss", PENDING: "pending", COMPUTED: "computed",
            CANCELLED: "cancelled", SKIPPED: "skipped", REJECTED: "rejected"}
PHASES = {0: "", 1: "full_forward", 2: "rank_cached", 3: "prefix_encode"}
P_NONE, P_FULL, P_RANK, P_ENCODE = 0, 1, 2, 3
SPIN_MS = 1.0            # the last stretch of an idle wait is spun, not slept (wake-up accuracy)


def _prefix_cache_class():
    """simrec's PrefixCache: from the installed package, or by file path where simrec (and
    its pydantic) cannot be imported, e.g. on a bare GPU machine."""
    try:
        from simrec.prefix_cache import PrefixCache
        return PrefixCache
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "simulator" / "prefix_cache.py"
        spec = importlib.util.spec_from_file_location("_simrec_prefix_cache", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod      # dataclasses look the module up while building
        spec.loader.exec_module(mod)
        return mod.PrefixCache


PrefixCache = _prefix_cache_class()


class KVCache(PrefixCache):
    """simrec's prefix cache that also holds each ready entry's K/V tensor and frees it the
    moment the cache drops the entry (O(1) per eviction, no scan over the cached users)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.kv: dict[int, torch.Tensor] = {}

    def _drop(self, user: int, expired: bool) -> None:
        super()._drop(user, expired)
        self.kv.pop(user, None)

    def discard(self, user: int) -> None:
        super().discard(user)
        self.kv.pop(user, None)


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Workload:
    """The offered load. Users, their lengths and the unit-rate arrival gaps depend on the
    seed alone, so runs at different rates with one seed see the same requests, time-scaled."""

    rate_qps: float
    requests: int
    users: int = 50_000
    zipf_s: float = 1.2
    history_lens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    length_weights: tuple[float, ...] = (0.35, 0.3, 0.2, 0.15)
    candidates: int = 128
    lead_ms: float = 20.0
    seed: int = 0

    def __post_init__(self):
        if self.rate_qps <= 0 or self.requests <= 0 or self.users <= 0:
            raise ValueError(f"rate_qps, requests and users must be > 0: {self}")
        if len(self.history_lens) != len(self.length_weights) or min(self.length_weights) < 0:
            raise ValueError("need one non-negative weight per history length")
        if self.lead_ms <= 0 or self.candidates <= 0 or self.zipf_s < 0:
            raise ValueError(f"lead_ms and candidates must be > 0, zipf_s >= 0: {self}")


@dataclass(frozen=True)
class Policy:
    kind: str = "full"
    min_history_len: int = 4096          # relay: pre-infer requests with L >= this
    cache_bytes: int = 16 * 2**30        # relay: HBM prefix cache bound

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES} (got {self.kind!r})")
        if self.min_history_len <= 0 or self.cache_bytes <= 0:
            raise ValueError(f"min_history_len and cache_bytes must be > 0: {self}")


def schedule(w: Workload) -> pd.DataFrame:
    """The requests of one run: arrival_ms (pre-infer signal), user_id, history_len, candidates."""
    seq = np.random.SeedSequence(w.seed)
    r_len, r_gap, r_user = (np.random.default_rng(s) for s in seq.spawn(3))
    weights = np.asarray(w.length_weights, float)
    user_len = r_len.choice(np.asarray(w.history_lens, np.int64), size=w.users, p=weights / weights.sum())
    ranks = np.arange(1, w.users + 1, dtype=float)
    cdf = np.cumsum(ranks ** -w.zipf_s)
    cdf /= cdf[-1]
    users = np.minimum(np.searchsorted(cdf, r_user.uniform(0, 1, w.requests), side="right"), w.users - 1)
    arrival = np.cumsum(r_gap.standard_exponential(w.requests)) * (1000.0 / w.rate_qps)
    return pd.DataFrame({"arrival_ms": arrival, "user_id": users.astype(np.int64),
                         "history_len": user_len[users], "candidates": np.full(w.requests, w.candidates,
                                                                              np.int64)})


# ----------------------------------------------------------------------------- the model server

class Server:
    """The model and its pre-allocated inputs; one call = one job, device synchronised."""

    def __init__(self, spec: GRSpec, device: torch.device, history_lens, candidates: int,
                 sets: int = 4, seed: int = 0, graphs: bool = False):
        self.spec, self.device = spec, device
        self.model: GRModel = build_model(spec, device, seed)
        self.phases = Phases(self.model, graphs)
        g = torch.Generator(device="cpu").manual_seed(seed + 1)

        def tokens(t):
            return torch.randn(1, t, spec.d_model, generator=g).to(device=device, dtype=spec.torch_dtype)

        self.sets = sets
        self.hist = {int(L): [tokens(int(L)) for _ in range(sets)] for L in history_lens}
        self.short = [tokens(spec.short_term_tokens) for _ in range(sets)]
        self.cand = [tokens(candidates) for _ in range(sets)]
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def full(self, user: int, L: int) -> None:
        k = user % self.sets
        self.phases.full(self.hist[L][k], self.short[k], self.cand[k])

    def encode(self, user: int, L: int) -> torch.Tensor:
        return self.phases.encode(self.hist[L][user % self.sets])

    def rank(self, kv: torch.Tensor, user: int) -> None:
        k = user % self.sets
        self.phases.rank(kv, self.short[k], self.cand[k])

    def warm_up(self, calls: int = 10) -> float:
        """Run every shape a few times (kernel selection, allocator, caches). Returns seconds."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for L in self.hist:
                for i in range(calls):
                    self.full(i, L)
                    kv = self.encode(i, L)
                    self.rank(kv, i)
                    self.sync()
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- one run

@dataclass
class RunResult:
    jobs: pd.DataFrame
    trace: pd.DataFrame
    info: dict = field(default_factory=dict)


class _Log:
    """Preallocated per-job columns (no per-job Python objects kept: GC stays quiet)."""

    def __init__(self, cap: int):
        self.n = 0
        self.kind = np.zeros(cap, np.int8)
        self.rid = np.zeros(cap, np.int64)
        self.arrival = np.zeros(cap)
        self.start = np.full(cap, np.nan)
        self.end = np.full(cap, np.nan)
        self.overhead = np.full(cap, np.nan)
        self.outcome = np.zeros(cap, np.int8)
        self.phase = np.zeros(cap, np.int8)

    def add(self, kind, rid, arrival, start, end, overhead, outcome, phase) -> None:
        i = self.n
        self.kind[i], self.rid[i], self.arrival[i] = kind, rid, arrival
        self.start[i], self.end[i], self.overhead[i] = start, end, overhead
        self.outcome[i], self.phase[i] = outcome, phase
        self.n = i + 1


def serve(server: Server, sched: pd.DataFrame, policy: Policy, lead_ms: float,
          start_delay_ms: float = 20.0) -> RunResult:
    """Serve one precomputed schedule in real time. Returns the job log."""
    n = len(sched)
    sig_t = sched["arrival_ms"].to_numpy(float)
    rank_t = sig_t + lead_ms
    users = sched["user_id"].to_numpy(np.int64).tolist()
    lens = sched["history_len"].to_numpy(np.int64).tolist()
    relay = policy.kind == "relay"
    if relay:
        t = np.concatenate([sig_t, rank_t])
        kind = np.concatenate([np.full(n, PRE, np.int8), np.full(n, RANK, np.int8)])
        rid = np.concatenate([np.arange(n), np.arange(n)])
        order = np.lexsort((rid, -kind, t))        # by time; a signal before a ranking on ties
        ev_t, ev_kind, ev_rid = t[order].tolist(), kind[order].tolist(), rid[order].tolist()
    else:
        ev_t, ev_kind, ev_rid = rank_t.tolist(), [RANK] * n, list(range(n))
    n_ev = len(ev_t)
    log = _Log(2 * n)
    spec = server.spec
    kvpt = spec.kv_bytes_per_token
    cache = KVCache(policy.cache_bytes)
    kv = cache.kv
    pinned = np.zeros(n, bool)
    queue: deque = deque()
    clock = time.perf_counter
    sleep = time.sleep
    sync = server.sync

    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            sync()
            t0 = clock() + start_delay_ms / 1000.0
            prev_end = 0.0
            free = 0.0     # the worker is free since `free`; arrivals up to then are admitted
            i = 0
            while True:
                while i < n_ev and ev_t[i] <= free:                # arrivals by then
                    r = ev_rid[i]
                    if ev_kind[i] == RANK:
                        queue.append((RANK, r, ev_t[i]))
                    else:                                          # relay.Relay.signal
                        user, L = users[r], lens[r]
                        entry = cache.entries.get(user)
                        if entry is not None:
                            if entry.pins == 0:
                                cache.pinned += entry.nbytes
                            entry.pins += 1
                            pinned[r] = True
                            log.add(PRE, r, ev_t[i], math.nan, math.nan, math.nan, SKIPPED, P_NONE)
                        elif L >= policy.min_history_len:
                            if cache.reserve(user, L * kvpt, ev_t[i]) is None:
                                log.add(PRE, r, ev_t[i], math.nan, math.nan, math.nan, REJECTED, P_NONE)
                            else:
                                pinned[r] = True
                                queue.append((PRE, r, ev_t[i]))
                    i += 1
                if not queue:
                    if i >= n_ev:
                        break
                    free = ev_t[i]
                    rest = free - (clock() - t0) * 1000.0
                    if rest > SPIN_MS + 0.5:
                        sleep((rest - SPIN_MS) / 1000.0)
                    while (clock() - t0) * 1000.0 < free:
                        pass
                    continue
                jkind, r, arr = queue.popleft()
                start = (clock() - t0) * 1000.0
                user, L = users[r], lens[r]
                if jkind == RANK:
                    if not relay:
                        server.full(user, L)
                        outcome, phase = NONE, P_FULL
                    else:                                          # relay.Relay.rank_cost
                        if pinned[r]:
                            pinned[r] = False
                            if user in cache.entries:
                                cache.unpin(user)
                        entry = cache.entries.get(user)
                        if entry is not None and not entry.ready:
                            if entry.pins == 0:
                                cache.discard(user)
                            cache.counters.misses += 1
                            server.full(user, L)
                            outcome, phase = PENDING, P_FULL
                        elif cache.lookup(user, start) is not None:
                            cache.counters.hits += 1
                            server.rank(kv[user], user)
                            outcome, phase = HIT, P_RANK
                        else:
                            cache.counters.misses += 1
                            server.full(user, L)
                            outcome, phase = MISS, P_FULL
                    sync()
                else:                                              # relay.Relay.pre_cost / pre_done
                    entry = cache.entries.get(user)
                    if entry is None or entry.ready:
                        outcome, phase = CANCELLED, P_NONE
                    else:
                        prefix = server.encode(user, L)
                        sync()
                        outcome, phase = COMPUTED, P_ENCODE
                end = (clock() - t0) * 1000.0
                if outcome == COMPUTED:
                    cache.fill(user, end)
                    entry.by_pre = True
                    kv[user] = prefix
                    prefix = None
                log.add(jkind, r, arr, start, end, start - max(arr, prev_end), outcome, phase)
                prev_end = free = end
    finally:
        gc.enable()
    wall_s = clock() - t0
    k = log.n
    frame = pd.DataFrame({
        "kind": pd.Categorical.from_codes(log.kind[:k], [KINDS[c] for c in sorted(KINDS)]),
        "request_id": log.rid[:k],
        "user_id": sched["user_id"].to_numpy()[log.rid[:k]],
        "history_len": sched["history_len"].to_numpy()[log.rid[:k]],
        "candidates": sched["candidates"].to_numpy()[log.rid[:k]],
        "arrival_ms": log.arrival[:k], "start_ms": log.start[:k], "end_ms": log.end[:k],
        "service_ms": log.end[:k] - log.start[:k], "overhead_ms": log.overhead[:k],
        "latency_ms": np.where(log.kind[:k] == RANK, log.end[:k] - log.arrival[:k], np.nan),
        "outcome": pd.Categorical.from_codes(log.outcome[:k], [OUTCOMES[c] for c in sorted(OUTCOMES)]),
        "phase": pd.Categorical.from_codes(log.phase[:k], [PHASES[c] for c in sorted(PHASES)]),
    })
    c = cache.counters
    info = {"wall_s": round(wall_s, 3), "jobs": int((~np.isnan(log.start[:k])).sum()),
            "cache": {"hits": c.hits, "misses": c.misses, "evictions": c.evictions,
                      "evicted_bytes": c.evicted_bytes, "admitted": c.admitted, "rejected": c.rejected,
                      "used_bytes_at_end": cache.used, "entries_at_end": len(cache.entries)}}
    if server.cuda:
        info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(server.device) / 2**30, 3)
    kv.clear()
    cache.entries.clear()
    return RunResult(frame, sched, info)


def run_summary(jobs: pd.DataFrame, warmup_frac: float = 0.1) -> dict:
    """A few figures of one run, for logs (the fidelity command does the real comparison)."""
    ran = jobs[jobs["start_ms"].notna()]
    rank = jobs[jobs["kind"] == "rank"].sort_values("request_id")
    cut = rank["request_id"].max() * warmup_frac if len(rank) else 0
    lat = rank.loc[rank["request_id"] >= cut, "latency_ms"].to_numpy()
    span = ran["end_ms"].max() - ran["arrival_ms"].min() if len(ran) else math.nan
    busy = (ran["service_ms"] + ran["overhead_ms"]).sum()
    q = np.percentile(lat, [50, 90, 99]) if len(lat) else [math.nan] * 3
    out = {"requests": int(len(rank)), "jobs_run": int(len(ran)),
           "utilisation": round(float(busy / span), 4) if span else math.nan,
           "busy_ms_per_request": round(float(busy / max(len(rank), 1)), 4),
           "latency_ms": {"p50": round(float(q[0]), 4), "p90": round(float(q[1]), 4),
                          "p99": round(float(q[2]), 4), "mean": round(float(np.mean(lat)), 4)},
           "overhead_ms": {"mean": round(float(ran["overhead_ms"].mean()), 5),
                           "p99": round(float(ran["overhead_ms"].quantile(0.99)), 5)},
           "outcomes": {f"{k}/{o}": int(v) for (k, o), v in
                        jobs.groupby(["kind", "outcome"], observed=True).size().items()}}
    return out


# ----------------------------------------------------------------------------- scenario file

LOG_COLUMNS = ("kind", "request_id", "user_id", "history_len", "candidates", "arrival_ms", "start_ms", "end_ms",
               "outcome", "phase")


def log_jobs(jobs: pd.DataFrame) -> pd.DataFrame:
    """The job log in the serving-log format (calibration/FORMAT.md): the documented columns
    plus `phase`; a ranking that found its prefix still pending ran the full pass: `miss`."""
    out = jobs[list(LOG_COLUMNS)].copy()
    for c in ("kind", "outcome", "phase"):
        out[c] = out[c].astype(str)
    out.loc[(out["kind"] == "rank") & (out["outcome"] == "pending"), "outcome"] = "miss"
    return out


def write_run(result: RunResult, folder: Path, name: str, workload: Workload, policy: Policy,
              table_dir: Path, manifest: dict, device: torch.device, extra: dict,
              warmup_frac: float = 0.1) -> Path:
    """Write a serving log (jobs.parquet + run.yaml, FORMAT.md) into folder/name; run.yaml's
    `meta` holds the testbed's configuration, plan, cache counters and summary."""
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    write_jobs(log_jobs(result.jobs), out / "jobs.parquet")
    arrivals = result.trace["arrival_ms"].to_numpy()
    warmup_s = float(arrivals[int(len(arrivals) * warmup_frac)]) / 1000.0 if len(arrivals) else 0.0
    table_ref = os.path.relpath(Path(table_dir).resolve(), out.resolve())
    pol = {"kind": policy.kind}
    if policy.kind == "relay":
        pol.update(min_history_len=int(policy.min_history_len), cache_bytes=int(policy.cache_bytes),
                   pin="until_ranked")
    meta = {"name": name, "workload": asdict(workload),
            "table": {"name": manifest.get("name"), "sha256": manifest.get("sha256")},
            "model": manifest.get("model"),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                         "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "summary": run_summary(result.jobs, warmup_frac), **result.info, **extra}
    run = {"device": _device_name(device), "table": table_ref, "policy": pol,
           "lead_ms": float(workload.lead_ms), "warmup_s": warmup_s,
           "meta": json.loads(json.dumps(meta, default=float))}
    (out / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    return out


def write_jobs(jobs: pd.DataFrame, path: Path) -> None:
    """Encodings chosen for size (a long run must fit the device's 16 MiB per returned file):
    times byte-stream-split, ids delta-coded, the small code columns dictionary-coded; zstd."""
    jobs.to_parquet(
        path, index=False, compression="zstd", use_dictionary=["kind", "outcome", "phase"],
        use_byte_stream_split=["arrival_ms", "start_ms", "end_ms"],
        column_encoding={"request_id": "DELTA_BINARY_PACKED", "user_id": "DELTA_BINARY_PACKED",
                         "history_len": "DELTA_BINARY_PACKED", "candidates": "DELTA_BINARY_PACKED"})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


# ----------------------------------------------------------------------------- series of runs

def load_manifest(table_dir: Path) -> dict:
    path = Path(table_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no cost table at {table_dir} (manifest.json missing)")
    return json.loads(path.read_text())


def spec_from_manifest(manifest: dict) -> GRSpec:
    m = manifest["model"]
    return GRSpec(arch=m["arch"], layers=m["layers"], d_model=m["d_model"], heads=m["heads"],
                  ffn=m["ffn"], dtype=m["dtype"], short_term_tokens=m["short_term_tokens"])


def table_medians(table_dir: Path, manifest: dict) -> dict[tuple[str, int, int], float]:
    """Isolated medians (ms) of the table, keyed (phase, L, M)."""
    t = pd.read_parquet(Path(table_dir) / manifest["table_file"])
    t = t[(t["condition"] == "isolated") & (t["quantile"] == 0.5)]
    return {(r.phase, int(r.history_len), int(r.candidates)): float(r.time_ms) for r in t.itertuples()}


def table_work_ms(sched: pd.DataFrame, policy: Policy, med: dict) -> float:
    """Device work per request from the table medians (relay: as if nothing were ever reused)."""
    M = int(sched["candidates"].iloc[0])
    L = sched["history_len"].to_numpy()
    full = np.array([med[("full_forward", int(x), M)] for x in L])
    if policy.kind == "full":
        return float(full.mean())
    pre = np.array([med[("prefix_encode", int(x), 0)] + med[("rank_cached", int(x), M)] for x in L])
    return float(np.where(L >= policy.min_history_len, pre, full).mean())


def job_mix(sched: pd.DataFrame, policy: Policy, kvpt: int) -> pd.DataFrame:
    """Expected jobs per request, by (phase, L), from an offline pass of the cache over the
    schedule (LRU by bytes, in request order, no timing or pins): for planning rates only."""
    counts: dict[tuple[str, int], int] = {}

    def add(phase, L):
        counts[(phase, L)] = counts.get((phase, L), 0) + 1
    cache: dict[int, int] = {}
    used = 0
    for user, L in zip(sched["user_id"].tolist(), sched["history_len"].tolist()):
        if policy.kind == "full":
            add("full_forward", L)
        elif user in cache:
            cache[user] = cache.pop(user)          # refresh (dicts keep insertion order)
            add("rank_cached", L)
        elif L >= policy.min_history_len and L * kvpt <= policy.cache_bytes:
            while used + L * kvpt > policy.cache_bytes:
                old = next(iter(cache))
                used -= cache.pop(old)
            cache[user] = L * kvpt
            used += L * kvpt
            add("prefix_encode", L)
            add("rank_cached", L)
        else:
            add("full_forward", L)
    n = len(sched)
    return pd.DataFrame([(p, L, c / n) for (p, L), c in counts.items()], columns=["phase", "L", "per_request"])


def planned_work_ms(sched: pd.DataFrame, policy: Policy, kvpt: int, pilot_jobs: pd.DataFrame,
                    med: dict) -> float:
    """Busy ms per request: the expected job mix x the pilot's mean busy time per (phase, L)
    (a (phase, L) the pilot never ran: its table median x the pilot's overall ratio)."""
    ran = pilot_jobs[pilot_jobs["start_ms"].notna() & (pilot_jobs["phase"].astype(str) != "")]
    busy = (ran["service_ms"] + ran["overhead_ms"]).groupby(
        [ran["phase"].astype(str), ran["history_len"]]).mean().to_dict()
    M = int(sched["candidates"].iloc[0])
    key = [(p, 0 if p == "prefix_encode" else M) for p in ran["phase"].astype(str)]
    medians = np.array([med[(p, int(L), m)] for (p, m), L in zip(key, ran["history_len"])])
    ratio = float((ran["service_ms"] + ran["overhead_ms"]).sum() / medians.sum()) if len(ran) else 1.0
    total = 0.0
    for r in job_mix(sched, policy, kvpt).itertuples():
        t = busy.get((r.phase, r.L))
        if t is None:
            t = ratio * med[(r.phase, r.L, 0 if r.phase == "prefix_encode" else M)]
        total += r.per_request * t
    return total


def check_grid(workload: Workload, manifest: dict) -> None:
    grid = manifest.get("grid", {})
    missing = [L for L in workload.history_lens if L not in grid.get("history_len", [])]
    if missing or workload.candidates not in grid.get("candidates", []):
        raise ValueError(f"the testbed's shapes must be grid points of the table: history_lens "
                         f"{list(workload.history_lens)} / candidates {workload.candidates} vs grid {grid}")


def run_series(table_dir: Path, out: Path, policy: Policy | list[Policy], loads: list[float], requests: list[int],
               base: Workload, device: str | None = None, rates: list[float] | None = None,
               pilot_s: float = 4.0, pilot_load: float = 0.5, deadline: float | None = None,
               min_requests: int = 5000, tags: list[str] | None = None,
               pack_to: Path | None = None, warmup_frac: float = 0.1,
               seconds: list[float] | None = None, keep_pilot: bool = False, log=print) -> list[Path]:
    """Serve one run per load (utilisation target) with one model instance.

    `policy` is one policy for all runs, or one per run (e.g. the same relay policy with
    another cache size). Arrival rates: given (`rates`), or load / (busy time per request)
    where the busy time per request is measured by a short open-loop pilot of the first
    run's policy at `pilot_load` of the table's estimate. With a `deadline` (time.time()
    seconds) run lengths are scaled down, not below `min_requests`, so that the series ends
    before it. With `seconds` (one per load) a run's request count is its rate x its seconds
    instead of `requests`. With `keep_pilot` the pilot is written (and packed) as a run
    named pilot_<first run>: a short serving trace of this machine.
    """
    policies = list(policy) if isinstance(policy, (list, tuple)) else [policy] * len(loads)
    if len(policies) != len(loads) or len(requests) != len(loads) or (rates and len(rates) != len(loads)):
        raise ValueError("need one policy (or one for all), one request count and one rate per load")
    policy = policies[0]
    table_dir = Path(table_dir)
    manifest = load_manifest(table_dir)
    check_grid(base, manifest)
    spec = spec_from_manifest(manifest)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    graphs = bool(manifest["model"].get("cuda_graphs", False))
    server = Server(spec, dev, base.history_lens, base.candidates,
                    seed=manifest.get("method", {}).get("seed", 0), graphs=graphs)
    log(f"testbed: {policy.kind} on {_device_name(dev)}; model {spec}, cuda graphs {graphs}; warm-up "
        f"{server.warm_up():.1f}s")
    plan: dict = {"policies": [asdict(p) for p in policies], "loads": list(loads)}
    if rates is None:
        med = table_medians(table_dir, manifest)
        probe = replace(base, rate_qps=1.0, requests=20_000, seed=base.seed)
        est = table_work_ms(schedule(probe), policy, med)
        rate = pilot_load / est * 1000.0
        n_pilot = max(200, int(pilot_s * rate))
        w_pilot = replace(base, rate_qps=rate, requests=n_pilot, seed=base.seed + 999)
        pilot = serve(server, schedule(w_pilot), policy, base.lead_ms)
        s = run_summary(pilot.jobs)
        if keep_pilot:      # a short serving trace of this machine, kept like a run
            name = "pilot_" + run_name(policy, loads[0], tags[0] if tags else "")
            path = write_run(pilot, out, name, w_pilot, policy, table_dir, manifest, dev,
                             {"target_load": pilot_load, "pilot": True}, warmup_frac)
            if pack_to is not None:
                pack(path, Path(pack_to) / f"{name}.tar.gz")
        busy = s["busy_ms_per_request"]
        rates, work = [], []
        for load, n, pol in zip(loads, requests, policies):
            w = planned_work_ms(schedule(replace(base, rate_qps=1.0, requests=n)), pol,
                                spec.kv_bytes_per_token, pilot.jobs, med)
            work.append(round(w, 4))
            rates.append(load / w * 1000.0)
        plan["pilot"] = {"table_work_ms_per_request": round(est, 4), "rate_qps": round(rate, 2),
                         "requests": n_pilot, "summary": s, "planned_work_ms_per_request": work}
        log(f"pilot: table estimate {est:.3f} ms/request; {n_pilot} requests at {rate:.1f}/s -> "
            f"{busy:.3f} ms busy/request (x{busy / est:.2f}), utilisation {s['utilisation']:.3f}; "
            f"planned work per request (steady-state job mix) {work} ms")
    plan["rates_qps"] = [round(r, 3) for r in rates]
    if seconds is not None:
        requests = [max(1, int(s * r)) for s, r in zip(seconds, rates)]
    if deadline is not None:
        left = deadline - time.time() - 5.0 - 3.0 * len(loads)   # write/pack margin per run
        need = sum(n / r + base.lead_ms / 1000 for n, r in zip(requests, rates))
        if need > left:
            scale = max(left, 0) / need
            requests = [max(min_requests, int(n * scale)) for n in requests]
            log(f"deadline: {need:.0f}s of arrivals planned but {left:.0f}s left: requests -> {requests}")
    plan["requests"] = list(requests)
    log(f"plan: {json.dumps(plan['rates_qps'])} req/s, {requests} requests")
    written = []
    for k, (load, rate, n, policy) in enumerate(zip(loads, rates, requests, policies)):
        w = replace(base, rate_qps=rate, requests=n)
        name = run_name(policy, load, tags[k] if tags else "")
        t0 = time.time()
        result = serve(server, schedule(w), policy, w.lead_ms)
        path = write_run(result, out, name, w, policy, table_dir, manifest, dev,
                         {"target_load": load, "plan": plan}, warmup_frac)
        s = run_summary(result.jobs, warmup_frac)
        log(f"{name}: {n} requests at {rate:.1f}/s in {time.time() - t0:.1f}s; utilisation "
            f"{s['utilisation']:.3f}; latency p50 {s['latency_ms']['p50']:.3f} p99 {s['latency_ms']['p99']:.3f} "
            f"ms; overhead mean {s['overhead_ms']['mean'] * 1000:.1f} us; {s['outcomes']}")
        if pack_to is not None:
            pack(path, Path(pack_to) / f"{name}.tar.gz")
        written.append(path)
        del result
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return written


def run_name(policy: Policy, load: float, tag: str = "") -> str:
    return f"{policy.kind}_u{int(round(load * 100)):02d}{tag}"


def pack(folder: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- CLI

def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calibration.testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, required=True, help="cost table folder (the model is read from it)")
    p.add_argument("--out", type=Path, required=True, help="folder that receives one folder per run")
    p.add_argument("--policy", default="full",
                   help=f"one of {', '.join(POLICIES)}; or one per load, comma-separated")
    p.add_argument("--loads", type=_floats, default=[0.3, 0.6, 0.85],
                   help="target utilisations, one run each")
    p.add_argument("--requests", type=_ints, default=None, help="requests per run (one, or one per load)")
    p.add_argument("--seconds", type=_floats, default=None,
                   help="instead of --requests: seconds of arrivals per run (one, or one per load)")
    p.add_argument("--rates", type=_floats, default=None, help="arrival rates (req/s) instead of a pilot")
    p.add_argument("--tags", default=None, help="comma-separated suffixes of the run names")
    p.add_argument("--device", default=None)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--history-lens", type=_ints, default=[1024, 2048, 4096, 8192])
    p.add_argument("--length-weights", type=_floats, default=[0.35, 0.3, 0.2, 0.15])
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--lead-ms", type=float, default=20.0)
    p.add_argument("--threshold", type=int, default=4096, help="relay: min history length to pre-infer")
    p.add_argument("--cache-mib", type=_floats, default=[16384.0],
                   help="relay: HBM prefix cache (MiB), one value or one per load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot-s", type=float, default=4.0)
    p.add_argument("--keep-pilot", action="store_true", help="write the pilot as a run (pilot_<first run>)")
    p.add_argument("--deadline", type=float, default=None, help="unix time by which the series must end")
    p.add_argument("--min-requests", type=int, default=5000)
    p.add_argument("--pack-to", type=Path, default=None, help="also write <run>.tar.gz here after each run")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    requests = a.requests or [30_000]
    seconds = a.seconds
    if seconds is not None:
        seconds = seconds * len(a.loads) if len(seconds) == 1 else seconds
        if len(seconds) != len(a.loads):
            raise SystemExit("--seconds needs one value, or one per load")
    if len(requests) == 1:
        requests = requests * len(a.loads)
    if len(requests) != len(a.loads) or (a.rates and len(a.rates) != len(a.loads)):
        raise SystemExit("--requests and --rates need one value, or one per load")
    tags = a.tags.split(",") if a.tags else None
    if tags and len(tags) != len(a.loads):
        raise SystemExit("--tags needs one value per load")
    base = Workload(rate_qps=1.0, requests=1, users=a.users, zipf_s=a.zipf,
                    history_lens=tuple(a.history_lens), length_weights=tuple(a.length_weights),
                    candidates=a.candidates, lead_ms=a.lead_ms, seed=a.seed)
    caches = a.cache_mib * len(a.loads) if len(a.cache_mib) == 1 else a.cache_mib
    if len(caches) != len(a.loads):
        raise SystemExit("--cache-mib needs one value, or one per load")
    kinds = a.policy.split(",")
    kinds = kinds * len(a.loads) if len(kinds) == 1 else kinds
    if len(kinds) != len(a.loads):
        raise SystemExit("--policy needs one value, or one per load")
    policies = [Policy(k, a.threshold, int(c * 2**20)) for k, c in zip(kinds, caches)]
    run_series(a.table, a.out, policies, a.loads, requests, base, a.device, a.rates, a.pilot_s,
               deadline=a.deadline, min_requests=a.min_requests, tags=tags, pack_to=a.pack_to,
               seconds=seconds, keep_pilot=a.keep_pilot, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
