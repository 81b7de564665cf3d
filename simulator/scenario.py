"""The scenario format: what a user writes in YAML, validated once.

Every model is frozen and forbids unknown keys. Units are in field names; all simulated
times inside the model are milliseconds. Paths (trace files, cost tables) are resolved
against the scenario file's folder by the loader before validation.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .devices import PRESETS

# Upper bounds on sizes: each keeps one run within memory and time that a machine can give
# and every count exact in an int64 (the loader also checks a run's memory before it starts).
MAX_TIME_MS = 1e12              # any time in ms (~31 years)
MAX_DURATION_S = 1e8            # run.duration_s (~3 years)
MAX_RATE_QPS = 1e8
MAX_REQUESTS = 10**9            # run.requests per replication
MAX_REPLICATIONS = 10_000
MAX_USERS = 10**9
MAX_NODES = 100_000             # per stage
MAX_VIRTUAL_NODES = 10_000      # per node on the affinity hash ring
MAX_HISTORY_LEN = 10**8         # tokens
MAX_CANDIDATES = 10**7
MAX_VALUE = 1e12                # a distribution's values and other plain magnitudes
MAX_INT = 2**53                 # bytes and other integers: exact as floats too


def _not_bool(v):
    """YAML reads `true`/`yes` as a boolean, which pydantic would take as 1."""
    if isinstance(v, bool):
        raise ValueError(f"must be a number, not a boolean (got {str(v).lower()})")
    return v


Real = Annotated[float, BeforeValidator(_not_bool), Field(le=MAX_VALUE, ge=-MAX_VALUE)]
Int = Annotated[int, BeforeValidator(_not_bool), Field(le=MAX_INT, ge=-MAX_INT)]
PosFloat = Annotated[Real, Field(gt=0)]
NonNegFloat = Annotated[Real, Field(ge=0)]
PosInt = Annotated[Int, Field(gt=0)]
Ms = Annotated[Real, Field(gt=0, le=MAX_TIME_MS)]
# Bandwidths: 1e-300 GB/s passed as > 0, and a prefix, history or embedding transfer then
# took ~1e300 ms (requests never finished); at 1 MB/s even 1e8 tokens of 4 KB take days.
MIN_GBPS = 1e-3
Gbps = Annotated[Real, Field(ge=MIN_GBPS)]


# Titles in the JSON Schema read "mean (ms)", not pydantic's "Mean Ms": the unit suffix of a
# field name becomes a parenthesised unit.
_UNITS = {"ms": "ms", "s": "s", "us": "us", "qps": "QPS", "gbps": "GB/s", "tflops": "TFLOP/s",
          "bytes": "bytes", "per_s": "per s", "per_min": "per min", "rel": "relative"}
_TITLES = {"zipf_s": "Zipf exponent s", "p99_halfwidth_rel": "P99 CI half-width (relative)",
           "ms": "time (ms)", "gbps": "bandwidth (GB/s)"}


def field_title(name: str, _info=None) -> str:
    """A field's title from its name: `mean_ms` -> "mean (ms)", `rate_qps` -> "rate (QPS)"."""
    if name in _TITLES:
        return _TITLES[name]
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if name == suffix:
            return _UNITS[suffix]
        if name.endswith("_" + suffix):
            return f"{name[:-len(suffix) - 1].replace('_', ' ')} ({_UNITS[suffix]})"
    return name.replace("_", " ")


class Strict(BaseModel):
    """Frozen, no unknown keys, and every float finite (inf and NaN are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              field_title_generator=field_title)


# ---------------------------------------------------------------- distributions
class ConstantDist(Strict):
    kind: Literal["constant"] = Field(description="every draw is `value`")
    value: PosFloat = Field(description="the value every draw takes (> 0)")


class UniformDist(Strict):
    kind: Literal["uniform"] = Field(description="draws uniform on [low, high]")
    low: PosFloat = Field(description="smallest value (> 0)")
    high: PosFloat = Field(description="largest value (>= low)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"high must be >= low (got low={self.low}, high={self.high})")
        return self


class LognormalDist(Strict):
    kind: Literal["lognormal"] = Field(description=(
        "lognormal draws with this mean and coefficient of variation"))
    mean: PosFloat = Field(description="mean of the draws (> 0)")
    cv: Annotated[PosFloat, Field(le=100)] = Field(description=(
        "coefficient of variation: standard deviation / mean (0 < cv <= 100)"))


class EmpiricalDist(Strict):
    """Values drawn with the given weights (equal weights if omitted)."""

    kind: Literal["empirical"] = Field(description="draws from a list of values")
    values: list[PosFloat] = Field(min_length=1, description="the values drawn (each > 0)")
    weights: list[PosFloat] | None = Field(None, description=(
        "relative weight of each value, one per value; default: equal weights"))

    @model_validator(mode="after")
    def _same_length(self):
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError(f"weights must have one entry per value "
                             f"({len(self.weights)} != {len(self.values)})")
        return self


Distribution = Annotated[Union[ConstantDist, UniformDist, LognormalDist, EmpiricalDist],
                         Field(discriminator="kind")]


# ---------------------------------------------------------------- service times
class ConstantService(Strict):
    kind: Literal["constant"] = Field(description="every job takes `ms`")
    ms: Ms = Field(description="service time of every job")


class ExponentialService(Strict):
    kind: Literal["exponential"] = Field(description=(
        "exponential service times (memoryless: M/M/c stations)"))
    mean_ms: Ms = Field(description="mean service time")


class LognormalService(Strict):
    kind: Literal["lognormal"] = Field(description=(
        "lognormal service times with this mean and coefficient of variation"))
    mean_ms: Ms = Field(description="mean service time")
    cv: Annotated[PosFloat, Field(le=100)] = Field(description=(
        "coefficient of variation: standard deviation / mean (0 < cv <= 100)"))


class EmpiricalService(Strict):
    kind: Literal["empirical"] = Field(description=(
        "service times drawn uniformly from measured samples"))
    samples_ms: list[Ms] = Field(min_length=1, description=(
        "the measured service times, drawn with equal weights"))


PROFILE_HELP = ("a serving profile fitted by `simrec fit` against this table: each job then costs "
                "the table's median plus the profile's in-serving excess, and the stage's nodes get "
                "the profile's slow episodes (DESIGN.md, trace-corrected cost model)")


class TableService(Strict):
    """A phase of a measured cost table, looked up by the request's (L, M)."""

    kind: Literal["table"] = Field(description=(
        "a phase of a measured cost table, looked up by the request's history length L and "
        "candidates M"))
    table: str = Field(description="built-in table name, or path to a table folder / manifest.json")
    phase: str = Field(description=(
        "the table's phase to cost each job with (e.g. full_forward; FORMAT.md)"))
    condition: str = Field("isolated", description=(
        "the measurement condition to read: isolated, idle_gap, busy or cache_pressure "
        "(FORMAT.md)"))
    extrapolate: bool = Field(False, description="allow shapes outside the measured grid")
    profile: str | None = Field(None, description=PROFILE_HELP)


