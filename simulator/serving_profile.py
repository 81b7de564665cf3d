"""A serving profile: how a cost table's jobs run in serving, fitted from a serving log.

A cost table holds isolated microbenchmarks. In serving the same job takes longer, for two
kinds of reason that the profile keeps apart:

- an **in-serving excess**, per job: launches, input copies, the host's bookkeeping, a GPU
  that clocked down while it idled. It is additive (it does not grow with the work) and is
  kept as quantiles per phase, per size class of the job's table median (host-bound shapes
  carry more of it) and per idle bin (how long the device had idled when the job arrived);
- **slow episodes**: spells of seconds in which jobs run slower, represented as an
  `Interference` config (`interference.py`), the same thing a scenario can declare by hand,
  plus per size class an elasticity: a job runs factor ** elasticity slower (on a host-bound
  server a slow host stretches the short, host-bound jobs and hardly the long GPU-bound ones;
  a declared block stretches every job by the factor).

`simrec fit` writes a profile (`profile_fit.py`); a `table` or `gr` service uses one with
`profile: FILE`. Each job then costs (reference median + drawn excess) x level x the node's
episode factor ** elasticity, the reference being the table's idle_gap curve where it has
one, and the level a replication's draw of the between-run level of the job's cell (1 for
a profile fitted without other logs). The profile replaces the table's own isolated noise, which is part of
the excess.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import scenario as sc
from .errors import InputError

FORMAT = "simrec-serving-profile"
VERSION = 1
IDLE_EDGES_MS = (0.0, 0.5, 2.0, 10.0)   # idle bins: queued, <=0.5, <=2, <=10, longer
ALL = "*"                               # the pool over all phases (phases the fit never saw)


def idle_bin(idle_ms: float) -> int:
    """0: the job queued (no idle); k: idle in (IDLE_EDGES_MS[k-1], IDLE_EDGES_MS[k]]."""
    return bisect.bisect_left(IDLE_EDGES_MS, idle_ms)


RANGE = 1.25      # a phase's pools serve table medians within this factor of those it was fitted on


@dataclass
class PhaseExcess:
    """Excess quantiles of one phase: pools keyed (size class, idle bin); -1 = any. Per size
    class, `elasticity`: how a slow episode reaches this class's jobs (factor ** elasticity;
    a GPU-bound job of a host-bound server barely feels a host slowdown)."""

    base_edges_ms: list[float]              # size classes: bisect of the job's table median
    base_range_ms: tuple[float, float]      # the table medians the phase was fitted on
    pools: dict[tuple[int, int], np.ndarray]
    elasticity: dict[int, float]

    def size_class(self, base_ms: float) -> int | None:
        lo, hi = self.base_range_ms
        if not lo / RANGE <= base_ms <= hi * RANGE:
            return None                     # another size than fitted: leave it to the all-phase pools
        return bisect.bisect_right(self.base_edges_ms, base_ms)

    def pool(self, base_ms: float, idle_ms: float) -> np.ndarray | None:
        b = self.size_class(base_ms)
        if b is None:
            return None
        got = self.pools.get((b, idle_bin(idle_ms)))
        return got if got is not None else self.pools.get((b, -1))


@dataclass
class Profile:
    quantiles: np.ndarray                   # the probability grid every pool is stored on
    phases: dict[str, PhaseExcess]          # phase name (or ALL) -> its excess
    episodes: sc.Interference | None        # None: the fit found no slow episodes
    info: dict                              # provenance and fit diagnostics, as written

    def pool(self, phase: str, base_ms: float, idle_ms: float) -> tuple[np.ndarray, float]:
        """The excess pool of a job and its episode elasticity (see `find`)."""
        pool, elasticity, _, _ = self.find(phase, base_ms, idle_ms)
        return pool, elasticity

    def cell(self, phase: str, base_ms: float, idle_ms: float) -> tuple[np.ndarray, float, str]:
        """`pool`, and the name of the job's cell ("phase|size class", the key of between-run
        levels)."""
        pool, elasticity, name, b = self.find(phase, base_ms, idle_ms)
        return pool, elasticity, f"{name}|{b}"

    def find(self, phase: str, base_ms: float, idle_ms: float) -> tuple[np.ndarray, float, str, int]:
        """The excess pool of a job, its episode elasticity and its cell (pool's phase name,
        size class): its phase's pool, else the all-phase pool of its size class and idle
        bin, else the all-phase pool of every job (key (-1, -1)); the all-phase classes
        extend to any size (the nearest class)."""
        for name in (phase, ALL):
            ex = self.phases.get(name)
            got = ex.pool(base_ms, idle_ms) if ex is not None else None
            if got is not None:
                b = ex.size_class(base_ms)
                return got, ex.elasticity.get(b, 1.0), name, b
        ex = self.phases[ALL]
        b = bisect.bisect_right(ex.base_edges_ms, base_ms)
        got = ex.pools.get((b, idle_bin(idle_ms)))
        got = got if got is not None else ex.pools.get((b, -1))
        return (got if got is not None else ex.pools[(-1, -1)]), ex.elasticity.get(b, 1.0), ALL, b

    # ------------------------------------------------------------------ file
    def to_json(self) -> dict:
        phases = {name: {"base_edges_ms": ex.base_edges_ms, "base_range_ms": list(ex.base_range_ms),
                         "elasticity": {str(b): round(e, 4) for b, e in sorted(ex.elasticity.items())},
                         "pools": {f"{b}|{i}": [round(float(v), 5) for v in q]
                                   for (b, i), q in sorted(ex.pools.items())}}
                  for name, ex in sorted(self.phases.items())}
        ep = None if self.episodes is None else self.episodes.model_dump(mode="json")
        return {"format": FORMAT, "version": VERSION, **self.info,
                "excess_ms": {"quantiles": [round(float(q), 6) for q in self.quantiles],
                              "idle_edges_ms": list(IDLE_EDGES_MS), "phases": phases},
                "episodes": ep}

    @classmethod
    def from_json(cls, data: dict, source: str) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"not a serving profile (no \"format\": \"{FORMAT}\")", source)
        if data.get("version") != VERSION:
            raise InputError(f"serving profile version {data.get('version')!r} is not {VERSION}", source,
                             "version")
        try:
            ex = data["excess_ms"]
            q = np.asarray(ex["quantiles"], float)
            phases = {}
            for name, p in ex["phases"].items():
                pools = {}
                for key, vals in p["pools"].items():
                    b, i = (int(x) for x in key.split("|"))
                    v = np.asarray(vals, float)
                    if v.shape != q.shape or not np.all(np.isfinite(v)) or np.any(np.diff(v) < 0):
                        raise ValueError(f"pool {name} {key}: need {len(q)} finite ascending values")
                    pools[(b, i)] = v
                lo, hi = (float(x) for x in p["base_range_ms"])
                el = {int(b): float(e) for b, e in p["elasticity"].items()}
                if not (0 < lo <= hi) or any(not 0 <= e <= 10 for e in el.values()):
                    raise ValueError(f"phase {name}: need 0 < base_range_ms and elasticities in [0, 10]")
                phases[name] = PhaseExcess([float(e) for e in p["base_edges_ms"]], (lo, hi), pools, el)
            if ALL not in phases or (-1, -1) not in phases[ALL].pools:
                raise ValueError(f"no pool over all jobs (phase {ALL!r}, key '-1|-1')")
            if q.ndim != 1 or len(q) < 2 or q[0] != 0 or q[-1] != 1 or np.any(np.diff(q) <= 0):
                raise ValueError("quantiles must ascend from 0 to 1")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"malformed serving profile: {e}", source, "excess_ms") from None
        episodes = None
        if data.get("episodes") is not None:
            try:
                episodes = sc.Interference.model_validate(data["episodes"])
            except Exception as e:        # pydantic's ValidationError: one line is enough
                first = str(e).splitlines()[1:3]
                raise InputError(f"bad episodes block: {' '.join(s.strip() for s in first)}", source,
                                 "episodes") from None
        info = {k: v for k, v in data.items() if k not in ("format", "version", "excess_ms", "episodes")}
        if info.get("level") is not None:
            _check_level(info["level"], source)
        return cls(q, phases, episodes, info)


def _check_level(lv, source: str) -> None:
    """A between-run level block (profile_fit.with_levels): finite, modest log levels."""
    def real(x, hi=10.0) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) < hi
    try:
        ok = (all(real(x) for x in lv["centre_log"].values())
              and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                      for k in lv["runs_per_cell"].values())
              and set(lv["runs_per_cell"]) == set(lv["centre_log"])
              and all(lv.get(k) is None or real(lv[k]) and lv[k] >= 0 for k in ("sd_log", "spread_log"))
              and (lv.get("df") is None or isinstance(lv["df"], int) and 0 <= lv["df"] < 10**6))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise InputError("malformed between-run level: need centre_log and runs_per_cell (cell -> "
                         "finite log level, cell -> count >= 1, the same cells), sd_log and "
                         "spread_log (null or 0..10) and df (an integer)", source, "level")


def save(profile: Profile, path: Path) -> Path:
    from .folders import write_json_atomic
    write_json_atomic(Path(path), profile.to_json())
    return Path(path)


_LOADED: dict[tuple[str, str], Profile] = {}


def load(path: str | Path) -> Profile:
    """A profile file, memoised by path and content hash (sweeps load it once per process)."""
    p = Path(path)
    try:
        raw = p.read_bytes() if p.is_file() else None
    except OSError as e:
        raise InputError(f"cannot read serving profile: {e.strerror}", str(p)) from None
    if raw is None:
        raise InputError("serving profile not found (a file written by `simrec fit`)", str(p))
    key = (str(p.resolve()), hashlib.sha256(raw).hexdigest())
    if key not in _LOADED:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InputError(f"serving profile is not JSON: {e}", str(p)) from None
        except RecursionError:
            raise InputError("serving profile is nested too deeply to be one", str(p)) from None
        _LOADED.clear()
        _LOADED[key] = Profile.from_json(data, str(p))
    return _LOADED[key]


# ----------------------------------------------------------------------------- cost model

REFERENCE = "idle_gap"      # the table condition excess is measured from, where the table has it


def reference_medians(table):
    """`(phase, L, M) -> ms`: the table's median under REFERENCE (the device idle before each
    call: the in-serving-like condition the bench measures, which carries the machine's own
    wake-up and launch costs) where the table has that curve, else its isolated median. A
    profile's excess is fitted and applied over this reference, so a profile moved to
    another machine keeps that machine's measured in-serving level."""
    memo: dict[tuple, float] = {}

    def median(name: str, L: int, M: int = 0) -> float:
        key = (name, L, M)
        got = memo.get(key)
        if got is None:
            curve = table.curves.get((name, REFERENCE)) or table.curve(name)
            got = memo[key] = curve.median_ms(L, M)
        return got
    return median


