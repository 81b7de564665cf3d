"""Fidelity: simrec's error against a real serving testbed (DESIGN.md, "Fidelity").

A testbed run (``calibration/testbed.py``) leaves a folder with the job log
(``jobs.parquet``), the requests (``trace.parquet``) and a scenario that describes the same
system (``scenario.yaml``, costed from the table calibrated right before the run). Here
each run's scenario is simulated with several sources of ranking service times, and the
simulated ranking sojourn (wait + service) is compared with the measured ranking latency:

- ``replay``: every job takes exactly the worker time it took on the testbed
  (``service_ms + overhead_ms``), looked up by (job kind, request id). Only the queueing
  logic (FIFO order, relay cache decisions) is left to the simulator, so the simulated
  latencies should equal the measured ones; a relay job whose simulated outcome differs
  from the testbed's is counted.
- ``replay_kernel``: the same with ``service_ms`` alone (issue to device completion), i.e.
  without the host's per-job overhead: how much that overhead matters.
- ``table``: the scenario as written: draws from the calibrated table (isolated).
- ``table_idle``: the table's ``idle_gap`` curves for jobs that start after the device
  idled (>= ``IDLE_MS``), its ``isolated`` curves otherwise. No serving data used.
- ``ratio_iid``: table median x a ratio drawn i.i.d. from one run's measured / median
  ratios (per phase): the plain "multiplicative noise" correction, as a baseline.
- ``additive_iid``: table median + an excess drawn i.i.d. from one run's measured -
  median excesses (per phase): an in-serving per-job cost that does not grow with the
  work (launches, input copies, wake-up, the host's cache bookkeeping) plus noise
  (``Correction``). The main correction for GPU-bound (CUDA-graph) serving.
- ``additive_temporal``: the same with time-indexed excesses, so the fit run's slow
  periods keep their clustering in time (``Correction.draw``).
- ``additive_pilot``: an additive correction fitted, for each run, on the pilot the
  testbed served on the same machine right before it (``--keep-pilot``: a run folder
  flagged ``pilot`` in meta.json, matched by cost table): per machine, the way the table
  is. Its excess pools are per phase and idle bin (how long the device had idled when the
  job arrived: the GPU runs slower after idling), because a pilot runs at a lower load than
  the runs it corrects. Pilots are fit data only, never judged.
- ``levels_temporal``: max(the phase's in-serving host time, the table's isolated
  median) x time-indexed residuals: built for the launch-bound eager runs, whose host
  stalls came in clusters.

The corrections other than ``additive_pilot`` are fitted on ONE run and judged on the
others; the fitted run's rows are flagged in-sample.

Measured percentiles carry a 95% interval from a circular block bootstrap over
consecutive requests (latencies are autocorrelated). Simulated figures average the
per-replication estimates (replications differ only through service-time draws; the
trace is fixed).

The replay and correction sources swap the ranking stage's cost model for an object with
the same methods (``median``, ``phase``, ``sample``, ``prefix_bytes``) in every replication
through ``simulate``'s ``adjust`` hook; nothing in the scenario format changes.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import InputError
from .loader import load_scenario, with_overrides
from .folders import atomic_folder
from .scenario import Scenario
from .simulate import simulate

STAGE = "ranking"
SOURCES = ("replay", "replay_kernel", "table", "table_idle", "ratio_iid", "levels_temporal", "additive_iid",
           "additive_temporal", "additive_pilot")
CORRECTIONS = {"ratio_iid": dict(levels=False),
               "levels_temporal": dict(levels=True, temporal=True),
               "additive_iid": dict(levels=False, additive=True),
               "additive_temporal": dict(levels=False, additive=True, temporal=True),
               "additive_pilot": dict(levels=False, additive=True, idle=True)}
PER_MACHINE = ("additive_pilot",)      # fitted on each run's own pilot, not on one run
MAIN_SOURCES = ("replay", "table", "additive_iid", "additive_pilot", "additive_temporal")
METRICS = ("p50", "p90", "p99", "mean")
IDLE_MS = 0.5                          # table_idle: idle at least this long -> idle_gap curve
IDLE_EDGES_MS = (0.0, 0.5, 2.0, 10.0)  # idle-binned corrections: queued, <=0.5, <=2, <=10, longer
MIN_IDLE_POOL = 50


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One testbed run folder."""

    name: str
    folder: Path
    meta: dict
    jobs: pd.DataFrame
    trace: pd.DataFrame
    scenario: Scenario

    @property
    def policy(self) -> str:
        return self.meta["policy"]["kind"]

    @property
    def is_pilot(self) -> bool:
        return bool(self.meta.get("pilot"))

    @property
    def table_key(self) -> str:
        """Which calibration (hence which machine) the run belongs to."""
        t = self.meta.get("table", {})
        return str(t.get("sha256") or t.get("name"))

    def warm(self) -> np.ndarray:
        """Per request: past the warm-up cut (the cut the scenario gives the simulator)."""
        cut = (self.scenario.run.warmup_s or 0.0) * 1000.0
        return self.trace["arrival_ms"].to_numpy() >= cut

    def ranking(self) -> pd.DataFrame:
        """Ranking jobs, one row per request, in request order."""
        r = self.jobs[self.jobs["kind"] == "rank"].sort_values("request_id")
        if len(r) != len(self.trace) or (r["request_id"].to_numpy() != np.arange(len(self.trace))).any():
            raise InputError("jobs.parquet does not hold exactly one ranking job per request",
                             str(self.folder / "jobs.parquet"))
        return r.reset_index(drop=True)

    def ran(self) -> pd.DataFrame:
        """Jobs the worker executed, in execution order, with `idle_ms`: how long the device
        had been idle when the job arrived to it (0: it queued behind the previous job)."""
        j = self.jobs[self.jobs["start_ms"].notna()].sort_values("start_ms").reset_index(drop=True)
        prev_end = j["end_ms"].shift(1).to_numpy()
        idle = np.maximum(j["arrival_ms"].to_numpy() - prev_end, 0.0)
        idle[0] = np.inf
        return j.assign(idle_ms=idle, busy_ms=j["service_ms"] + j["overhead_ms"])


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders: the given folders, or their sub-folders that hold a jobs.parquet."""
    out = []
    for p in map(Path, paths):
        if (p / "jobs.parquet").exists():
            out.append(p)
        elif p.is_dir():
            out += sorted(d for d in p.iterdir() if (d / "jobs.parquet").exists())
        else:
            raise InputError("not a testbed run folder (no jobs.parquet)", str(p))
    if not out:
        raise InputError("no testbed run folders found (folders holding jobs.parquet)",
                         ", ".join(map(str, paths)) or None)
    return out


def load_run(folder: Path, table: str | None = None) -> Run:
    folder = Path(folder)
    for f in ("jobs.parquet", "trace.parquet", "scenario.yaml", "meta.json"):
        if not (folder / f).exists():
            raise InputError(f"testbed run is missing {f}", str(folder))
    scen = load_scenario(folder / "scenario.yaml")
    if table is not None:
        scen = with_overrides(scen, {f"stages.{STAGE}.service.table": str(Path(table).resolve())})
    trace = pd.read_parquet(folder / "trace.parquet")
    meta = json.loads((folder / "meta.json").read_text())
    jobs = with_derived_columns(pd.read_parquet(folder / "jobs.parquet"), trace, meta["workload"]["lead_ms"])
    for c in ("kind", "outcome", "phase"):
        jobs[c] = jobs[c].astype(str)
    return Run(folder.name, folder, meta, jobs, trace, scen)


def with_derived_columns(jobs: pd.DataFrame, trace: pd.DataFrame, lead_ms: float) -> pd.DataFrame:
    """Add back what the testbed does not store, computed exactly as the testbed computed
    it: the request's user, length and candidates (from the trace); arrival_ms (the signal
    time, + lead_ms for ranking jobs); service_ms = end - start; overhead_ms = start -
    max(arrival, the previous executed job's end); latency_ms = end - arrival (rank jobs).
    Columns an older run stores are kept as stored."""
    rid = jobs["request_id"].to_numpy()
    rank = jobs["kind"].astype(str).to_numpy() == "rank"
    out = jobs.copy()
    for c in ("user_id", "history_len", "candidates"):
        if c not in out:
            out[c] = trace[c].to_numpy()[rid]
    if "arrival_ms" not in out:
        sig = trace["arrival_ms"].to_numpy()
        out["arrival_ms"] = np.where(rank, (sig + lead_ms)[rid], sig[rid])
    start, end, arrival = (out[c].to_numpy() for c in ("start_ms", "end_ms", "arrival_ms"))
    if "service_ms" not in out:
        out["service_ms"] = end - start
    if "overhead_ms" not in out:
        ran = np.flatnonzero(~np.isnan(start))            # executed jobs, logged in order
        prev_end = np.concatenate([[0.0], end[ran][:-1]])
        overhead = np.full(len(out), np.nan)
        overhead[ran] = start[ran] - np.maximum(arrival[ran], prev_end)
        out["overhead_ms"] = overhead
    if "latency_ms" not in out:
        out["latency_ms"] = np.where(rank, end - arrival, np.nan)
    return out


# ----------------------------------------------------------------------------- statistics

def describe(x: np.ndarray) -> dict[str, float]:
    p = np.percentile(x, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "mean": float(np.mean(x))}


def block_length(x: np.ndarray) -> int:
    """Bootstrap block: at least sqrt(n), and 5x the lag where the autocorrelation of x
    first drops under 0.05 (so a block spans the busy periods that make the tail), at
    most n / 10."""
    n = len(x)
    y = x - x.mean()
    f = np.fft.rfft(y, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n]
    acf = acf / acf[0] if acf[0] > 0 else np.zeros(n)
    below = np.flatnonzero(acf < 0.05)
    lag = int(below[0]) if len(below) else n
    return int(min(max(math.ceil(math.sqrt(n)), 5 * lag), max(n // 10, 1)))


def block_bootstrap(x: np.ndarray, block: int, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of describe()'s figures under a circular block bootstrap."""
    n = len(x)
    rng = np.random.default_rng(seed)
    k = math.ceil(n / block)
    offs = np.arange(block)
    est = {m: np.empty(n_boot) for m in METRICS}
    for b in range(n_boot):
        idx = ((rng.integers(0, n, k)[:, None] + offs[None, :]) % n).ravel()[:n]
        d = describe(x[idx])
        for m in METRICS:
            est[m][b] = d[m]
    a = (1 - level) / 2
    return {m: (float(np.quantile(v, a)), float(np.quantile(v, 1 - a))) for m, v in est.items()}


# ----------------------------------------------------------------------------- cost swaps

class _Costs:
    """Stands in for the ranking stage's GRPhases; subclasses decide `phase`."""

    def __init__(self, base):
        self.base = base
        self.curves = base.curves
        self.kv_bytes_per_token = base.kv_bytes_per_token
        self.current: tuple[str, int] | None = None    # (job kind, request id), relay stages

    def median(self, name: str, L: int, M: int = 0) -> float:
        return self.base.median(name, L, M)

    def prefix_bytes(self, L: int) -> int:
        return self.base.prefix_bytes(L)

    def check(self, L, M) -> int:
        return self.base.check(L, M)

    def sample(self, L: int, M: int) -> float:
        return self.phase("full_forward", L, M)

    def phase(self, name: str, L: int, M: int = 0) -> float:
        raise NotImplementedError


class Replay(_Costs):
    """Measured job times by (kind, request id); without a relay, ranking jobs in request
    order (a one-node FIFO stage serves them in that order)."""

    def __init__(self, base, run: Run, column: str):
        super().__init__(base)
        j = run.jobs[run.jobs["start_ms"].notna()]
        ms = j["service_ms"] + (j["overhead_ms"] if column == "busy" else 0.0)
        self.times = {(k, int(r)): (p, float(t)) for k, r, p, t in
                      zip(j["kind"], j["request_id"], j["phase"], ms)}
        self.next_rank = 0
        self.phase_mismatch = 0   # the simulator ran another phase than the testbed did
        self.unmatched = 0        # the simulator ran a job the testbed did not run

    def phase(self, name: str, L: int, M: int = 0) -> float:
        key = self.current
        if key is None:
            key = ("rank", self.next_rank)
            self.next_rank += 1
        got = self.times.get(key)
        if got is None:
            self.unmatched += 1
            return self.base.phase(name, L, M)
        if got[0] != name:
            self.phase_mismatch += 1
        return got[1]


@dataclass
class Correction:
    """In-serving correction of a table, fitted on one run.

    time = base(phase, L, M) x eps, or base + eps (`additive`). base is the table's
    isolated median, or with `levels` (the in-serving host time of each phase, from the
    fit run) max(level, isolated median): eager serving is launch-bound, so a job takes
    the host's in-serving time unless its GPU work is longer. eps are the fit run's
    residuals of busy = device time + the host's time before the job: busy / base, or
    busy - base when additive (a per-job cost that does not grow with L: launches, input
    copies, wake-up, cache bookkeeping; graphed serving shows one). They are drawn i.i.d.
    per phase, or (`temporal`) time-indexed: a job starting at simulated time t takes the
    residual of the fit run's job of the same phase that started next after (t + offset)
    mod the fit run's span, the offset drawn per replication, so slow periods keep the
    clustering in time they had in the fit run."""

    fit_run: str
    levels: dict[str, float] | None
    pools: dict[str, np.ndarray]            # "*", phase and "phase|idle bin" -> sorted residuals
    starts_ms: dict[str, np.ndarray]        # pools' keys -> fit run's job starts, ascending
    eps: dict[str, np.ndarray]              # their residuals, in that order
    temporal: bool = False
    additive: bool = False
    idle: bool = False                      # pools per phase and idle bin (IDLE_EDGES_MS)

    @property
    def span_ms(self) -> float:
        return float(self.starts_ms["*"][-1])

    def time(self, phase: str, iso_ms: float, eps: float) -> float:
        base = iso_ms if self.levels is None else max(self.levels[phase], iso_ms)
        return max(base + eps, 1e-6) if self.additive else base * eps

    def draw(self, phase: str, now_ms: float, offset_ms: float, u: float, idle_ms: float = 0.0) -> float:
        key = phase if phase in self.pools else "*"
        if self.idle:
            binned = f"{phase}|{idle_bin(idle_ms)}"
            key = binned if binned in self.pools else key
        if self.temporal:
            starts, eps = self.starts_ms[key], self.eps[key]
            i = int(np.searchsorted(starts, (now_ms + offset_ms) % self.span_ms))
            return float(eps[min(i, len(eps) - 1)])
        return sorted_quantile(self.pools[key], u)

    def summary(self) -> dict:
        out = {"fit_run": self.fit_run, "temporal": self.temporal, "additive": self.additive, "idle": self.idle,
               "levels_ms": None if self.levels is None else {k: round(v, 4) for k, v in self.levels.items()},
               "residuals": {}}
        for p, v in sorted(self.pools.items()):
            q = np.quantile(v, [0.01, 0.5, 0.9, 0.99, 0.999])
            out["residuals"][p] = {"n": int(len(v)), "mean": round(float(v.mean()), 4),
                                   "q01_q50_q90_q99_q999": [round(float(x), 4) for x in q]}
        return out


def sorted_quantile(a: np.ndarray, u: float) -> float:
    """np.quantile(a, u) (linear method, numpy's own rounding) of an already sorted array,
    without its O(n) partition: this runs once per simulated job."""
    h = (len(a) - 1) * u
    i = math.floor(h)
    if i >= len(a) - 1:
        return float(a[-1])
    t = h - i
    lo, hi = a[i], a[i + 1]
    return float(hi - (hi - lo) * (1 - t)) if t >= 0.5 else float(lo + (hi - lo) * t)


def idle_bin(idle_ms: float) -> int:
    """0: the job queued (no idle); k: idle in (IDLE_EDGES_MS[k-1], IDLE_EDGES_MS[k]]."""
    return bisect.bisect_left(IDLE_EDGES_MS, idle_ms)


def fit_correction(run: Run, levels: bool = True, temporal: bool = False,
                   additive: bool = False, idle: bool = False) -> Correction:
    """Fit on one run, after its warm-up. A phase's level is the median busy time of its
    jobs at host-bound shapes (isolated median within 20% of the phase's smallest on the
    grid); the residuals are busy / base for every job. With `idle`, also one pool per
    phase and idle bin (how long the device had idled when the job arrived; the GPU runs
    slower after idling), where the bin holds at least MIN_IDLE_POOL jobs."""
    from simrec.calibration.table import load_table
    table = load_table(run.scenario.stages[STAGE].service.table)
    j = run.ran()
    cut = (run.scenario.run.warmup_s or 0.0) * 1000.0
    signal = run.trace["arrival_ms"].to_numpy()[j["request_id"].to_numpy()]
    j = j[(signal >= cut) & (j["phase"] != "")].reset_index(drop=True)
    phases = j["phase"].to_numpy()
    iso = np.array([table.curve(p).median_ms(L, 0 if p == "prefix_encode" else M)
                    for p, L, M in zip(phases, j["history_len"], j["candidates"])])
    busy = j["busy_ms"].to_numpy()
    lv = None
    if levels:
        lv = {}
        for p in np.unique(phases):
            curve = table.curve(p)
            floor = float(np.exp(curve.log_ms[..., list(curve.quantiles).index(0.5)]).min())
            host = (phases == p) & (iso <= 1.2 * floor)
            lv[p] = float(np.median(busy[host] if host.any() else busy[phases == p]))
    base = np.array([iso[k] if lv is None else max(lv[p], iso[k]) for k, p in enumerate(phases)])
    eps = busy - base if additive else busy / base
    names = np.unique(phases)
    pools = {"*": np.sort(eps), **{p: np.sort(eps[phases == p]) for p in names}}
    if idle:
        bins = np.searchsorted(IDLE_EDGES_MS, j["idle_ms"].to_numpy())     # idle_bin, vectorised
        for p in names:
            for b in np.unique(bins):
                sel = (phases == p) & (bins == b)
                if sel.sum() >= MIN_IDLE_POOL:
                    pools[f"{p}|{b}"] = np.sort(eps[sel])
    start = j["start_ms"].to_numpy() - j["start_ms"].min()
    groups = {"*": np.ones(len(eps), bool), **{p: phases == p for p in names}}
    starts, seqs = {}, {}
    for k, sel in groups.items():          # per group: residuals in the order the jobs started
        order = np.argsort(start[sel])
        starts[k], seqs[k] = start[sel][order], eps[sel][order]
    return Correction(run.name, lv, pools, starts, seqs, temporal, additive, idle)


class _Drawn(_Costs):
    """Costs that depend on the simulated state when the job starts."""

    def __init__(self, base, env, node, rng: np.random.Generator):
        super().__init__(base)
        self.env, self.node, self.rng = env, node, rng

    def idle_ms(self) -> float:
        ends = self.node.busy_ends
        return self.env.now - ends[-1] if ends else math.inf


class Corrected(_Drawn):
    def __init__(self, base, env, node, rng, correction: Correction):
        super().__init__(base, env, node, rng)
        self.correction = correction
        self.offset_ms = float(rng.uniform(0, correction.span_ms))

    def phase(self, name: str, L: int, M: int = 0) -> float:
        c = self.correction
        return c.time(name, self.base.median(name, L, M),
                      c.draw(name, self.env.now, self.offset_ms, self.rng.uniform(),
                             self.idle_ms() if c.idle else 0.0))


class TableIdle(_Drawn):
    def __init__(self, base, env, node, rng, table):
        super().__init__(base, env, node, rng)
        self.idle_curves = {p: table.curves[(p, "idle_gap")] for p in base.curves
                            if (p, "idle_gap") in table.curves}

    def phase(self, name: str, L: int, M: int = 0) -> float:
        curve = self.idle_curves.get(name) if self.idle_ms() >= IDLE_MS else None
        curve = curve or self.base.curves[name]
        return curve.sample_ms(L, M, self.rng.uniform())


def _tagged(costs, kind: str, cost_fn: Callable) -> Callable:
    """Wrap a relay cost decision so the cost model knows which job it is pricing."""
    def tagged(job, node, now):
        costs.current = (kind, job.rid)
        try:
            return cost_fn(job, node, now)
        finally:
            costs.current = None
    return tagged


def _swap_ranking_costs(make: Callable) -> Callable:
    """A `simulate(adjust=...)` hook: each replication's ranking stage (and its relay) gets
    its cost model from make(prepared, stage, replication index)."""
    def adjust(prep, index):
        stage = next(s for s in prep.stages if s.name == STAGE)
        costs = make(prep, stage, index)
        stage.service = costs
        relay = prep.relay
        if relay is not None:
            relay.phases = costs
            relay.rank_cost = _tagged(costs, "rank", relay.rank_cost)
            relay.pre_cost = _tagged(costs, "pre", relay.pre_cost)
    return adjust


# ----------------------------------------------------------------------------- simulation

@dataclass
class SimOutcome:
    source: str
    latency: list[np.ndarray]        # per replication: ranking sojourn per request (ms)
    prefix: list[np.ndarray] | None  # per replication: ranking cache outcome labels (relay)
    reused: list[np.ndarray] | None  # per replication: signal found the prefix cached (relay)
    checks: dict = field(default_factory=dict)


def simulate_source(run: Run, source: str, replications: int = 5,
                    correction: Correction | None = None, seed: int = 1) -> SimOutcome:
    """Simulate a run's scenario with one source of ranking service times."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    reps = 1 if source.startswith("replay") else replications
    scen = with_overrides(run.scenario, {"run.replications": reps, "run.seed": seed})
    made: list = []

    def make(prep, stage, index):
        rng = np.random.default_rng([seed, index, 77])
        node = stage.nodes[0]
        if source.startswith("replay"):
            c = Replay(stage.service, run, "busy" if source == "replay" else "service")
        elif source in CORRECTIONS:
            c = Corrected(stage.service, prep.env, node, rng, correction)
        else:
            from simrec.calibration.table import load_table
            c = TableIdle(stage.service, prep.env, node, rng, load_table(scen.stages[STAGE].service.table))
        made.append(c)
        return c

    if source == "table":
        res = simulate(scen)
    else:
        if source in CORRECTIONS and correction is None:
            raise ValueError(f"source {source!r} needs a fitted correction")
        res = simulate(scen, adjust=_swap_ranking_costs(make))
    req = res.requests.to_pandas().sort_values(["replication", "request_id"])
    lat, pre, reuse = [], [], []
    for _, g in req.groupby("replication"):
        lat.append((g[f"{STAGE}_wait_ms"] + g[f"{STAGE}_service_ms"]).to_numpy())
        if f"{STAGE}_prefix" in g:
            pre.append(g[f"{STAGE}_prefix"].astype(str).to_numpy())
            reuse.append(g["pre_infer"].astype(str).to_numpy() == "already_cached")
    checks = {}
    if source.startswith("replay"):
        c = made[0]
        checks = {"phase_mismatch": c.phase_mismatch, "unmatched_jobs": c.unmatched}
    return SimOutcome(source, lat, pre or None, reuse or None, checks)


# ----------------------------------------------------------------------------- comparison

def measured_figures(run: Run, n_boot: int = 1000) -> dict:
    rank = run.ranking()
    warm = run.warm()
    lat = rank["latency_ms"].to_numpy()[warm]
    block = block_length(lat)
    fig = {"figures": describe(lat), "ci": block_bootstrap(lat, block, n_boot), "block": block,
           "n": int(len(lat))}
    if run.policy == "relay":
        fig["figures"]["hit_rate"] = float((rank["outcome"].to_numpy()[warm] == "hit").mean())
        fig["figures"]["reuse_rate"] = float(reused(run)[warm].mean())
    ran = run.ran()
    span = ran["end_ms"].max() - ran["arrival_ms"].min()
    fig["utilisation"] = float(ran["busy_ms"].sum() / span)
    fig["overhead_ms"] = {"mean": float(ran["overhead_ms"].mean()),
                          "p99": float(ran["overhead_ms"].quantile(0.99)),
                          "share_of_busy": float(ran["overhead_ms"].sum() / ran["busy_ms"].sum())}
    if run.policy == "relay":
        fig["overhead_ms"]["per_signal_us"] = signal_host_cost(run)
    return fig


def signal_host_cost(run: Run) -> dict[str, float]:
    """Host time (us) that pre-infer signals cost the worker, by least squares: each executed
    job's overhead ~ base + sum over kinds of (signals of that kind processed just before it)
    x cost. A signal is processed when the worker is next free, i.e. before the first job
    that starts after it. Kinds: admitted (a pre-infer job queued), skipped (prefix already
    cached), rejected (no room). simrec's relay charges no host time for a signal."""
    ran = run.ran()
    pre = run.jobs[run.jobs["kind"] == "pre"]
    starts = ran["start_ms"].to_numpy()
    cols, names = [np.ones(len(ran))], ["base"]
    for kind, outcomes in (("admitted", ["computed", "cancelled"]), ("skipped", ["skipped"]),
                           ("rejected", ["rejected"])):
        k = np.searchsorted(starts, pre.loc[pre["outcome"].isin(outcomes), "arrival_ms"].to_numpy())
        if (k < len(ran)).any():
            cols.append(np.bincount(k[k < len(ran)], minlength=len(ran)).astype(float))
            names.append(kind)
    coef, *_ = np.linalg.lstsq(np.column_stack(cols), ran["overhead_ms"].to_numpy() * 1000.0, rcond=None)
    return {n: round(float(c), 2) for n, c in zip(names, coef)}


def reused(run: Run) -> np.ndarray:
    """Per request: its pre-infer signal found the user's prefix already cached."""
    out = np.zeros(len(run.trace), bool)
    skipped = run.jobs[(run.jobs["kind"] == "pre") & (run.jobs["outcome"] == "skipped")]
    out[skipped["request_id"].to_numpy()] = True
    return out


def compare(runs: list[Run], replications: int = 5, fit_run: str | None = None,
            sources: tuple[str, ...] = SOURCES, n_boot: int = 1000,
            progress: Callable[[str], None] | None = None, jobs: int = 1) -> "FidelityReport":
    """Simulate every run with every source and tabulate errors against the measurements.
    Runs are independent: with jobs > 1 they are compared in that many processes."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError(f"run names must be unique (got {names})")
    pilots = {r.table_key: r for r in runs if r.is_pilot}
    runs = [r for r in runs if not r.is_pilot]
    if not runs:
        raise InputError("only pilot runs given: nothing to judge", ", ".join(names))
    corrections, own = {}, {}
    if any(s in CORRECTIONS and s not in PER_MACHINE for s in sources):
        fit = pick_fit_run(runs, fit_run)
        corrections = {s: fit_correction(fit, **CORRECTIONS[s]) for s in sources
                       if s in CORRECTIONS and s not in PER_MACHINE}
    for key, pilot in pilots.items():
        own[key] = {s: fit_correction(pilot, **CORRECTIONS[s]) for s in sources if s in PER_MACHINE}
    args = [(run, sources, replications, {**corrections, **own.get(run.table_key, {})}, n_boot)
            for run in runs]
    rows, curves, detail = [], {}, {}
    for run, (r, c, d) in zip(runs, _starmap(_compare_run, args, jobs)):
        rows += r
        curves[run.name], detail[run.name] = c, d
        if progress:
            progress(run.name)
    summary = {k: c.summary() for k, c in corrections.items()}
    for s in (s for s in sources if s in PER_MACHINE and own):
        summary[s] = {p.name: own[k][s].summary() for k, p in pilots.items()}
    return FidelityReport(pd.DataFrame(rows), curves, detail, summary, replications)


def _starmap(fn: Callable, args: list[tuple], jobs: int):
    """fn(*a) for each a, in order, in `jobs` processes when jobs > 1: the results (and so
    the report) do not depend on jobs."""
    if jobs > 1 and len(args) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(jobs, len(args))) as pool:
            yield from pool.map(fn, *zip(*args))
    else:
        yield from (fn(*a) for a in args)


def _compare_run(run: Run, sources: tuple[str, ...], replications: int, corrections: dict,
                 n_boot: int) -> tuple[list[dict], dict, dict]:
    """One run: its measured figures, then every source's simulation of it."""
    meas = measured_figures(run, n_boot)
    warm = run.warm()
    measured_lat = run.ranking()["latency_ms"].to_numpy()
    detail = {"block": meas["block"], "n": meas["n"], "utilisation": meas["utilisation"],
              "overhead_ms": meas["overhead_ms"], "ci": meas["ci"],
              "in_serving_levels_ms": fit_correction(run).levels, "sources": {}}
    curves = {"measured": measured_lat[warm]}
    rows = []
    for source in sources:
        if source in PER_MACHINE and source not in corrections:
            continue                                  # no pilot from this run's machine
        out = simulate_source(run, source, replications, corrections.get(source))
        per = [describe(x[warm]) for x in out.latency]
        if out.prefix is not None:
            for d, p, u in zip(per, out.prefix, out.reused):
                d["hit_rate"] = float((p[warm] == "hit").mean())
                d["reuse_rate"] = float(u[warm].mean())
        curves[source] = out.latency[0][warm]
        info = dict(out.checks)
        if source.startswith("replay"):
            diff = out.latency[0] - measured_lat
            info.update({"max_abs_diff_ms": float(np.max(np.abs(diff))),
                         "mean_diff_ms": float(np.mean(diff)),
                         "within_1us": float(np.mean(np.abs(diff) <= 1e-3))})
            if out.prefix is not None:
                info["outcome_mismatch"] = int((out.prefix[0] != run.ranking()["outcome"].to_numpy()).sum())
                info["reuse_mismatch"] = int((out.reused[0] != reused(run)).sum())
        detail["sources"][source] = info
        in_sample = source in CORRECTIONS and corrections[source].fit_run == run.name
        for metric, value in meas["figures"].items():
            sims = np.array([d[metric] for d in per])
            lo, hi = meas["ci"].get(metric, (math.nan, math.nan))
            rows.append({"run": run.name, "policy": run.policy,
                         "target_load": run.meta.get("target_load"),
                         "utilisation": round(meas["utilisation"], 4), "requests": meas["n"],
                         "source": source, "in_sample": in_sample, "metric": metric,
                         "measured": value, "measured_lo": lo, "measured_hi": hi,
                         "simulated": float(sims.mean()),
                         "sim_sd": float(sims.std(ddof=1)) if len(sims) > 1 else 0.0,
                         "error": float(sims.mean() / value - 1) if value else math.nan,
                         "inside_ci": bool(lo <= sims.mean() <= hi) if metric in METRICS else None})
    return rows, curves, detail


def pick_fit_run(runs: list[Run], name: str | None) -> Run:
    """The named run; by default the relay run (largest cache) closest to 60% load, else
    the run closest to 60% load. Relay runs hold all three phases."""
    if name is not None:
        for r in runs:
            if r.name == name:
                return r
        raise InputError(f"--fit-run: no run named {name!r} (runs: {', '.join(r.name for r in runs)})")
    relay = [r for r in runs if r.policy == "relay"]
    pool = relay or runs
    top = max(r.meta["policy"].get("cache_bytes", 0) for r in pool)
    pool = [r for r in pool if r.meta["policy"].get("cache_bytes", 0) == top]
    return min(pool, key=lambda r: abs((r.meta.get("target_load") or 0.6) - 0.6))


# ----------------------------------------------------------------------------- report

@dataclass
class FidelityReport:
    rows: pd.DataFrame
    curves: dict[str, dict[str, np.ndarray]]
    detail: dict
    corrections: dict
    replications: int
    cross: pd.DataFrame | None = None

    def markdown(self, sources: tuple[str, ...] = MAIN_SOURCES) -> str:
        """Per run: measured P50 / P99 (95% CI) and each source's P50 / P99 / mean error."""
        r = self.rows
        lines = ["| run | util. | n | P50 ms | P99 ms [95% CI] | "
                 + " | ".join(f"{s} P50 / P99 / mean err" for s in sources)
                 + " | hit / reuse rate, measured | table |",
                 "|" + "---|" * (5 + len(sources) + 2)]
        for run, g in r.groupby("run", sort=False):
            def val(source, metric, col):
                x = g[(g["source"] == source) & (g["metric"] == metric)]
                return x[col].iloc[0] if len(x) else math.nan
            any_src = g["source"].iloc[0]
            p50 = val(any_src, "p50", "measured")
            p99, lo, hi = (val(any_src, "p99", c) for c in ("measured", "measured_lo", "measured_hi"))
            cells = [run, f"{g['utilisation'].iloc[0]:.2f}", str(g["requests"].iloc[0]), f"{p50:.3f}",
                     f"{p99:.2f} [{lo:.2f}, {hi:.2f}] (±{(hi - lo) / 2 / p99:.1%})"]
            for s in sources:
                errs = [val(s, m, "error") for m in ("p50", "p99", "mean")]
                flag = "*" if g[(g["source"] == s)]["in_sample"].any() else ""
                inside = val(s, "p99", "inside_ci")
                mark = "" if isinstance(inside, float) else ("✓" if inside else "")
                cells.append(" / ".join(_pct(e) for e in errs) + f"{mark}{flag}")
            hm, rm = val(any_src, "hit_rate", "measured"), val(any_src, "reuse_rate", "measured")
            hs, rs = val("table", "hit_rate", "simulated"), val("table", "reuse_rate", "simulated")
            cells.append("-" if math.isnan(hm) else f"{hm:.3f} / {rm:.3f}")
            cells.append("-" if math.isnan(hs) else f"{hs:.3f} / {rs:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Errors are simulated / measured - 1. ✓: simulated P99 inside the measured 95% "
                     "interval (circular block bootstrap over consecutive requests). *: the correction "
                     "was fitted on this run (in sample).")
        return "\n".join(lines)

    def write(self, out: Path) -> list[Path]:
        """fidelity.{csv,md,json,png} (and cross_fit.csv) into `out`, replaced atomically."""
        with atomic_folder(out) as tmp:
            names = [p.name for p in self._write(tmp)]
        return [Path(out) / n for n in names]

    def _write(self, out: Path) -> list[Path]:
        paths = [out / "fidelity.csv", out / "fidelity.md", out / "fidelity.json", out / "fidelity.png"]
        self.rows.to_csv(paths[0], index=False, float_format="%.6g")
        cross = ""
        if self.cross is not None:
            paths.append(out / "cross_fit.csv")
            self.cross.to_csv(paths[-1], index=False, float_format="%.6g")
            cross = "\n## Cross-fit\n\n" + cross_fit_markdown(self.cross) + "\n"
        paths[1].write_text("# simrec fidelity against the testbed\n\n" + self.markdown() + "\n\n"
                            "## All sources\n\n" + self.markdown(tuple(self.rows["source"].unique())) + "\n"
                            + cross)
        paths[2].write_text(json.dumps({"replications": self.replications, "runs": self.detail,
                                        "corrections": self.corrections}, indent=2, default=_json) + "\n")
        self.plot(paths[3])
        return paths

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        runs = list(self.curves)
        cols = min(4, len(runs))
        rows = math.ceil(len(runs) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        style = {"measured": ("k", "-", 2.2), "replay": ("tab:green", "--", 1.2),
                 "replay_kernel": ("tab:olive", ":", 1.0), "table": ("tab:red", "-", 1.2),
                 "table_idle": ("tab:orange", "-.", 1.0), "ratio_iid": ("tab:brown", ":", 1.0),
                 "levels_temporal": ("tab:purple", ":", 1.0), "additive_iid": ("tab:blue", "-", 1.2),
                 "additive_temporal": ("tab:cyan", "--", 1.2), "additive_pilot": ("tab:pink", "-", 1.2)}
        for ax, run in zip(axes.ravel(), runs):
            for name, x in self.curves[run].items():
                xs = np.sort(x)
                ccdf = 1.0 - np.arange(len(xs)) / len(xs)
                c, ls, lw = style.get(name, ("gray", "-", 1.0))
                ax.step(xs, ccdf, where="post", color=c, ls=ls, lw=lw, label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.05)
            ax.axhline(0.01, color="gray", lw=0.5)
            ax.axhline(0.5, color="gray", lw=0.5)
            util = self.detail[run]["utilisation"]
            ax.set_title(f"{run} (util. {util:.2f})", fontsize=9)
            ax.set_xlabel("ranking latency (ms)")
            ax.set_ylabel("P(latency > x)")
        for ax in axes.ravel()[len(runs):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7)
        fig.suptitle("measured vs simulated ranking latency (1 - CDF; lines at P50 and P99)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:+.1f}%"


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def cross_fit(runs: list[Run], source: str = "additive_iid", replications: int = 3,
              jobs: int = 1) -> pd.DataFrame:
    """`source` fitted on each run in turn and judged on every run: how much the result
    depends on which run was chosen for the fit. One row per (fit run, run, metric)."""
    if source not in CORRECTIONS or source in PER_MACHINE:
        raise InputError(f"cross-fit needs a one-run correction, not {source!r}")
    runs = [r for r in runs if not r.is_pilot]
    fits = [fit_correction(r, **CORRECTIONS[source]) for r in runs]
    tasks = [(run, source, replications, fit) for fit in fits for run in runs]
    outs = list(_starmap(simulate_source, tasks, jobs))
    measured = {r.name: describe(r.ranking()["latency_ms"].to_numpy()[r.warm()]) for r in runs}
    rows = []
    for (run, _, _, fit), out in zip(tasks, outs):
        warm = run.warm()
        per = [describe(x[warm]) for x in out.latency]
        for metric in METRICS:
            sim = float(np.mean([d[metric] for d in per]))
            rows.append({"fit_run": fit.fit_run, "run": run.name, "source": source, "metric": metric,
                         "in_sample": fit.fit_run == run.name, "measured": measured[run.name][metric],
                         "simulated": sim, "error": sim / measured[run.name][metric] - 1})
    return pd.DataFrame(rows)


def cross_fit_markdown(cross: pd.DataFrame, metric: str = "p99") -> str:
    """Rows: the run the correction was fitted on; columns: the run judged (P99 error)."""
    c = cross[cross["metric"] == metric]
    runs = list(dict.fromkeys(c["run"]))
    lines = [f"{c['source'].iloc[0]} {metric.upper()} error; row: fitted on, column: judged "
             "(in-sample cells in brackets)", "",
             "| fitted on | " + " | ".join(runs) + " |", "|" + "---|" * (len(runs) + 1)]
    for fit, g in c.groupby("fit_run", sort=False):
        cell = {r.run: (f"[{_pct(r.error)}]" if r.in_sample else _pct(r.error)) for r in g.itertuples()}
        lines.append(f"| {fit} | " + " | ".join(cell[r] for r in runs) + " |")
    out = c[~c["in_sample"]]["error"].abs()
    lines += ["", f"Out of sample: median |error| {out.median():.1%}, max {out.max():.1%} "
              f"over {len(out)} (fit, run) pairs."]
    return "\n".join(lines)


def run_fidelity(paths: list[Path], out: Path | None = None, table: str | None = None,
                 replications: int = 5, fit_run: str | None = None,
                 sources: tuple[str, ...] = SOURCES, n_boot: int = 1000,
                 progress: Callable[[str], None] | None = None, jobs: int = 1,
                 cross: bool = False) -> FidelityReport:
    """Load the runs, compare (and with `cross`, cross-fit additive_iid), and (with `out`)
    write fidelity.{csv,md,json,png} (and cross_fit.csv)."""
    runs = [load_run(p, table) for p in find_runs(paths)]
    report = compare(runs, replications, fit_run, sources, n_boot, progress, jobs)
    if cross:
        report.cross = cross_fit(runs, "additive_iid", replications, jobs)
    if out is not None:
        report.write(out)
    return report