class SummaryStore(Strict):
    """VISTA's store of users' summaries (k tokens of width d, computed from the history):
    each ranking fetches its user's summary; a summary older than `refresh_s` is stale and
    is recomputed nearline (off the ranking path) or on the critical path (`vista_summarize`
    runs before the ranking)."""

    fetch_latency_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS)] = Field(
        0.3, description="latency of one summary fetch")
    fetch_gbps: Annotated[Gbps, Field(le=1e6)] = Field(
        10.0, description="bandwidth of the summary fetch, GB/s")
    refresh_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] = Field(
        3600.0, description="a summary older than this is recomputed")
    on_stale: Literal["nearline", "critical_path"] = Field(
        "nearline", description="where a stale or missing summary is recomputed")


class GRService(Strict):
    """A generative-recommendation ranking model, costed phase by phase from a cost table.

    The table's architecture (its manifest's model.arch) sets the phases a request costs:
    transformer / hstu `full_forward(L, M)` (with a `relay` block: `rank_cached(L, M)` on a
    cached prefix, plus `prefix_reload(L)` from DRAM; pre-infer jobs `prefix_encode(L)`);
    stca `stca_history_encode(L) + stca_target_attend(L, M)` with RLB, else
    `stca_per_target(L, M)`; laser `laser_history_encode(L) + laser_sta_rank(L, M)`; vista
    a summary fetch + `vista_rank_summary(M)` (+ `vista_summarize(L)` when the summary is
    stale and `summary.on_stale` is critical_path).
    """

    kind: Literal["gr"] = Field(description=(
        "a generative-recommendation ranking model costed phase by phase from a cost table"))
    table: str = Field(description=(
        "built-in table name, or path to a table folder / manifest.json (simrec list tables)"))
    arch: Literal["transformer", "hstu", "stca", "vista", "laser"] | None = Field(
        None, description="the table's architecture, checked against its manifest (default: "
                          "whatever the table holds)")
    rlb: bool = Field(True, description="stca: encode the user side once per request "
                                        "(request-level batching) or once per target")
    summary: SummaryStore | None = Field(
        None, description="vista: the summary store (defaults when absent)")
    condition: str = Field("isolated", description=(
        "the measurement condition to read: isolated, idle_gap, busy or cache_pressure "
        "(FORMAT.md)"))
    extrapolate: bool = Field(False, description=(
        "allow shapes (L, M) outside the measured grid; refused otherwise"))
    kv_bytes_per_token: Annotated[PosInt, Field(le=2**30)] | None = Field(
        None, description="prefix KV bytes per history token; default: the table's model")
    profile: str | None = Field(None, description=PROFILE_HELP)


class RooflineModel(Strict):
    """The ranking model's shape, for FLOP and byte counts (DESIGN.md formulas)."""

    arch: Literal["transformer", "hstu", "stca", "vista"] = Field("transformer", description=(
        "model family, which sets the phases and their FLOP and byte counts"))
    layers: Annotated[PosInt, Field(le=10_000)] = Field(8, description="transformer layers")
    d_model: Annotated[PosInt, Field(le=10**6)] = Field(512, description="hidden width")
    heads: Annotated[PosInt, Field(le=10_000)] = Field(8, description="attention heads")
    ffn: Annotated[PosInt, Field(le=10**7)] | None = Field(None, description="default: 4 x d_model")
    dtype_bytes: Annotated[PosInt, Field(le=16)] = Field(2, description=(
        "bytes per weight and activation element (2: bf16)"))
    short_term_tokens: Annotated[Int, Field(ge=0, le=MAX_HISTORY_LEN)] = Field(32, description=(
        "recent history tokens a ranking on a cached prefix still encodes"))
    summary_tokens: Annotated[PosInt, Field(le=MAX_HISTORY_LEN)] = Field(
        128, description="VISTA: summary tokens k")


class RooflineService(Strict):
    """GR phase costs from FLOPs and bytes over a device's peaks, for devices nobody measured:
    time = max(FLOPs / (peak x compute_efficiency), bytes / (bandwidth x memory_efficiency))
           + launches x launch overhead. `fit_from` fits the efficiencies and per-call
    overhead on a measured table (another device) and carries them to this one."""

    kind: Literal["roofline"] = Field(description=(
        "phase costs from FLOPs and bytes over a device's peaks (for devices nobody measured)"))
    device: str | None = Field(None, description="default: the stage's node device")
    model: RooflineModel = Field(RooflineModel(), description="the ranking model's shape")
    compute_efficiency: Annotated[Real, Field(gt=0, le=1)] = Field(0.4, description=(
        "share of the device's peak FLOP/s the kernels reach (0-1]"))
    memory_efficiency: Annotated[Real, Field(gt=0, le=1)] = Field(0.7, description=(
        "share of the device's HBM bandwidth the kernels reach (0-1]"))
    launches_per_layer: Annotated[PosInt, Field(le=10_000)] = Field(12, description=(
        "kernel launches per layer, each costing the device's launch overhead"))
    fit_from: str | None = Field(None, description="a measured table to fit efficiencies on")
    cv: Annotated[Real, Field(ge=0, le=100)] = Field(
        0.0, description="lognormal noise around the roofline time")


class KernelsModel(Strict):
    """The ranking model a `kernels` service costs: its operator graph (simrec.operators)."""

    arch: Literal["transformer", "hstu"] = Field("transformer", description=(
        "model family, which sets the operator graph of each phase"))
    layers: Annotated[PosInt, Field(le=10_000)] = Field(8, description="transformer layers")
    d_model: Annotated[PosInt, Field(le=10**6)] = Field(512, description=(
        "hidden width (a multiple of heads)"))
    heads: Annotated[PosInt, Field(le=10_000)] = Field(8, description="attention heads")
    ffn: Annotated[PosInt, Field(le=10**7)] | None = Field(None, description="default: 4 x d_model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description=(
        "element type of weights and activations"))
    short_term_tokens: Annotated[Int, Field(ge=0, le=MAX_HISTORY_LEN)] = Field(32, description=(
        "recent history tokens a ranking on a cached prefix still encodes"))

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        return self


