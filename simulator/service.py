"""Service-time models: one call gives the time (ms) one job of shape (L, M) takes.

Every model draws from its own numpy Generator, in blocks, so a run is reproducible and
drawing is cheap. Each model answers `sample(L, M)`; a stage combines the draws of a
batch's jobs (see `stage.batch_service_ms`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from . import scenario as sc
from .errors import InputError

_BLOCK = 4096


class ServiceTime(Protocol):
    def sample(self, L: int, M: int) -> float: ...


class Draws:
    """Yields draws from `fill(rng, n)` one at a time, refilled in blocks of _BLOCK.
    (`it`, the current block's iterator, is there for callers that take a draw in line:
    `for v in draws.it: break` / `else: v = draws.next()`.)"""

    __slots__ = ("_rng", "_fill", "it")

    def __init__(self, rng: np.random.Generator, fill: Callable[[np.random.Generator, int], np.ndarray]):
        self._rng, self._fill = rng, fill
        self.it = iter(())

    def next(self) -> float:
        for v in self.it:
            return v
        self.it = iter(self._fill(self._rng, _BLOCK).tolist())
        return next(self.it)


class Constant:
    def __init__(self, ms: float):
        self.ms = ms
        self.mean_ms = ms

    def sample(self, L: int, M: int) -> float:
        return self.ms


class FromDistribution:
    """Shape-independent i.i.d. draws (exponential, lognormal, empirical)."""

    def __init__(self, draws: Draws, mean_ms: float):
        self._draws = draws
        self.mean_ms = mean_ms

    def sample(self, L: int, M: int) -> float:
        for v in self._draws.it:
            return v
        return self._draws.next()


class FromTable:
    """Draws from a measured phase curve at the job's shape (a `table` service).

    The lookup memo belongs to this object, i.e. to one replication: a table outlives runs,
    its lookups' memo must not (a warm memo would make the next run look faster)."""

    def __init__(self, curve, rng: np.random.Generator, extrapolate: bool, where: str):
        self.curve = curve
        self._u = Draws(rng, lambda r, n: r.uniform(0, 1, n))
        self._memo = curve.new_memo()
        self.extrapolate = extrapolate
        self.where = where

    def check(self, L: np.ndarray, M: np.ndarray) -> int:
        return check_shapes(self.curve, L, M, self.extrapolate, self.where)

    def sample(self, L: int, M: int) -> float:
        for u in self._u.it:
            break
        else:
            u = self._u.next()
        return self.curve.sample_ms(L, M, u, self._memo)

    def median(self, name: str, L: int, M: int = 0) -> float:
        """The curve's median at (L, M) (one curve: the phase name is the service's)."""
        return self.curve.median_ms(L, M, self._memo)


# The phases one ranking costs, per architecture (the serving path; calibration/FORMAT.md).
SERVING_PATH = {"transformer": ("full_forward",), "hstu": ("full_forward",),
                "stca": ("stca_history_encode", "stca_target_attend"),
                "stca/per_target": ("stca_per_target",),
                "laser": ("laser_history_encode", "laser_sta_rank"),
                "vista": ("vista_rank_summary",)}
RELAY_ARCHS = ("transformer", "hstu")


def serving_arch(table, arch: str | None, rlb: bool, where: str) -> str:
    """The key of SERVING_PATH for a table and a service's `arch` / `rlb`."""
    have = str(table.manifest.model.get("arch", "transformer"))
    if arch is not None and arch != have:
        raise InputError(f"arch {arch!r} does not match the table's model arch {have!r}",
                         str(table.path), f"{where}.arch")
    if have not in SERVING_PATH:
        raise InputError(f"the table's model arch {have!r} has no serving path "
                         f"(known: {', '.join(a for a in SERVING_PATH if '/' not in a)})", str(table.path))
    return "stca/per_target" if have == "stca" and not rlb else have