def episodes_drawn(profile: Profile, rng: np.random.Generator) -> sc.Interference | None:
    """The profile's episode process for one replication, its fitted uncertainty drawn: the
    rate from its posterior given the episodes seen (Gamma, shape = their count, mean = the
    fitted rate) and the durations and slowdowns resampled (a bootstrap of the episodes). A
    profile fitted on a few episodes thus predicts with the spread its evidence allows."""
    ep = profile.episodes
    if ep is None:
        return None
    n = int(profile.info.get("fit", {}).get("episodes", 0))
    if n < 1:
        return ep
    rate = float(rng.gamma(n, ep.rate_per_min / n))
    update = {"rate_per_min": min(max(rate, 1e-6), 6000.0)}
    d, f = ep.duration_s, ep.slowdown
    if isinstance(d, sc.EmpiricalDist) and isinstance(f, sc.EmpiricalDist) and len(d.values) == len(f.values):
        k = rng.integers(0, len(d.values), len(d.values))        # the episodes, resampled as pairs
        update["duration_s"] = d.model_copy(update={"values": [d.values[i] for i in k], "weights": None})
        update["slowdown"] = f.model_copy(update={"values": [f.values[i] for i in k], "weights": None})
    return ep.model_copy(update=update)


def level_drawn(profile: Profile, rng: np.random.Generator) -> dict[str, float] | None:
    """One replication's between-run level (`profile_fit.with_levels`): per cell, the factor
    on its jobs' time, exp(centre + spread t), t one Student-t draw (the pooled degrees of
    freedom) shared by every cell: runs differ as a whole (the host's level). Cells without
    a level (phases the profile was not fitted on) keep 1. None without levels."""
    lv = profile.info.get("level")
    if not lv:
        return None
    spread, df = lv.get("spread_log"), lv.get("df") or 0
    t = float(rng.standard_t(df)) if spread is not None and df > 0 else 0.0
    return {"": 1.0, **{c: math.exp(float(m) + float(spread or 0.0) * t) for c, m in lv["centre_log"].items()}}