class KernelsService(Strict):
    """GR phase costs composed from a measured kernel table (simrec.kernel_model): each phase
    is its operator graph, every operator looked up in `table`'s kernels.parquet, plus the
    device's per-launch host overhead fitted on the phase tables of `table` (and of
    `overhead_from`, tables of the same device). Costs shapes nobody benchmarked."""

    kind: Literal["kernels"] = Field(description=(
        "phase costs composed from a measured kernel table (simrec.kernel_model)"))
    table: str = Field(description="a folder holding kernels.parquet and manifest.json (and the "
                                   "phase table the overhead is fitted on), or a built-in name")
    model: KernelsModel = Field(KernelsModel(), description=(
        "the ranking model whose operator graph is costed"))
    overhead_from: tuple[str, ...] = Field((), description="more tables of the same device: their "
                                           "kernels and phases join the lookup and the fit")


ServiceModel = Annotated[
    Union[ConstantService, ExponentialService, LognormalService, EmpiricalService, TableService,
          GRService, RooflineService, KernelsService],
    Field(discriminator="kind")]


# ---------------------------------------------------------------- workload
class PoissonArrivals(Strict):
    kind: Literal["poisson"] = Field(description="Poisson arrivals at rate_qps")


class RateStep(Strict):
    start_s: Annotated[NonNegFloat, Field(le=MAX_DURATION_S)] = Field(description=(
        "when this step starts, seconds from the run's start"))
    factor: Annotated[NonNegFloat, Field(le=1e6)] = Field(description=(
        "rate multiplier from start_s on (0: no arrivals)"))


class PiecewiseArrivals(Strict):
    """Rate = rate_qps x factor of the last step that has started."""

    kind: Literal["piecewise"] = Field(description=(
        "Poisson arrivals whose rate steps: rate_qps x the factor of the last step started"))
    steps: list[RateStep] = Field(min_length=1, description=(
        "the steps, the first at start_s 0, start_s strictly increasing"))

    @model_validator(mode="after")
    def _sorted(self):
        starts = [s.start_s for s in self.steps]
        if starts[0] != 0 or starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError("steps must start at 0 and have strictly increasing start_s")
        if max(s.factor for s in self.steps) <= 0:
            raise ValueError("at least one step needs a factor > 0")
        if any(0 < s.factor < 1e-6 for s in self.steps):
            raise ValueError("a step factor must be 0 or at least 1e-6")
        return self


class DiurnalArrivals(Strict):
    """Rate = rate_qps x (1 + amplitude sin(2 pi (t + phase_s) / period_s))."""

    kind: Literal["diurnal"] = Field(description=(
        "Poisson arrivals whose rate follows a sine: rate_qps x (1 + amplitude sin(2 pi (t + "
        "phase_s) / period_s))"))
    amplitude: Annotated[Real, Field(ge=0, lt=1)] = Field(0.5, description=(
        "relative swing of the rate around rate_qps, [0, 1)"))
    period_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] = Field(86400.0, description=(
        "period of the cycle"))
    phase_s: Real = Field(0.0, description=(
        "shift of the cycle: the rate at t = 0 is that of t = phase_s"))


class BurstArrivals(Strict):
    """Two-state MMPP: calm at rate_qps, bursts at rate_qps x burst_factor."""

    kind: Literal["burst"] = Field(description=(
        "a two-state Markov-modulated Poisson process: calm at rate_qps, bursts at rate_qps x "
        "burst_factor"))
    burst_factor: Annotated[Real, Field(ge=1, le=1e6)] = Field(3.0, description=(
        "rate multiplier during a burst (>= 1)"))
    mean_calm_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] = Field(30.0, description=(
        "mean length of a calm spell (exponential)"))
    mean_burst_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] = Field(5.0, description=(
        "mean length of a burst (exponential)"))


class TraceArrivals(Strict):
    """Replay a CSV/Parquet file with columns arrival_ms, user_id, history_len, candidates."""

    kind: Literal["trace"] = Field(description="replay recorded requests from a file")
    path: str = Field(description=(
        "CSV or Parquet file with columns arrival_ms, user_id, history_len, candidates (relative "
        "to the scenario file)"))


Arrivals = Annotated[
    Union[PoissonArrivals, PiecewiseArrivals, DiurnalArrivals, BurstArrivals, TraceArrivals],
    Field(discriminator="kind")]


class Sessions(Strict):
    """Users come back in sessions: a session is a burst of requests from one user."""

    mean_requests: Annotated[Real, Field(ge=1, le=1e6)] = Field(1.0, description=(
        "mean requests per session (geometric; 1: every request its own session)"))
    mean_gap_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] = Field(30.0, description=(
        "mean gap between a session's consecutive requests (exponential)"))


class Users(Strict):
    count: Annotated[PosInt, Field(le=MAX_USERS)] = Field(100_000, description="distinct users")
    zipf_s: Annotated[Real, Field(ge=0, le=10)] = Field(1.0, description=(
        "Zipf exponent of user popularity (0: uniform)"))
    history_len: Distribution = Field(
        LognormalDist(kind="lognormal", mean=2000, cv=1.0), description=(
        "each user's history length L, in tokens (rounded, then clipped to min/max_history_len)"))
    min_history_len: Annotated[PosInt, Field(le=MAX_HISTORY_LEN)] = Field(1, description=(
        "shortest history, in tokens"))
    max_history_len: Annotated[PosInt, Field(le=MAX_HISTORY_LEN)] | None = Field(None, description=(
        "longest history, in tokens; default: unbounded"))
    sessions: Sessions = Field(Sessions(), description="how a user's requests cluster in time")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_history_len is not None and self.max_history_len < self.min_history_len:
            raise ValueError("max_history_len must be >= min_history_len")
        return self


class Workload(Strict):
    rate_qps: Annotated[PosFloat, Field(le=MAX_RATE_QPS)] | None = Field(
        None, description="mean offered load; unused for traces")
    arrivals: Arrivals = Field(PoissonArrivals(kind="poisson"), description=(
        "the arrival process (default: Poisson)"))
    users: Users = Field(Users(), description=(
        "the user population: count, popularity, history lengths, sessions"))
    candidates: Distribution = Field(ConstantDist(kind="constant", value=300), description=(
        "candidates M to rank per request"))

    @model_validator(mode="after")
    def _rate_given(self):
        is_trace = isinstance(self.arrivals, TraceArrivals)
        if is_trace and self.rate_qps is not None:
            raise ValueError("rate_qps must not be set with trace arrivals (the trace gives the times)")
        if not is_trace and self.rate_qps is None:
            raise ValueError("rate_qps is required unless arrivals.kind is trace")
        return self


# ---------------------------------------------------------------- cluster
class DeviceSpec(Strict):
    name: str = Field(description="device name as shown in reports")
    hbm_bytes: PosInt = Field(description="device memory (HBM); accepts units, e.g. 80GB")
    peak_tflops: PosFloat = Field(description="peak dense TFLOP/s at the model's precision")
    hbm_gbps: Gbps = Field(description="HBM bandwidth, GB/s")
    host_link_gbps: Gbps = Field(description=(
        "host-device link bandwidth (PCIe / NVLink-C2C), GB/s"))
    launch_overhead_us: NonNegFloat = Field(description="host-side cost of one kernel launch")
    host_dram_bytes: PosInt = Field(description="host DRAM per device; accepts units, e.g. 512GiB")
    source: str = Field("", description="where the figures come from (a datasheet, a measurement)")