class GRPhases:
    """A GR ranking model's phase costs from one table (one draw stream for all phases).

    `sample(L, M)` is one ranking along the architecture's serving path (transformer and
    HSTU: the full forward pass, so a GR stage without relay behaves like a table stage);
    the relay asks for single phases and for medians (its predictions). A VISTA model adds
    its summary store: `refresh(batch, now)` is the stale summaries' critical-path time.
    """

    RELAY_PHASES = ("prefix_encode", "rank_cached", "prefix_reload")

    def __init__(self, table, condition: str, rng: np.random.Generator, extrapolate: bool,
                 where: str, kv_bytes_per_token: int | None, relay: bool,
                 arch: str | None = None, rlb: bool = True, summary=None):
        self.arch = serving_arch(table, arch, rlb, where)
        if relay and self.arch not in RELAY_ARCHS:
            raise InputError(f"relay needs a transformer or hstu table (prefix K/V phases); "
                             f"this table's arch is {self.arch!r}", None, where)
        self.path = SERVING_PATH[self.arch]
        phases = (*self.path, *self.RELAY_PHASES) if relay else self.path
        if self.arch == "vista":
            phases = (*phases, "vista_summarize")
        try:
            self.curves = {p: table.curve(p, condition) for p in phases}
        except InputError as e:
            raise InputError(e.message, e.source, where) from None
        if self.arch == "vista":
            from .scenario import SummaryStore
            self.summary = summary or SummaryStore()
            model = table.manifest.model
            k, d = int(model.get("summary_tokens", 128)), int(model.get("d_model", 1024))
            nbytes = k * d * (4 if model.get("dtype") == "float32" else 2)
            self.fetch_ms = self.summary.fetch_latency_ms + nbytes / (self.summary.fetch_gbps * 1e9) * 1e3
            self.summarised: dict[int, float] = {}      # user -> when its summary was computed
            self.stale = 0                               # stale or missing summaries met
            self.nearline_ms = 0.0                       # their recompute time, off the ranking path
            self.refresh = self._vista_refresh           # the stage workers' hook
        self.extrapolate, self.where = extrapolate, where
        self._u = Draws(rng, lambda r, n: r.uniform(0, 1, n))
        self._memos = {p: c.new_memo() for p, c in self.curves.items()}     # this replication's
        self.batch_scales = table.batch          # measured batch factors per phase (may be empty)
        self.kv_bytes_per_token = kv_bytes_per_token or table.manifest.model.get("kv_bytes_per_token")
        if relay and not self.kv_bytes_per_token:
            raise InputError("the table's model has no kv_bytes_per_token; set it on the service",
                             None, where)

    def check(self, L: np.ndarray, M: np.ndarray) -> int:
        zeros = np.zeros_like(M)
        return max(check_shapes(c, L, zeros if p in ("prefix_encode", "prefix_reload") else M,
                                self.extrapolate, self.where)
                   for p, c in self.curves.items())

    def sample(self, L: int, M: int) -> float:
        t = 0.0
        for p in self.path:
            t += self.curves[p].sample_ms(L, M, self._u.next(), self._memos[p])
        return t + self.fetch_ms if self.arch == "vista" else t

    def _vista_refresh(self, batch, now: float) -> float:
        """VISTA (as `refresh`): count the batch's stale or missing summaries; recompute them (their time
        on the critical path, or nearline); returns the critical-path time."""
        t, refresh_ms = 0.0, self.summary.refresh_s * 1e3
        for job in batch:
            when = self.summarised.get(job.user)
            if when is not None and now - when <= refresh_ms:
                continue
            self.stale += 1
            self.summarised[job.user] = now
            s = self.phase("vista_summarize", job.L)
            if self.summary.on_stale == "critical_path":
                t += s
            else:
                self.nearline_ms += s
        return t

    def phase(self, name: str, L: int, M: int = 0) -> float:
        return self.curves[name].sample_ms(L, M, self._u.next(), self._memos[name])

    def median(self, name: str, L: int, M: int = 0) -> float:
        return self.curves[name].median_ms(L, M, self._memos[name])

    def prefix_bytes(self, L: int) -> int:
        return int(L * self.kv_bytes_per_token)


def check_shapes(curve, L: np.ndarray, M: np.ndarray, extrapolate: bool, where: str) -> int:
    """How many of these shapes lie outside the curve's grid; an error unless extrapolation is on."""
    outside = curve.outside(L, M)
    if outside.any() and not extrapolate:
        i = int(np.argmax(outside))
        raise InputError(
            f"shape L={L[i]} M={M[i]} is outside the table grid (L {_span(curve.history_len)}, "
            f"M {_span(curve.candidates)}); set extrapolate: true or bound the workload",
            None, where)
    return int(outside.sum())


def _span(grid) -> str:
    return f"{int(grid[0])}..{int(grid[-1])}"


def build(model: sc.ServiceModel, rng: np.random.Generator, where: str,
          relay: bool = False, device: sc.DeviceSpec | None = None) -> ServiceTime:
    """The runtime service-time model for a scenario's `service` block (under its serving
    profile, if it names one)."""
    base = _build(model, rng, where, relay, device)
    profile = getattr(model, "profile", None)
    if profile is None:
        return base
    from simrec.calibration.table import load_table
    from .serving_profile import InServing, load, reference_medians
    try:
        prof = load(profile)
    except InputError as e:
        raise InputError(e.message, e.source, f"{where}.profile" + (f" {e.path}" if e.path else "")) from None
    reference = reference_medians(load_table(model.table))
    return InServing(base, prof, rng, reference, getattr(model, "phase", "full_forward"))


def _build(model: sc.ServiceModel, rng: np.random.Generator, where: str,
           relay: bool, device: sc.DeviceSpec | None) -> ServiceTime:
    if isinstance(model, sc.ConstantService):
        return Constant(model.ms)
    if isinstance(model, sc.ExponentialService):
        mean = model.mean_ms
        return FromDistribution(Draws(rng, lambda r, n: r.exponential(mean, n)), mean)
    if isinstance(model, sc.LognormalService):
        sigma2 = float(np.log1p(model.cv**2))
        mu = float(np.log(model.mean_ms)) - sigma2 / 2
        return FromDistribution(Draws(rng, lambda r, n: r.lognormal(mu, np.sqrt(sigma2), n)),
                                model.mean_ms)
    if isinstance(model, sc.EmpiricalService):
        samples = np.asarray(model.samples_ms, float)
        return FromDistribution(Draws(rng, lambda r, n: r.choice(samples, n)), float(samples.mean()))
    if isinstance(model, sc.TableService):
        from simrec.calibration.table import load_table
        try:
            curve = load_table(model.table).curve(model.phase, model.condition)
        except InputError as e:
            raise InputError(e.message, e.source, where) from None
        return FromTable(curve, rng, model.extrapolate, where)
    if isinstance(model, sc.GRService):
        from simrec.calibration.table import load_table
        try:
            table = load_table(model.table)
        except InputError as e:
            raise InputError(e.message, e.source, where) from None
        return GRPhases(table, model.condition, rng, model.extrapolate, where,
                        model.kv_bytes_per_token, relay, model.arch, model.rlb, model.summary)
    if isinstance(model, sc.RooflineService):
        from .roofline import RooflinePhases
        return RooflinePhases.from_config(model, device, rng, where)
    if isinstance(model, sc.KernelsService):
        from .kernel_model import KernelPhases
        return KernelPhases.from_config(model, rng, where)
    raise TypeError(model)
