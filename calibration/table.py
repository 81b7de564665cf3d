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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simrec.errors import InputError
from simrec.tabular import numeric, read_frame, row_error

TABLES_DIR = Path(__file__).parent / "tables"
PHASES = ("prefix_encode", "rank_cached", "full_forward", "prefix_reload", "emb_gather",
          "retrieval_score", "prerank_mlp")
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
    """Measured quantiles of one phase over a (history_len, candidates) grid."""

    phase: str
    condition: str
    history_len: np.ndarray      # sorted grid values (a single 0 when the phase ignores L)
    candidates: np.ndarray
    quantiles: np.ndarray        # sorted, includes 0.5
    log_ms: np.ndarray           # shape (len(history_len), len(candidates), len(quantiles))
    _memo: dict = field(default_factory=dict, repr=False)

    def outside(self, L: np.ndarray, M: np.ndarray) -> np.ndarray:
        """Which of these shapes lie outside the grid (a single-value axis never limits)."""
        return ~(_within(np.asarray(L), self.history_len) & _within(np.asarray(M), self.candidates))

    def contains(self, L: float, M: float) -> bool:
        return not self.outside([L], [M])[0]

    def _log_curve(self, L: float, M: float) -> np.ndarray:
        """log(ms) at each recorded quantile for shape (L, M), memoised per shape."""
        key = (L, M)
        hit = self._memo.get(key)
        if hit is None:
            wl = _weights(L, self.history_len)
            wm = _weights(M, self.candidates)
            logs = sum(a * b * self.log_ms[i, j] for i, a in wl for j, b in wm)
            # Keep the curve monotone in the quantile after extrapolation.
            hit = self._memo[key] = np.maximum.accumulate(logs)
        return hit

    def quantile_ms(self, L: float, M: float) -> np.ndarray:
        """Interpolated quantile curve (ms) at shape (L, M); extrapolates linearly in log-log."""
        return np.exp(self._log_curve(L, M))

    def median_ms(self, L: float, M: float) -> float:
        return float(np.interp(0.5, self.quantiles, self.quantile_ms(L, M)))

    def sample_ms(self, L: float, M: float, u: float) -> float:
        """Inverse-CDF draw: u in (0, 1) mapped through the measured quantiles.

        Between recorded quantiles the time is interpolated in log space; beyond the
        outermost recorded quantiles the distribution is truncated at them.
        """
        logs = self._log_curve(L, M)
        if len(logs) == 1:
            return float(np.exp(logs[0]))
        return float(np.exp(np.interp(u, self.quantiles, logs)))


@dataclass
class CostTable:
    manifest: Manifest
    path: Path
    curves: dict[tuple[str, str], PhaseCurve]

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
        manifest = Manifest.model_validate(json.loads(mpath.read_text()))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", str(mpath), line=e.lineno) from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InputError(err["msg"], str(mpath), loc) from None
    tpath = mpath.parent / manifest.table_file
    if not tpath.exists():
        raise InputError(f"table file {manifest.table_file} is missing", str(mpath), "table_file")
    digest = hashlib.sha256(tpath.read_bytes()).hexdigest()
    if digest != manifest.sha256:
        raise InputError(f"sha256 mismatch: manifest says {manifest.sha256[:12]}..., "
                         f"file is {digest[:12]}...", str(mpath), "sha256")
    return CostTable(manifest, mpath, build_curves(read_frame(tpath, COLUMNS), tpath))


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