class NodePool(Strict):
    count: Annotated[PosInt, Field(le=MAX_NODES)] = Field(1, description=(
        "nodes (instances) in the stage"))
    device: str = Field("h100", description=f"a preset ({', '.join(PRESETS)}) or a key of `devices`")


class Affinity(Strict):
    virtual_nodes: Annotated[PosInt, Field(le=MAX_VIRTUAL_NODES)] = Field(64, description=(
        "points per node on the consistent-hash ring of the affinity routers"))
    overload_jobs: Annotated[PosInt, Field(le=10**6)] = Field(
        8, description="affinity_fallback leaves the home node when it holds this many jobs")


class Batching(Strict):
    """A batch of n jobs costs the first job's time plus marginal_cost x each other's.

    On a relay stage a batch is the run of ranking jobs at the head of an instance's queue
    (a pre-infer job runs alone). Each job's path is decided as for a single ranking; the
    cached ones (HBM hits, DRAM reloads, remote fetches) run as one padded `rank_cached`
    call and the others as one padded `full_forward` call, each costing a draw at the
    group's largest (L, M) times the cost table's measured batch factor (FORMAT.md), or
    1 + marginal_cost x (n - 1) where the table has no batched rows. Reloads, fetches and
    embedding lookups add per job."""

    max_size: Annotated[PosInt, Field(le=100_000)] = Field(1, description=(
        "most jobs in one batch (1: no batching)"))
    max_wait_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS)] = Field(0.0, description=(
        "longest a batch waits for more jobs after its first (0: take what is queued)"))
    marginal_cost: Annotated[Real, Field(gt=0, le=1)] = Field(1.0, description=(
        "cost of each further job in a batch, as a fraction of its own time (0-1]"))


class Interference(Strict):
    """Slow episodes on a stage's nodes (what-if, or fitted: a `profile` brings its own).

    Episodes start as a Poisson process at `rate_per_min` per minute of normal running; each
    lasts `duration_s` and every job that starts inside it runs `slowdown` x its time. With
    `scope: host` the `nodes_per_host` consecutive nodes of a host share one timeline."""

    rate_per_min: Annotated[Real, Field(gt=0, le=6000, allow_inf_nan=False)] = Field(description=(
        "episodes per minute of normal running, per node (or host)"))
    duration_s: Distribution = Field(description="how long an episode lasts, seconds")
    slowdown: Distribution = Field(description="factor on a job's time during an episode (> 0)")
    scope: Literal["node", "host"] = Field("node", description=(
        "node: each node has its own episodes; host: nodes_per_host consecutive nodes share them"))
    nodes_per_host: Annotated[PosInt, Field(le=MAX_NODES)] = Field(1, description=(
        "nodes sharing one timeline with scope: host"))


class HistoryTier(Strict):
    """A local tier of a history store (DRAM or SSD): fetching B bytes from it takes
    latency_ms + B / (gbps x 1e6) ms and cpu_ms of the node's time."""

    capacity_bytes: Annotated[PosInt, Field(description="bytes of user history this tier holds "
                                                        "(per node, or for the stage with scope: shared)")]
    latency_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS, description="fixed time of one fetch from this tier")]
    gbps: Annotated[Gbps, Field(description="read bandwidth of this tier, GB/s (1e9 bytes per second)")]
    cpu_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS, description="pre-processing node time one fetch "
                                                                     "from this tier costs (lookup, copy, decode)")]


class RemoteTier(Strict):
    """The remote store (a remote KV service) that holds every user's history."""

    latency_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS, description="fixed time of one remote fetch (RPC round trip)")]
    gbps: Annotated[Gbps, Field(description="effective bandwidth of a remote fetch, GB/s")]
    cpu_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS, description="pre-processing node time one remote "
                                                                     "fetch costs (RPC, deserialisation)")]


class HistoryTiers(Strict):
    dram: HistoryTier | None = Field(None, description="the DRAM tier; omit for none")
    ssd: HistoryTier | None = Field(None, description="the SSD tier; omit for none")
    remote: RemoteTier = Field(description="the remote store every miss goes to (omit dram and ssd "
                                           "for the remote-only baseline)")


class HistoryStore(Strict):
    """A tiered user-history store on a stage's nodes (SeqVault-style, LASER arXiv 2602.11562;
    history_store.py). Each job fetches its user's history (bytes_per_token x L bytes) from
    the tier that holds it; the fetch time and the tier's CPU cost add to the job's service
    time on its node."""

    bytes_per_token: Annotated[PosInt, Field(le=2**30, description="history bytes per token of L")]
    placement: Literal["lru", "static"] = Field(
        "lru", description="lru: users by bytes, promoted to DRAM on access, demoted DRAM -> SSD -> "
                           "out; static: the most popular users (the workload's Zipf ranking) fill "
                           "DRAM, then SSD, and stay")
    scope: Literal["node", "shared"] = Field(
        "node", description="node: each node has its own tiers of these capacities; shared: one store "
                            "of these capacities for the whole stage")
    warm_start: bool = Field(
        True, description="lru: the tiers start full, in a draw of LRU's stationary state under the "
                          "popularity model, as in a store that has long been serving; false: "
                          "they start empty (compulsory misses then fall in the run)")
    tiers: HistoryTiers = Field(description="dram, ssd (optional) and remote (required)")


class Stage(Strict):
    nodes: NodePool = Field(NodePool(), description="the stage's nodes: how many, on which device")
    router: Literal["shared", "delay", "random", "round_robin", "least_loaded", "power_of_two",
                    "affinity", "affinity_fallback", "hbm_aware"] = Field(
        "round_robin", description="per-node queues picked by this policy; `shared`: one FIFO "
                                   "queue for all nodes (M/M/c); `delay`: no queue, infinite servers; "
                                   "`hbm_aware` (relay stage only): the node with the least expected "
                                   "finish time, counting its backlog, whether it holds the user's "
                                   "prefix and its embedding hit ratio")
    affinity: Affinity = Field(Affinity(), description=(
        "settings of the affinity routers (hash ring, overload fallback)"))
    queue: Literal["fifo"] = Field("fifo", description="queue discipline of each node's queue")
    batch: Batching = Field(Batching(), description=(
        "batching of jobs on a node (default: one job at a time)"))
    service: ServiceModel = Field(description=(
        "service time model: a distribution, a measured cost table, a roofline or a kernel model"))
    candidates: Annotated[PosInt, Field(le=MAX_CANDIDATES)] | None = Field(
        None, description="candidates this stage handles per request; default: the request's M")
    hop_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS)] = Field(
        0.0, description="network latency to the next stage")
    interference: Interference | None = Field(
        None, description="slow episodes on this stage's nodes, on top of a profile's own")
    history_store: HistoryStore | None = Field(
        None, description="a tiered user-history store on this stage's nodes (DRAM, SSD, remote); "
                          "each job's fetch and the store's CPU cost add to its service time")


