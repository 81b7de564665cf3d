"""Cost tables: load, validate and interpolate measured service-time distributions.

The format is documented in FORMAT.md. Loading never needs torch. A table's curve for one
phase and condition is a grid over (history_len, candidates) of measured quantiles; a
shape between grid points is interpolated linearly in log(time) over log(shape), and a
service time is drawn by inverting the interpolated quantile curve.
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simrec.errors import InputError
from simrec.tabular import MAX_TABLE_BYTES, numeric, read_bytes, read_frame, read_text, row_error

TABLES_DIR = Path(__file__).parent / "tables"
PHASES = ("prefix_encode", "rank_cached", "full_forward", "prefix_reload", "emb_gather",
          "retrieval_score", "prerank_mlp",
          # the target-attention archs of calibration/arch_models.py (FORMAT.md)
          "stca_history_encode", "stca_target_attend", "stca_per_target",
          "vista_summarize", "vista_rank_summary",
          "laser_history_encode", "laser_sta_rank")
CONDITIONS = ("isolated", "idle_gap", "busy", "cache_pressure")
COLUMNS = ("phase", "condition", "history_len", "candidates", "quantile", "time_ms", "n_samples")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1]
    name: str
    label: Literal["measured", "illustrative"]
    table_file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    device: dict[str, Any]
    versions: dict[str, Any] = {}
    date: str
    model: dict[str, Any]
    grid: dict[str, list[int]]
    method: dict[str, Any] = {}
    errors: dict[str, Any] = {}


@dataclass
class PhaseCurve:
    """Measured quantiles of one phase over a (history_len, candidates) grid.

    Lookups run in pure Python with the same floating-point operations as the numpy
    formulation (`log_curves`, `sample_many`), so both give identical bits. Nothing is
    memoised on the curve itself, which outlives runs (tables are loaded once per process):
    a cost model passes a memo of its own (`new_memo()`, one per replication) to keep the
    weights and curves of shapes it meets again.
    """

    phase: str
    condition: str
    history_len: np.ndarray      # sorted grid values (a single 0 when the phase ignores L)
    candidates: np.ndarray
    quantiles: np.ndarray        # sorted, includes 0.5
    log_ms: np.ndarray           # shape (len(history_len), len(candidates), len(quantiles))
    _plain: tuple = field(default=(), repr=False, compare=False)

    MEMO_LIMIT = 1 << 14         # shapes a caller's memo holds before it starts over

    def __post_init__(self):
        lgL = np.log(self.history_len).tolist() if len(self.history_len) > 1 else []
        lgM = np.log(self.candidates).tolist() if len(self.candidates) > 1 else []
        cells = [[self.log_ms[i, j].tolist() for j in range(len(self.candidates))]
                 for i in range(len(self.history_len))]
        q = self.quantiles.tolist()
        # With every quantile curve of the grid non-decreasing, an interpolation between
        # grid points (weights >= 0) is non-decreasing too, in floating point as well: the
        # running maximum changes nothing and a draw needs only its two quantile points.
        monotone = bool(np.all(np.diff(self.log_ms, axis=2) >= 0))
        self._plain = (lgL, lgM, cells, q, q.index(0.5) if 0.5 in q else -1, monotone)

    def outside(self, L: np.ndarray, M: np.ndarray) -> np.ndarray:
        """Which of these shapes lie outside the grid (a single-value axis never limits)."""
        return ~(_within(np.asarray(L), self.history_len) & _within(np.asarray(M), self.candidates))

    def contains(self, L: float, M: float) -> bool:
        return not self.outside([L], [M])[0]

    # ------------------------------------------------------------------ scalar lookups
    @staticmethod
    def new_memo() -> tuple[dict, dict, dict]:
        """A memo for one caller (a cost model, for one replication): interpolation weights
        per L and per M, and monotone log curves per shape. Each holds at most MEMO_LIMIT
        entries, then starts over."""
        return {}, {}, {}

    def log_curve(self, L: float, M: float, memo: tuple | None = None) -> list[float]:
        """log(ms) at every recorded quantile for shape (L, M), monotone in the quantile
        (the running maximum, as np.maximum.accumulate: a NaN sticks)."""
        if memo is not None:
            got = memo[2].get((L, M))
            if got is not None:
                return got
        lgL, lgM, cells = self._plain[:3]
        wl = self._weights_of(L, lgL, memo[0] if memo is not None else None)
        wm = self._weights_of(M, lgM, memo[1] if memo is not None else None)
        out, acc = [], -math.inf
        if len(wl) == 2 and len(wm) == 2:          # the usual case, unrolled
            (i0, a0), (i1, a1) = wl
            (j0, b0), (j1, b1) = wm
            w0, w1, w2, w3 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
            r0, r1 = cells[i0], cells[i1]
            for x0, x1, x2, x3 in zip(r0[j0], r0[j1], r1[j0], r1[j1]):
                v = 0.0 + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
                if acc == acc and not v <= acc:
                    acc = v
                out.append(acc)
        else:
            terms = [(a * b, cells[i][j]) for i, a in wl for j, b in wm]
            for k in range(len(terms[0][1])):
                v = 0.0
                for w, c in terms:
                    v = v + w * c[k]
                if acc == acc and not v <= acc:
                    acc = v
                out.append(acc)
        if memo is not None:
            shapes = memo[2]
            if len(shapes) >= self.MEMO_LIMIT:
                shapes.clear()
            shapes[(L, M)] = out
        return out

    def _weights_of(self, v: float, lg: list[float], memo: dict | None) -> list[tuple[int, float]]:
        if memo is None:
            return self._plain_weights(v, lg)
        w = memo.get(v)
        if w is None:
            if len(memo) >= self.MEMO_LIMIT:
                memo.clear()
            w = memo[v] = self._plain_weights(v, lg)
        return w

    def quantile_ms(self, L: float, M: float) -> np.ndarray:
        """Interpolated quantile curve (ms) at shape (L, M); extrapolates linearly in log-log."""
        return np.exp(np.array(self.log_curve(L, M)))

    def _inside(self, L: float, M: float, memo: tuple | None) -> list | None:
        """[(weight, quantile values of a grid cell)] when (L, M) lies inside the grid (all
        weights >= 0) and the grid is monotone; None otherwise (take the whole curve)."""
        lgL, lgM, cells, _, _, monotone = self._plain
        if not monotone or (memo is not None and (L, M) in memo[2]):
            return None
        wl = self._weights_of(L, lgL, memo[0] if memo is not None else None)
        wm = self._weights_of(M, lgM, memo[1] if memo is not None else None)
        terms = []
        for i, a in wl:
            if not a >= 0:
                return None
            row = cells[i]
            for j, b in wm:
                if not b >= 0:
                    return None
                terms.append((a * b, row[j]))
        return terms

    @staticmethod
    def _at(terms: list, k: int) -> float:
        """The interpolated log time at quantile point k (the curve's own sum order)."""
        if len(terms) == 4:
            (w0, c0), (w1, c1), (w2, c2), (w3, c3) = terms
            return 0.0 + w0 * c0[k] + w1 * c1[k] + w2 * c2[k] + w3 * c3[k]
        v = 0.0
        for w, c in terms:
            v = v + w * c[k]
        return v

    def median_ms(self, L: float, M: float, memo: tuple | None = None) -> float:
        terms = self._inside(L, M, memo)
        if terms is not None:
            return math.exp(self._at(terms, self._plain[4]))
        return math.exp(self.log_curve(L, M, memo)[self._plain[4]])

    def sample_ms(self, L: float, M: float, u: float, memo: tuple | None = None) -> float:
        """Inverse-CDF draw: u in (0, 1) mapped through the measured quantiles.

        Between recorded quantiles the time is interpolated in log space; beyond the
        outermost recorded quantiles the distribution is truncated at them. (np.interp's
        arithmetic, written out: slope x (u - q_j) + y_j on the bracketing pair.)
        """
        lgL, lgM, cells, q, _, monotone = self._plain
        if u <= q[0]:
            j = k = 0
        elif u >= q[-1]:
            j = k = len(q) - 1
        else:
            j = bisect_right(q, u) - 1
            k = j + 1
        if monotone and len(lgL) and len(lgM):          # the usual 2 x 2 cell, written out
            if memo is not None:
                wl = memo[0].get(L)
                if wl is None:
                    wl = self._weights_of(L, lgL, memo[0])
                wm = memo[1].get(M)
                if wm is None:
                    wm = self._weights_of(M, lgM, memo[1])
            else:
                wl, wm = self._plain_weights(L, lgL), self._plain_weights(M, lgM)
            (i0, a0), (i1, a1) = wl
            (j0, b0), (j1, b1) = wm
            if a0 >= 0 and a1 >= 0 and b0 >= 0 and b1 >= 0:   # inside the grid
                w0, w1, w2, w3 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
                r0, r1 = cells[i0], cells[i1]
                c0, c1, c2, c3 = r0[j0], r0[j1], r1[j0], r1[j1]
                y0 = 0.0 + w0 * c0[j] + w1 * c1[j] + w2 * c2[j] + w3 * c3[j]
                if j == k:
                    return math.exp(y0)
                y1 = 0.0 + w0 * c0[k] + w1 * c1[k] + w2 * c2[k] + w3 * c3[k]
                return math.exp((y1 - y0) / (q[k] - q[j]) * (u - q[j]) + y0)
        terms = self._inside(L, M, memo)
        if terms is not None:
            y0 = self._at(terms, j)
            y1 = self._at(terms, k) if k != j else y0
        else:
            logs = self.log_curve(L, M, memo)
            y0, y1 = logs[j], logs[k]
        if j == k:
            return math.exp(y0)
        return math.exp((y1 - y0) / (q[k] - q[j]) * (u - q[j]) + y0)

    @staticmethod
    def _plain_weights(v: float, lg: list[float]) -> list[tuple[int, float]]:
        """Linear weights in log(v) between the two bracketing grid points (or edge pair),
        against a grid given as its logs (a list; empty for a single-value axis)."""
        n = len(lg)
        if n == 0:
            return [(0, 1.0)]
        x = math.log(max(v, 1e-9))
        i = min(max(bisect_left(lg, x) - 1, 0), n - 2)
        t = (x - lg[i]) / (lg[i + 1] - lg[i])
        return [(i, 1.0 - t), (i + 1, t)]

    @staticmethod
    def _array_weights(v: np.ndarray, grid: np.ndarray) -> list:
        """The weights for an array of values: [(grid index per value, weight per value)].
        The log of each distinct value is taken with math.log, as the scalar path does."""
        if len(grid) == 1:
            return [(0, np.ones(len(v)))]
        uniq, inv = np.unique(np.maximum(v, 1e-9), return_inverse=True)
        x = np.array([math.log(x) for x in uniq.tolist()])[inv]
        lg = np.log(grid)
        i = np.clip(np.searchsorted(lg, x) - 1, 0, len(grid) - 2)
        t = (x - lg[i]) / (lg[i + 1] - lg[i])
        return [(i, 1.0 - t), (i + 1, t)]

    # ------------------------------------------------------------------ vectorised
    def log_curves(self, L: np.ndarray, M: np.ndarray) -> np.ndarray:
        """`log_curve` for many shapes at once: shape (n, len(quantiles)), identical bits."""
        L, M = np.asarray(L, float), np.asarray(M, float)
        wl = self._array_weights(L, self.history_len)
        wm = self._array_weights(M, self.candidates)
        logs = np.zeros((len(L), len(self.quantiles)))
        for i, a in wl:
            for j, b in wm:
                w = a * b
                logs = logs + w[:, None] * self.log_ms[i, j]
        return np.maximum.accumulate(logs, axis=1)

    def sample_many(self, L: np.ndarray, M: np.ndarray, u: np.ndarray) -> np.ndarray:
        """`sample_ms` for many (shape, u) at once, identical bits."""
        logs = self.log_curves(L, M)
        u = np.asarray(u, float)
        q = self.quantiles
        n = len(q)
        if n == 1:
            return np.exp(logs[:, 0])
        j = np.clip(np.searchsorted(q, u, side="right") - 1, 0, n - 2)
        rows = np.arange(len(u))
        y0, y1 = logs[rows, j], logs[rows, j + 1]
        with np.errstate(invalid="ignore"):
            inside = np.exp((y1 - y0) / (q[j + 1] - q[j]) * (u - q[j]) + y0)
        return np.where(u <= q[0], np.exp(logs[:, 0]), np.where(u >= q[-1], np.exp(logs[:, -1]), inside))


@dataclass
class BatchScale:
    """How a padded batch of B same-shape requests of one phase scales its time (measured).

    `factor(B, L, M)` is median(batch of B) / median(one request) at (L, M): 1 at B = 1,
    interpolated linearly in B between measured sizes, and in log shape on each size's grid
    (the bench measures a size only where B x (L + s + M) fits its token cap). Where a size's
    grid does not reach (L, M), the factor of the largest measured size B' that does is scaled
    by B / B' (the device is then saturated: time grows with the work).
    """

    sizes: list[int]                       # measured batch sizes > 1, ascending
    ratios: dict[int, PhaseCurve]          # per size: log(median ratio) over its own grid

    def _ratio(self, B: int, L: float, M: float) -> float | None:
        c = self.ratios[B]
        return c.median_ms(L, M) if c.contains(L, M) else None

    def factor(self, B: int, L: float, M: float) -> float:
        if B <= 1:
            return 1.0
        known = [(1, 1.0)] + [(b, r) for b in self.sizes if (r := self._ratio(b, L, M)) is not None]
        for (b0, r0), (b1, r1) in zip(known, known[1:]):
            if b0 <= B <= b1:
                return r0 + (r1 - r0) * (B - b0) / (b1 - b0)
        b, r = known[-1]
        return r * B / b


def build_batch_scales(batched: pd.DataFrame, curves: dict, path: Path) -> dict[str, BatchScale]:
    """Per phase with rows of batch > 1 (isolated): the ratio of each batch's median to the
    single-request median at the same shape, on the complete L rows of each size's grid."""
    out: dict[str, BatchScale] = {}
    med = batched[(batched["quantile"] == 0.5) & (batched["condition"] == "isolated")]
    for phase, g in med.groupby("phase", sort=True):
        one = curves.get((phase, "isolated"))
        if one is None:
            raise InputError(f"{phase}: batched rows without its single-request rows", str(path))
        ratios = {}
        for B, gb in g.groupby("batch", sort=True):
            Ms = np.sort(gb["candidates"].unique())
            rows = [L for L, gl in gb.groupby("history_len") if len(gl) == len(Ms)]
            gb = gb[gb["history_len"].isin(rows)].sort_values(["history_len", "candidates"])
            if not len(gb):
                continue
            t = gb["time_ms"].to_numpy(float)
            if np.any(~(t > 0)):
                raise InputError(f"{phase} batch {B}: time_ms must be > 0", str(path))
            r = [math.log(v / one.median_ms(L, M))
                 for L, M, v in zip(gb["history_len"], gb["candidates"], t)]
            cube = np.array(r).reshape(len(rows), len(Ms), 1)
            ratios[int(B)] = PhaseCurve(phase, f"batch{B}", np.array(rows, float),
                                        Ms.astype(float), np.array([0.5]), cube)
        if ratios:
            out[phase] = BatchScale(sorted(ratios), ratios)
    return out


@dataclass
class CostTable:
    manifest: Manifest
    path: Path
    curves: dict[tuple[str, str], PhaseCurve]
    batch: dict[str, BatchScale] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    def curve(self, phase: str, condition: str = "isolated") -> PhaseCurve:
        try:
            return self.curves[(phase, condition)]
        except KeyError:
            have = sorted(f"{p}/{c}" for p, c in self.curves)
            raise InputError(f"table has no phase {phase!r} under condition {condition!r} "
                             f"(has: {', '.join(have)})", str(self.path)) from None


def resolve(ref: str) -> Path:
    """A built-in table name, a table folder, or a manifest.json path -> manifest path."""
    p = Path(ref)
    if p.suffix == ".json":
        return p
    if "/" in ref or p.is_dir():
        return p / "manifest.json"
    return TABLES_DIR / ref / "manifest.json"


def builtin_tables() -> list[str]:
    return sorted(d.name for d in TABLES_DIR.iterdir() if (d / "manifest.json").exists())


@lru_cache(maxsize=32)
def load_table(ref: str) -> CostTable:
    """Load and validate a table; raises InputError naming the file and the problem."""
    mpath = resolve(ref)
    if not mpath.exists():
        known = ", ".join(builtin_tables())
        raise InputError(f"no cost table at {mpath} (built-in tables: {known})", ref)
    try:
        manifest = Manifest.model_validate(json.loads(read_text(mpath, "manifest"),
                                                      object_pairs_hook=_unique_keys))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", str(mpath), line=e.lineno) from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InputError(err["msg"], str(mpath), loc) from None
    except (ValueError, RecursionError) as e:     # a duplicate key; nesting too deep
        raise InputError(f"invalid JSON: {(str(e).splitlines() or ['nested too deeply'])[0]}",
                         str(mpath)) from None
    tpath = mpath.parent / manifest.table_file
    if not tpath.exists():
        raise InputError(f"table file {manifest.table_file} is missing", str(mpath), "table_file")
    digest = hashlib.sha256(read_bytes(tpath, "table file", MAX_TABLE_BYTES)).hexdigest()
    if digest != manifest.sha256:
        raise InputError(f"sha256 mismatch: manifest says {manifest.sha256[:12]}..., "
                         f"file is {digest[:12]}...", str(mpath), "sha256")
    frame = read_frame(tpath, COLUMNS)
    batched = frame.iloc[:0]
    if "batch" in frame.columns:
        frame["batch"] = numeric(frame, tpath, "batch", integer=True)
        bad = np.flatnonzero((frame["batch"] < 1).to_numpy())
        if len(bad):
            raise row_error(tpath, int(bad[0]), f"batch must be >= 1 (got {frame['batch'].iloc[bad[0]]})")
        batched = frame[frame["batch"] > 1].copy()
        frame = frame[frame["batch"] == 1].reset_index(drop=True)
    curves = build_curves(frame, tpath)
    if len(batched):
        for col in ("history_len", "candidates"):
            batched[col] = numeric(batched, tpath, col, integer=True)
        for col in ("quantile", "time_ms"):
            batched[col] = numeric(batched, tpath, col)
    return CostTable(manifest, mpath, curves, build_batch_scales(batched, curves, tpath))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object hook: a key given twice is an error (json would keep the last)."""
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def build_curves(frame: pd.DataFrame, path: Path) -> dict[tuple[str, str], PhaseCurve]:
    """Validate tidy rows and pivot them into one PhaseCurve per (phase, condition)."""
    source = str(path)
    for col in ("history_len", "candidates", "n_samples"):
        frame[col] = numeric(frame, path, col, integer=True)
    for col in ("quantile", "time_ms"):
        frame[col] = numeric(frame, path, col)
    checks = [
        (~frame["phase"].isin(PHASES), lambda v: f"unknown phase {v.phase!r} (known: {', '.join(PHASES)})"),
        (~frame["condition"].isin(CONDITIONS), lambda v: f"unknown condition {v.condition!r}"),
        (frame["time_ms"] <= 0, lambda v: f"time_ms must be > 0 (got {v.time_ms})"),
        ((frame["quantile"] <= 0) | (frame["quantile"] >= 1),
         lambda v: f"quantile must be in (0, 1) (got {v['quantile']})"),
        ((frame["history_len"] < 0) | (frame["candidates"] < 0),
         lambda v: "history_len and candidates must be >= 0"),
        (frame["n_samples"] <= 0, lambda v: f"n_samples must be > 0 (got {int(v.n_samples)})"),
    ]
    for mask, msg in checks:
        bad = np.flatnonzero(mask.to_numpy())
        if len(bad):
            raise row_error(path, int(bad[0]), msg(frame.iloc[bad[0]]))
    key = ["phase", "condition", "history_len", "candidates", "quantile"]
    dup = np.flatnonzero(frame.duplicated(key).to_numpy())
    if len(dup):
        v = frame.iloc[dup[0]]
        raise row_error(path, int(dup[0]), f"grid point given twice: {v.phase}/{v.condition} "
                                           f"L={int(v.history_len)} M={int(v.candidates)} q={v['quantile']}")

    curves = {}
    for (phase, cond), g in frame.groupby(["phase", "condition"], sort=True):
        Ls = np.sort(g["history_len"].unique()).astype(float)
        Ms = np.sort(g["candidates"].unique()).astype(float)
        qs = np.sort(g["quantile"].unique()).astype(float)
        where = f"{phase}/{cond}"
        if 0.5 not in qs:
            raise InputError(f"{where}: quantile 0.5 (the median) is missing", source)
        for dim, values in (("history_len", Ls), ("candidates", Ms)):
            if len(values) > 1 and values[0] <= 0:
                raise InputError(f"{where}: {dim} grid mixes 0 with positive values", source)
        if len(g) != len(Ls) * len(Ms) * len(qs):
            present = set(zip(g["history_len"], g["candidates"], g["quantile"]))
            for L in Ls:
                for M in Ms:
                    for q in qs:
                        if (L, M, q) not in present:
                            raise InputError(f"{where}: grid point L={int(L)} M={int(M)} "
                                             f"q={q} is missing (grid must be rectangular)", source)
        cube = (g.sort_values(["history_len", "candidates", "quantile"])["time_ms"]
                .to_numpy(float).reshape(len(Ls), len(Ms), len(qs)))
        if np.any(np.diff(cube, axis=2) < 0):
            raise InputError(f"{where}: quantiles are not non-decreasing at some grid point", source)
        curves[(phase, cond)] = PhaseCurve(phase, cond, Ls, Ms, qs, np.log(cube))
    return curves


def _within(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return np.ones(len(v), bool) if len(grid) == 1 else (v >= grid[0]) & (v <= grid[-1])


def _weights(v: float, grid: np.ndarray) -> list[tuple[int, float]]:
    """Linear weights in log(v) between the two bracketing grid points (or edge pair)."""
    n = len(grid)
    if n == 1:
        return [(0, 1.0)]
    x = math.log(max(v, 1e-9))
    lg = np.log(grid)
    i = int(np.clip(np.searchsorted(lg, x) - 1, 0, n - 2))
    t = (x - lg[i]) / (lg[i + 1] - lg[i])
    return [(i, 1.0 - t), (i + 1, t)]


def write_table(frame: pd.DataFrame, folder: Path, manifest: dict) -> Path:
    """Write table.parquet + manifest.json (sha256 filled in); for tools and tests."""
    folder.mkdir(parents=True, exist_ok=True)
    tpath = folder / "table.parquet"
    frame.loc[:, list(COLUMNS)].to_parquet(tpath, index=False)
    manifest = {**manifest, "table_file": tpath.name,
                "sha256": hashlib.sha256(tpath.read_bytes()).hexdigest()}
    Manifest.model_validate(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder / "manifest.json"