class InServing:
    """A stage's cost model under a profile: a phase costs its reference median (see
    `reference_medians`) plus an excess drawn for the phase, the median's size class and how
    long the node had idled. `median` (the relay's predictions) stays the isolated one.

    The workers call `bind(node, now)` before pricing a job: the excess depends on the node's
    state, which the table cost models never needed. Everything else (medians for the relay's
    predictions, prefix sizes, shape checks) is the wrapped model's."""

    def __init__(self, base, profile: Profile, rng: np.random.Generator, reference, phase: str = "full_forward"):
        from .service import Draws
        self.base, self.profile, self.default_phase = base, profile, phase
        self._reference = reference
        self.interference = episodes_drawn(profile, rng)
        self.level = level_drawn(profile, rng)
        self.episodes: list | None = None       # per node: the profile's episode timeline
        self._u = Draws(rng, lambda r, n: r.uniform(0, 1, n))
        self._idle, self._slow = math.inf, 1.0
        self._median = (base.median if hasattr(base, "median")
                        else lambda name, L, M=0: base.curve.median_ms(L, M))
        self._q = profile.quantiles
        for attr in ("curves", "kv_bytes_per_token", "curve", "batch_scales"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def bind(self, node, now: float) -> None:
        ends = node.busy_ends
        self._idle = max(now - ends[-1], 0.0) if ends else math.inf
        self._slow = self.episodes[node.index].factor_at(now) if self.episodes else 1.0

    def phase(self, name: str, L: int, M: int = 0) -> float:
        med = self._reference(name, L, M)
        pool, elasticity, cell, b = self.profile.find(name, med, self._idle)
        t = max(med + float(np.interp(self._u.next(), self._q, pool)), 1e-6)
        if self.level is not None:          # (the cell's name is built only for a level)
            t *= self.level.get(f"{cell}|{b}", self.level[""])
        return t * self._slow ** elasticity if self._slow != 1.0 else t

    def sample(self, L: int, M: int) -> float:
        return self.phase(self.default_phase, L, M)

    def median(self, name: str, L: int, M: int = 0) -> float:
        return self._median(name, L, M)

    def prefix_bytes(self, L: int) -> int:
        return self.base.prefix_bytes(L)

    def check(self, L, M) -> int:
        return self.base.check(L, M)