class NoTrigger(Strict):
    kind: Literal["none"] = Field(description="never pre-infer")


class AllTrigger(Strict):
    kind: Literal["all"] = Field(description="pre-infer every request's prefix")


class LengthTrigger(Strict):
    kind: Literal["length"] = Field(description="pre-infer requests whose history is long enough")
    min_history_len: Annotated[PosInt, Field(le=MAX_HISTORY_LEN)] = Field(description=(
        "shortest history (tokens) that is pre-inferred"))


class SequenceAwareTrigger(Strict):
    """RelayGR's trigger: pre-infer exactly the at-risk requests, those whose predicted
    ranking latency on their instance (the work queued ahead plus their own full ranking,
    medians) exceeds the budget. Admission is bounded by the pinned cache footprint and by
    the pre-infer load: the share of the instance's device time that admitted pre-infer
    work takes, as a moving sum of predicted pre-infer times over `load_window_ms`."""

    kind: Literal["sequence_aware"] = Field(description=(
        "RelayGR's trigger: pre-infer exactly the at-risk requests, within admission bounds"))
    budget_ms: Ms | None = Field(None, description="default: the stage's SLO budget")
    max_pinned_fraction: Annotated[Real, Field(gt=0, le=1)] = Field(
        0.8, description="admit only while pinned prefixes (this one included) fit this share "
                         "of the instance's prefix cache")
    max_pre_load: Annotated[Real, Field(gt=0, le=1)] = Field(
        0.5, description="admit only while pre-infer work (this one included) stays under this "
                         "share of the instance's device time")
    load_window_ms: Annotated[PosFloat, Field(le=MAX_TIME_MS)] = Field(
        1000.0, description="time constant of the pre-infer load's moving sum")
    max_pending: Annotated[PosInt, Field(le=10**6)] | None = Field(
        None, description="optional cap on pre-infer jobs waiting on the instance")


Trigger = Annotated[Union[NoTrigger, AllTrigger, LengthTrigger, SequenceAwareTrigger],
                    Field(discriminator="kind")]


class PrefixCacheConfig(Strict):
    hbm_bytes: PosInt | None = Field(
        None, description="HBM for prefix KV per instance; required without an `hbm` block, "
                          "forbidden with one (the KV side is then the pool minus the EMB side)")
    policy: Literal["lru", "ttl"] = Field("lru", description=(
        "eviction: lru, or ttl (also drop prefixes older than ttl_s)"))
    ttl_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] = Field(3600.0, description=(
        "policy ttl: a prefix older than this is dropped"))
    keep_full: bool = Field(
        False, description="a ranking that ran the full forward pass keeps the history KV it "
                           "computed (unpinned), for the user's next request")
    pin: Literal["until_ranked", "none"] = Field(
        "until_ranked", description="an admitted prefix is pinned until its ranking starts, or "
                                    "(`none`) it can be evicted before it is used, as on servers "
                                    "that do not pin")


class Expander(Strict):
    dram_bytes: Annotated[Int, Field(ge=0)] = Field(0, description="host DRAM per instance for evicted prefixes")
    reload: Literal["cheaper", "always"] = Field(
        "cheaper", description="reload from DRAM only when cheaper than recomputing, or always")


class Relay(Strict):
    """RelayGR: pre-infer users' long-term prefixes on the instance that will rank them."""

    stage: str = Field("ranking", description=(
        "the stage whose instances pre-infer and cache prefixes (its service kind gr, roofline or"
        " kernels)"))
    signal_after: str = Field("retrieval", description="a stage before `stage`, or 'arrival'")
    signal_ms: Annotated[NonNegFloat, Field(le=MAX_TIME_MS)] = Field(
        0.5, description="network time of the pre-infer signal")
    trigger: Trigger = Field(SequenceAwareTrigger(kind="sequence_aware"), description=(
        "which requests get their prefix pre-inferred"))
    queue: Literal["fifo", "rank_first", "pre_first"] = Field("fifo", description=(
        "order on an instance: fifo, rank_first (pre-infer jobs only when no ranking waits) or "
        "pre_first"))
    cache: PrefixCacheConfig = Field(description="the per-instance prefix KV cache in HBM")
    expander: Expander = Field(Expander(), description=(
        "host DRAM that holds evicted prefixes for reload"))
    remote: Literal["recompute", "fetch"] = Field(
        "recompute", description="a prefix held by another instance: recompute, or fetch it "
                                 "when the transfer plus a cached ranking is cheaper than "
                                 "recomputing (medians; the declined fetches are counted)")
    remote_gbps: Gbps = Field(12.5, description=(
        "transfer rate of a prefix fetched from another instance, GB/s"))


# ---------------------------------------------------------------- HBM pool (HELM)
class DriftStep(Strict):
    """From start_s on, popularity turns over at turnover_per_s: that fraction of the
    embedding rows a device holds stops being hot each second (trend regime)."""

    start_s: Annotated[NonNegFloat, Field(le=MAX_DURATION_S)] = Field(description=(
        "when this popularity turnover rate starts, seconds from the run's start"))
    turnover_per_s: Annotated[NonNegFloat, Field(le=1e6)] = Field(description=(
        "fraction of a device's hot embedding rows that stop being hot each second"))


class Embedding(Strict):
    """The ranking model's embedding lookups, served from the HBM embedding cache (EMB).

    A ranking request looks up one row per history token it has to encode (all L on a
    prefix miss, only `short_term_tokens` when its prefix KV is cached) and
    `candidate_rows` per candidate; a pre-infer job looks up its L history rows. Item ids follow a Zipf
    popularity over `items`, drifting as `drift` says. A missed row is copied host ->
    device on the critical path at `miss_gbps`.
    """

    items: PosInt = Field(100_000_000, description="item catalogue size (embedding rows)")
    zipf_s: Annotated[Real, Field(ge=0, le=3)] = Field(0.9, description=(
        "Zipf exponent of item popularity"))
    row_bytes: Annotated[PosInt, Field(le=2**30)] = Field(
        4096, description="embedding bytes one token looks up (all its features)")
    short_term_tokens: Annotated[Int, Field(ge=0, le=MAX_HISTORY_LEN)] = Field(   # 1e12 overflowed int32
        32, description="tokens a request with a cached prefix still embeds (the H100 table's model: 32)")
    candidate_rows: Annotated[PosInt, Field(le=10_000)] = Field(
        1, description="rows each candidate looks up (its id and side features, e.g. author, "
                       "category), all drawn from the same popularity")
    drift: list[DriftStep] = Field(
        [], description="popularity turnover schedule (trend regime); empty: steady popularity")
    miss_gbps: Gbps | None = Field(
        None, description="effective host -> device rate for scattered missed rows; "
                          "default: the device's host link")
    miss_latency_us: NonNegFloat = Field(0.0, description="fixed cost of a lookup that misses at all")
    gather: Literal["table", "none"] = Field(
        "table", description="per-lookup gather cost from the cost table's emb_gather phase, or none")

    @model_validator(mode="after")
    def _sorted(self):
        starts = [d.start_s for d in self.drift]
        if starts and (starts != sorted(starts) or len(set(starts)) != len(starts)):
            raise ValueError("drift: steps need strictly increasing start_s")
        return self


class Bounds(Strict):
    """Where an adaptive controller starts, how far it may move the boundary, and how long
    it lets the caches warm up (an empty KV side shows no reuse yet) before it moves."""

    start_emb_fraction: Annotated[Real, Field(ge=0, le=1)] = Field(0.5, description=(
        "EMB share of the pool at the start"))
    min_emb_fraction: Annotated[Real, Field(ge=0, le=1)] = Field(0.0, description=(
        "smallest EMB share the controller may set"))
    max_emb_fraction: Annotated[Real, Field(ge=0, le=1)] = Field(1.0, description=(
        "largest EMB share the controller may set"))
    hold_s: Annotated[NonNegFloat, Field(le=MAX_DURATION_S)] = Field(5.0, description=(
        "warm-up before the controller first moves the boundary"))

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_emb_fraction <= self.start_emb_fraction <= self.max_emb_fraction:
            raise ValueError(f"need min_emb_fraction <= start_emb_fraction <= max_emb_fraction "
                             f"(got {self.min_emb_fraction}, {self.start_emb_fraction}, "
                             f"{self.max_emb_fraction})")
        return self


class StaticPartition(Strict):
    kind: Literal["static"] = Field(description="a fixed split of the pool")
    emb_fraction: Annotated[Real, Field(ge=0, le=1)] = Field(description="share of the pool for EMB")


class MarginalPartition(Bounds):
    """Hill-climbing: every interval, move step_fraction of the pool to the side whose next
    bytes would save the most time (EMB: the Che curve's slope at the observed hit ratio;
    KV: reuses observed just beyond the capacity, from a ghost list of evicted prefixes),
    if that beats what the other side loses. The step doubles for every interval in a row
    whose ranking SLO misses exceed slo_miss_target."""

    kind: Literal["marginal"] = Field(description=(
        "hill-climbing controller: move the boundary step by step toward the larger marginal gain"))
    interval_ms: Ms = Field(1000.0, description="time between the controller's decisions")
    step_fraction: Annotated[Real, Field(gt=0, le=0.5)] = Field(0.02, description=(
        "share of the pool one step moves (doubled in a row of SLO-missing intervals)"))
    memory: Annotated[Real, Field(ge=0, lt=1)] = Field(0.5, description="weight of past intervals (EWMA)")
    slo_miss_target: Annotated[Real, Field(ge=0, le=1)] = Field(0.01, description=(
        "share of rankings over budget in an interval above which the step doubles"))


class MissCurvePartition(Bounds):
    """Jump to the best split: every interval, rebuild both caches' saved-time curves over
    the whole range of splits (EMB from the Che curve, KV from the reuse depths of recent
    prefix references and the ghost list) and move the boundary to the split that
    minimises the predicted miss time, by at most max_step_fraction. It moves only for a
    predicted gain over min_gain of the time at stake, unless the interval missed its SLO
    (more than slo_miss_target of rankings over budget), when any gain will do."""

    kind: Literal["miss_curve"] = Field(description=(
        "miss-curve controller: jump to the split that minimises the predicted miss time"))
    interval_ms: Ms = Field(250.0, description="time between the controller's decisions")
    max_step_fraction: Annotated[Real, Field(gt=0, le=1)] = Field(0.25, description=(
        "largest share of the pool one decision moves"))
    memory: Annotated[Real, Field(ge=0, lt=1)] = Field(0.5, description=(
        "weight of past intervals (EWMA)"))
    min_gain: Annotated[Real, Field(ge=0)] = Field(0.02, description=(
        "smallest predicted gain, as a fraction of the time at stake, worth a move (ignored after"
        " an SLO-missing interval)"))
    slo_miss_target: Annotated[Real, Field(ge=0, le=1)] = Field(0.01, description=(
        "share of rankings over budget above which an interval counts as missing its SLO"))


Partition = Annotated[Union[StaticPartition, MarginalPartition, MissCurvePartition],
                      Field(discriminator="kind")]


class Resize(Strict):
    emb_refill_gbps: Gbps = Field(
        8.0, description="growing EMB refills its new rows asynchronously at this rate")


class Hbm(Strict):
    """One HBM pool per device of the relay stage: weights, an activation reserve, and the
    rest split between the embedding cache (EMB) and the prefix KV cache."""

    weights_bytes: Annotated[Int, Field(ge=0)] = Field(description=(
        "HBM held by the model weights; accepts units, e.g. 10GB"))
    activation_reserve_bytes: Annotated[Int, Field(ge=0)] = Field(description=(
        "HBM kept free for activations; accepts units, e.g. 10GB"))
    partition: Partition = Field(description=(
        "how the rest is split between EMB and the prefix KV cache: static or an adaptive "
        "controller"))
    resize: Resize = Field(Resize(), description="how a growing EMB side refills")
    ghost_fraction: Annotated[Real, Field(ge=0, le=4)] = Field(
        1.0, description="adaptive controllers: bytes of evicted prefixes remembered, as a "
                         "fraction of the pool (how far beyond the KV side they can see reuse)")

    def bounds(self) -> tuple[float, float, float]:
        """(start, min, max) EMB fraction of the pool."""
        p = self.partition
        if isinstance(p, StaticPartition):
            return p.emb_fraction, p.emb_fraction, p.emb_fraction
        return p.start_emb_fraction, p.min_emb_fraction, p.max_emb_fraction


class SLO(Strict):
    p99_ms: Ms = Field(description="end-to-end latency budget")
    stage_p99_ms: dict[str, Ms] = Field({}, description="per-stage P99 budgets, by stage name")


class RunControl(Strict):
    engine: Literal["simpy", "fast", "auto"] = Field(
        "auto", description="simulation engine: simpy (the reference), fast (stage by stage, byte-identical; "
                            "declines with a reason and SimPy runs), auto (fast wherever exact)")
    duration_s: Annotated[PosFloat, Field(le=MAX_DURATION_S)] | None = Field(None, description=(
        "simulated arrival span per replication (give this or requests)"))
    requests: Annotated[PosInt, Field(le=MAX_REQUESTS)] | None = Field(None, description=(
        "requests per replication (give this or duration_s)"))
    warmup_s: Annotated[NonNegFloat, Field(le=MAX_DURATION_S)] | None = Field(
        None, description="default: 10% of the run (by time, or by requests); less than duration_s")
    replications: Annotated[PosInt, Field(le=MAX_REPLICATIONS)] = Field(
        5, description="replications to run (the minimum, with a target)")
    p99_halfwidth_rel: Annotated[Real, Field(gt=0, lt=1)] | None = Field(
        None, description="stopping rule: add replications until the end-to-end P99's CI "
                          "half-width is under this fraction of the P99 and the run holds at "
                          "least 5 effectively independent samples beyond it, judged from 10 "
                          "replications or more (or max_replications)")
    max_replications: Annotated[PosInt, Field(le=MAX_REPLICATIONS)] = Field(40, description=(
        "most replications the p99_halfwidth_rel stopping rule may run"))
    seed: Annotated[Int, Field(ge=0)] = Field(1, description=(
        "random seed: the same seed and scenario give the same bytes"))
    sample_interval_ms: Ms | None = Field(
        None, description="default: run length / 200; at most 1,000,000 samples per replication")

    @model_validator(mode="after")
    def _one_length(self):
        if self.duration_s is not None and self.requests is not None:
            raise ValueError("give duration_s or requests, not both")
        if self.p99_halfwidth_rel is not None and self.replications < 2:
            raise ValueError("replications must be >= 2 with a p99_halfwidth_rel target")
        if self.max_replications < self.replications:
            raise ValueError("max_replications must be >= replications")
        return self


class Scenario(Strict):
    name: str = Field(min_length=1, max_length=200,
                      description="1-200 characters, no control characters; the default "
                                  "results folder is named after it")
    description: str = Field("", description=(
        "free text, shown in reports and `simrec list scenarios`"))
    workload: Workload = Field(description="the offered load: arrivals, users, candidates")
    devices: dict[str, DeviceSpec] = Field({}, description=(
        "custom devices by key, for nodes.device (besides the presets: simrec list devices)"))
    stages: dict[str, Stage] = Field(min_length=1, description=(
        "the cascade's stages, in request order (e.g. retrieval, preprocess, ranking)"))
    slo: SLO = Field(description="latency budgets: end to end and per stage")
    relay: Relay | None = Field(None, description=(
        "RelayGR pre-inference on one stage (omit for none)"))
    hbm: Hbm | None = Field(None, description=(
        "a shared HBM pool split between EMB and KV caches on the relay stage (HELM; needs relay "
        "and embedding)"))
    embedding: Embedding | None = Field(None, description=(
        "the ranking model's embedding lookups, cached in the hbm pool (needs hbm)"))
    run: RunControl = Field(RunControl(), description=(
        "run control: length, replications, seed, engine"))

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError(f"must not contain control characters (got {name!r})")
        return name

    @model_validator(mode="after")
    def _cross_refs(self):
        known = ", ".join([*PRESETS, *self.devices])
        for name in self.stages:
            if not _STAGE_NAME.match(name):
                raise ValueError(f"stages.{name}: a stage name is letters, digits, '_' and '-' "
                                 f"(it is part of field paths and metric names), got {name!r}")
        for name, stage in self.stages.items():
            if stage.nodes.device not in self.devices and stage.nodes.device not in PRESETS:
                raise ValueError(f"stages.{name}.nodes.device: unknown device "
                                 f"{stage.nodes.device!r} (known: {known})")
            dev = getattr(stage.service, "device", None)
            if dev is not None and dev not in self.devices and dev not in PRESETS:
                raise ValueError(f"stages.{name}.service.device: unknown device {dev!r} (known: {known})")
            measured = _table_device(stage.service.table) if isinstance(
                stage.service, (TableService, GRService, KernelsService)) else None
            node = stage.nodes.device
            if measured is not None and node in PRESETS and node not in self.devices and measured != node:
                raise ValueError(f"stages.{name}.service.table: measured on {measured}, but the "
                                 f"stage's nodes are {node}; set nodes.device: {measured}, or "
                                 f"carry the table over with kind: roofline, fit_from")
        for name in self.slo.stage_p99_ms:
            if name not in self.stages:
                raise ValueError(f"slo.stage_p99_ms.{name}: no stage named {name!r}")
        arrivals = self.workload.arrivals
        is_trace = isinstance(arrivals, TraceArrivals)
        if not is_trace and self.run.duration_s is None and self.run.requests is None:
            raise ValueError("run: give duration_s or requests")
        run = self.run
        if run.warmup_s is not None and run.duration_s is not None and run.warmup_s >= run.duration_s:
            raise ValueError(f"run.warmup_s: must be < run.duration_s ({run.duration_s:g} s), or no "
                             f"request would be measured (got {run.warmup_s:g})")
        if (isinstance(arrivals, PiecewiseArrivals) and arrivals.steps[-1].factor == 0
                and self.run.requests is not None):
            raise ValueError("run.requests: piecewise arrivals end at factor 0, so the count may "
                             "never be reached; give run.duration_s instead")
        if self.relay is not None:
            self._check_relay(self.relay)
        for name, stage in self.stages.items():
            if stage.history_store is not None and stage.router == "delay":
                raise ValueError(f"stages.{name}.history_store: a delay stage has no nodes to hold "
                                 f"a store; use a queueing router")
            if stage.history_store is not None and self.relay is not None and self.relay.stage == name:
                raise ValueError(f"stages.{name}.history_store: not modelled on the relay stage; put "
                                 f"it on a stage before it (pre-processing)")
            if stage.router == "hbm_aware" and (self.relay is None or self.relay.stage != name):
                raise ValueError(f"stages.{name}.router: hbm_aware routes a relay stage "
                                 f"(needs a relay block with stage {name!r})")
        self._check_hbm()
        return self

    def _check_relay(self, relay: Relay) -> None:
        names = list(self.stages)
        if relay.stage not in self.stages:
            raise ValueError(f"relay.stage: no stage named {relay.stage!r}")
        stage = self.stages[relay.stage]
        if stage.service.kind not in ("gr", "roofline", "kernels"):
            raise ValueError(f"relay.stage: stage {relay.stage!r} needs service kind 'gr', "
                             f"'roofline' or 'kernels' (phase costs)")
        if stage.router in ("shared", "delay"):
            raise ValueError(f"stages.{relay.stage}.router: a relay stage needs per-instance queues")
        before = names[:names.index(relay.stage)]
        if relay.signal_after != "arrival" and relay.signal_after not in before:
            raise ValueError(f"relay.signal_after: must be 'arrival' or a stage before "
                             f"{relay.stage!r} ({', '.join(before) or 'none'}), got {relay.signal_after!r}")
        device = self.device(stage.nodes.device)
        if relay.cache.hbm_bytes is None and self.hbm is None:
            raise ValueError("relay.cache.hbm_bytes: required (or give an hbm block, whose pool "
                             "sets the KV side)")
        if relay.cache.hbm_bytes is not None and self.hbm is not None:
            raise ValueError("relay.cache.hbm_bytes: must not be set with an hbm block (the KV "
                             "side is the pool minus the EMB side)")
        if relay.cache.hbm_bytes is not None and relay.cache.hbm_bytes > device.hbm_bytes:
            raise ValueError(f"relay.cache.hbm_bytes: {relay.cache.hbm_bytes} exceeds the "
                             f"{device.name} HBM ({device.hbm_bytes} bytes)")
        one = _one_prefix_bytes(self.workload, stage.service)
        if relay.cache.hbm_bytes is not None and one is not None and relay.cache.hbm_bytes < one[0]:
            raise ValueError(f"relay.cache.hbm_bytes: {relay.cache.hbm_bytes} bytes cannot hold one "
                             f"prefix of the {one[1]} history ({one[0]} bytes)")
        if relay.expander.dram_bytes > device.host_dram_bytes:
            raise ValueError(f"relay.expander.dram_bytes: {relay.expander.dram_bytes} exceeds the "
                             f"host DRAM ({device.host_dram_bytes} bytes)")

    def _check_hbm(self) -> None:
        hbm, emb = self.hbm, self.embedding
        if hbm is None and emb is None:
            return
        if hbm is None:
            raise ValueError("embedding: needs an hbm block (the embedding cache lives in its pool)")
        if emb is None:
            raise ValueError("hbm: needs an embedding block (what the EMB side caches)")
        if self.relay is None:
            raise ValueError("hbm: needs a relay block (the KV side is the relay's prefix cache)")
        stage = self.stages[self.relay.stage]
        device = self.device(stage.nodes.device)
        fixed = hbm.weights_bytes + hbm.activation_reserve_bytes
        if fixed >= device.hbm_bytes:
            raise ValueError(f"hbm.weights_bytes: weights ({hbm.weights_bytes}) + activation reserve "
                             f"({hbm.activation_reserve_bytes}) leave no pool in the "
                             f"{device.name} HBM ({device.hbm_bytes} bytes)")
        pool = device.hbm_bytes - fixed
        _, lo, _ = hbm.bounds()
        if emb.gather == "table" and stage.service.kind != "gr":
            raise ValueError("embedding.gather: 'table' needs a gr service on the relay stage "
                             "(its table's emb_gather phase); use 'none'")
        longest = _longest_history(self.workload)
        kv_per_token = _kv_bytes_per_token(stage.service)
        if longest is not None and kv_per_token is not None:
            need = longest * kv_per_token
            kv_max = int(pool - lo * pool)
            if need > kv_max:
                field = ("emb_fraction" if isinstance(hbm.partition, StaticPartition)
                         else "min_emb_fraction")
                raise ValueError(
                    f"hbm.partition.{field}: the largest KV side ({kv_max / 1e9:.3g} GB of a "
                    f"{pool / 1e9:.3g} GB pool) cannot hold one prefix of the longest history "
                    f"({longest} tokens x {kv_per_token} B = {need / 1e9:.3g} GB)")

    def device(self, name: str) -> DeviceSpec:
        if name in self.devices:
            return self.devices[name]
        return DeviceSpec(**PRESETS[name])


_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _one_prefix_bytes(workload: Workload, service) -> tuple[int, str] | None:
    """KV bytes of one prefix, (bytes, which history): the longest history where the scenario
    bounds it, else the mean; None where unknown without running (traces, unknown KV size)."""
    kv = _kv_bytes_per_token(service)
    if kv is None or isinstance(workload.arrivals, TraceArrivals):
        return None
    longest = _longest_history(workload)
    if longest is not None:
        return longest * kv, "longest"
    users, dist = workload.users, workload.users.history_len
    mean = dist.mean if isinstance(dist, LognormalDist) else None
    if mean is None:
        return None
    mean = max(mean, users.min_history_len)
    return int(mean * kv), "mean"


def _longest_history(workload: Workload) -> int | None:
    """The longest history a workload can generate, where the scenario bounds it."""
    users = workload.users
    if isinstance(workload.arrivals, TraceArrivals):
        return None
    if users.max_history_len is not None:
        return users.max_history_len
    dist = users.history_len
    if isinstance(dist, ConstantDist):
        return max(int(round(dist.value)), users.min_history_len)
    if isinstance(dist, UniformDist):
        return max(int(round(dist.high)), users.min_history_len)
    if isinstance(dist, EmpiricalDist):
        return max(int(round(max(dist.values))), users.min_history_len)
    return None


def _kv_bytes_per_token(service) -> int | None:
    """Prefix KV bytes per token as the relay will use them, if known without running:
    the service's own field, the roofline model's shape, or the cost table's manifest."""
    if getattr(service, "kv_bytes_per_token", None):
        return service.kv_bytes_per_token
    if isinstance(service, RooflineService):
        m = service.model
        return m.layers * 2 * m.d_model * m.dtype_bytes
    if isinstance(service, GRService):
        return _manifest_kv_bytes(service.table)
    if isinstance(service, KernelsService):
        m = service.model
        return m.layers * 2 * m.d_model * (4 if m.dtype == "float32" else 2)
    return None


@lru_cache(maxsize=64)
def _manifest_kv_bytes(table: str) -> int | None:
    """kv_bytes_per_token from a table's manifest; None if it cannot be read here (the run's
    table loader then reports the table problem itself)."""
    try:
        value = _manifest(table).get("model", {}).get("kv_bytes_per_token")
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


@lru_cache(maxsize=64)
def _table_device(table: str) -> str | None:
    """The device preset a cost table was measured on, from its manifest's device name; None
    for an unknown device or an unreadable manifest (the table loader reports that itself)."""
    from .roofline import PRESET_NAMES
    try:
        device = _manifest(table).get("device", {})
        name, kind = str(device.get("name", "")).lower(), device.get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    if kind == "cpu":
        return "cpu"
    return next((preset for key, preset in PRESET_NAMES if key in name), None)


def _manifest(table: str) -> dict:
    """A table's manifest as read by the guarded reader ({} if it is not readable JSON)."""
    import json

    from simrec.calibration.table import resolve

    from .errors import InputError
    from .tabular import read_text
    try:
        data = json.loads(read_text(resolve(table), "manifest"))
    except (InputError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
