"""Phase costs composed from measured kernels: predict model shapes nobody benchmarked.

A phase's time is its operator graph (`simrec.operators`) run through a model of eager
serving, with every operator's device time looked up in a measured kernel table
(``kernels.parquet``, written by ``calibration/bench.py`` or ``calibration/kernel_grid.py``):

- **device time**: a kernel table's ``graph`` rows (calibration/kernel_grid.py times every
  shape as a CUDA graph too) are the kernels' device time without any launch; its
  ``isolated`` rows (one synchronised call) add the host's launch of every kernel of the
  call, which for a call of several small kernels (HSTU's attention: seven) is most of it.
  Tables that all have graph rows are costed from them; otherwise from the isolated rows.
- **lookup**: a shape measured exactly gives its median. Otherwise it is interpolated
  linearly in log(time) over log(shape) where the kernel's grid brackets it (GEMMs along m at
  the same (n, k); attention along its lengths at the same width, heads and implementation),
  or costed by a small regressor per kernel family, ``time = a + b work + c bytes`` with
  a, b, c >= 0, fitted by least squares on relative error (the log error to first order).
  Which of the two a family uses is chosen by their leave-one-out errors on its own rows.
  Element-wise, norm and copy operators whose family the table did not measure use the
  regressor of the memory-bound family (the element-wise rows), or else of kv_concat. An
  attention kind no table measured (the target-attention archs' attn_cross, attn_single
  and attn_segmented: nobody has timed them yet) is a one-line error naming its family.
- **eager pipeline**: the host issues the operators one after another; the device runs
  operator i once it is issued and the previous one is done, for its device time (the graph
  time, or the isolated time less ``e``: an isolated timing includes its own launch, which a
  pipeline hides). A call is ``max_i (issue_i + remaining device work_i) + c0``. At small L
  the host chain is the whole cost (launch-bound: the H100 table is flat at 3-4 ms); at
  long L the device's. The host's time per operator is, where the kernel table has host
  rows (the issue time of each call measured back to back), ``s x`` that time ``+ g``:
  s for the host speed of the session a phase table was measured in against the grid's, g
  for the model's Python between the calls. Without host rows it is ``h`` per kernel
  launch. (s, g) or (h, e) are fitted per device on measured phase tables (`fit_overhead`),
  by least squares on log time; c0 is kept for callers and fitted as 0.

Dims of the kernel table (FORMAT.md's kernels file): gemm (m, n, k); attn_causal (L, L, d);
attn_target (queries, keys, d); kv_concat and attn_concat (a, b, d); kv_store and head_copy
(tokens, d, 0); an element-wise kind (elements, 0, 0). Optional columns ``arch`` (the
attention implementation) and ``heads`` override the manifest model's for their row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import operators as opg
from .errors import InputError

KERNEL_COLUMNS = ("kernel", "dim_a", "dim_b", "dim_c", "condition", "quantile", "time_ms", "n_samples")
ATTENTION = ("attn_causal", "attn_target")      # the attention kinds a kernel table may hold
KERNELS = ("gemm", *ATTENTION, *opg.LAYOUT_KINDS, *opg.ELTWISE_PASSES, "emb_gather", "topk")
MEMORY = tuple(opg.ELTWISE_PASSES)      # the memory-bound family
TIMINGS = ("graph", "isolated", "host")   # kernel-table conditions a lookup uses
PHASES = opg.PHASES


# ------------------------------------------------------------------ the kernel table

@dataclass(frozen=True)
class KernelTable:
    """The medians of one kernel table, per kernel kind: isolated, and graph (device time)."""

    path: str
    device: str
    arch: str
    heads: int
    dtype_bytes: int
    # kind -> (dims [n, 3] int, arch [n] str, heads [n] int, median ms [n])
    rows: dict = field(repr=False)
    manifest: dict = field(repr=False)
    graph_rows: dict = field(default_factory=dict, repr=False)   # the same, condition graph
    host_rows: dict = field(default_factory=dict, repr=False)    # condition host

    @property
    def n_shapes(self) -> int:
        return sum(len(v[3]) for v in self.rows.values())


def resolve(ref: str) -> Path:
    """A folder holding manifest.json (and the kernels file), the manifest itself, or a
    built-in table name."""
    from simrec.calibration.table import resolve as resolve_table
    return resolve_table(ref)


@lru_cache(maxsize=16)
def load_kernels(ref: str) -> KernelTable:
    """Load and validate a kernel table; raises InputError naming the file, row and column."""
    import hashlib

    from .tabular import MAX_TABLE_BYTES, numeric, read_bytes, read_frame, row_error
    mpath = resolve(ref)
    manifest = load_kernels_manifest(ref)
    model, device = manifest.get("model"), manifest.get("device")
    if not isinstance(model, dict):
        raise InputError("missing the model block", str(mpath), "model")
    if not isinstance(device, dict) or not device.get("name"):
        raise InputError("missing the device name", str(mpath), "device.name")
    for key in ("arch", "heads", "dtype"):
        if key not in model:
            raise InputError(f"the model has no {key} (the kernels' implementation and shapes)",
                             str(mpath), f"model.{key}")
    if model["dtype"] not in opg.DTYPE_BYTES:
        raise InputError(f"unknown dtype {model['dtype']!r}", str(mpath), "model.dtype")
    h = model["heads"]
    if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= 4096:
        raise InputError(f"model.heads must be an integer from 1 to 4096 (got {h!r})", str(mpath), "model.heads")
    method = manifest.get("method") if isinstance(manifest.get("method"), dict) else {}
    kname = str(method.get("kernels_file", "kernels.parquet"))
    kpath = mpath.parent / kname
    if not kpath.exists():
        raise InputError(f"kernels file {kname} is missing", str(mpath), "method.kernels_file")
    want = method.get("kernels_sha256")
    if want is not None:
        got = hashlib.sha256(read_bytes(kpath, "kernel table", MAX_TABLE_BYTES)).hexdigest()
        if got != want:
            raise InputError(f"sha256 mismatch: manifest says {str(want)[:12]}..., file is "
                             f"{got[:12]}...", str(mpath), "method.kernels_sha256")
    frame = read_frame(kpath, KERNEL_COLUMNS, "kernel table")
    if not len(frame):
        raise InputError("the kernel table has no rows", str(kpath))
    dims = np.stack([numeric(frame, kpath, c, integer=True) for c in ("dim_a", "dim_b", "dim_c")], 1)
    q = numeric(frame, kpath, "quantile")
    t = numeric(frame, kpath, "time_ms")
    n = numeric(frame, kpath, "n_samples", integer=True)
    heads = (numeric(frame, kpath, "heads", integer=True) if "heads" in frame.columns
             else np.full(len(frame), float(model["heads"])))
    arch = (frame["arch"].astype(str).to_numpy() if "arch" in frame.columns
            else np.full(len(frame), str(model["arch"]), dtype=object))
    kind = frame["kernel"].astype(str).to_numpy()
    cond = frame["condition"].astype(str).to_numpy()
    checks = [
        (~np.isin(kind, KERNELS), lambda i: f"kernel: unknown kernel {kind[i]!r} (known: {', '.join(KERNELS)})"),
        (t <= 0, lambda i: f"time_ms must be > 0 (got {t[i]:g})"),
        ((q <= 0) | (q >= 1), lambda i: f"quantile must be in (0, 1) (got {q[i]:g})"),
        ((dims < 0).any(1), lambda i: f"dim_a, dim_b, dim_c must be >= 0 (got {dims[i].astype(int).tolist()})"),
        (np.isin(kind, ("gemm", *ATTENTION, "kv_concat")) & (dims <= 0).any(1),
         lambda i: f"{kind[i]} needs dim_a, dim_b, dim_c > 0 (got {dims[i].astype(int).tolist()})"),
        (n <= 0, lambda i: f"n_samples must be > 0 (got {int(n[i])})"),
        (np.isin(kind, ATTENTION) & (heads <= 0), lambda i: f"heads must be > 0 (got {int(heads[i])})"),
    ]
    for bad, msg in checks:
        idx = np.flatnonzero(bad)
        if len(idx):
            raise row_error(kpath, int(idx[0]), msg(int(idx[0])))
    key = list(zip(kind, arch, heads.astype(int), *dims.astype(int).T, cond, q))
    seen: dict = {}
    for i, k in enumerate(key):
        if k in seen:
            raise row_error(kpath, i, f"kernel shape given twice: {k[0]} "
                                      f"[{k[3]},{k[4]},{k[5]}] q={k[7]:g} (also row {seen[k]})")
        seen[k] = i
    iso = cond == "isolated"
    if not iso.any():
        raise InputError("no isolated rows (condition 'isolated' is what a lookup uses)", str(kpath),
                         "condition")
    by_cond: dict = {}
    for c in TIMINGS:
        at = cond == c
        med = at & (q == 0.5)
        shapes = {k[:6]: i for i, k in enumerate(key) if at[i]}
        with_median = {k[:6] for i, k in enumerate(key) if med[i]}
        for k, i in shapes.items():
            if k not in with_median:
                raise row_error(kpath, i, f"quantile: the median (0.5) of {k[0]} [{k[3]},{k[4]},{k[5]}]"
                                          + ("" if c == "isolated" else f" ({c})") + " is missing")
        by_cond[c] = {kk: (dims[med & (kind == kk)].astype(np.int64), arch[med & (kind == kk)].astype(str),
                           heads[med & (kind == kk)].astype(np.int64), t[med & (kind == kk)])
                      for kk in dict.fromkeys(kind[med])}
    return KernelTable(str(kpath), str(device["name"]), str(model["arch"]), int(model["heads"]),
                       opg.DTYPE_BYTES[model["dtype"]], by_cond["isolated"], manifest, by_cond["graph"],
                       by_cond["host"])


# ------------------------------------------------------------------ lookups

def _coords(kind: str, dims, arch: str, heads: int) -> tuple[tuple, tuple]:
    """(fixed key, interpolation axes) of a kernel shape: shapes interpolate only along the
    axes, between rows of the same fixed key."""
    a, b, c = (int(v) for v in dims)
    if kind == "gemm":
        return (b, c), (a,)
    if kind == "attn_causal":
        return (c, heads, arch), (a,)
    if kind == "attn_target":
        return (c, heads, arch), (a, b - a)        # queries and history keys: a rectangular grid
    if kind == "kv_concat":
        return (c, heads), (a, b)
    if kind == "attn_concat":
        return (c, heads, arch), (a, b)
    if kind in ("kv_store", "head_copy"):
        return (b, heads), (a,)
    return (b, c), (a,)                             # element-wise (elements, 0, 0); gathers; topk


def _features(kind: str, dims, b: int) -> tuple[float, float]:
    """(work, bytes) of a kernel shape, the regressor's inputs: GEMM FLOPs; attention's
    query-key products times width (as its kernel computes them, masked or not)."""
    a, bb, c = (float(v) for v in dims)
    if kind == "gemm":
        op = opg.gemm(a, bb, c, b, "")
        return op.flops, op.bytes
    if kind in ATTENTION:
        return a * bb * c, (2 * a + 2 * bb) * c * b
    if kind in ("kv_concat", "attn_concat"):
        return 0.0, opg.kv_concat(a, bb, c, b).bytes
    if kind in ("kv_store", "head_copy"):
        return 0.0, opg.head_op(kind, a, bb, b, "").bytes
    if kind in opg.ELTWISE_PASSES:
        return 0.0, opg.ELTWISE_PASSES[kind] * a * b
    return 0.0, 0.0


def _family(kind: str, arch: str, head_dim: int = 0) -> str:
    """Shapes of one family share a regressor. Attention is one family per implementation
    and head width: SDPA picks a different kernel at head_dim 256 than at 128, so a head
    layout nobody measured is costed from another only as a flagged last resort. Each layout
    copy is its own family (their kernels differ: the strided cat runs ~6x slower than the
    contiguous one), attn_concat one per arch."""
    if kind in MEMORY:
        return "memory"
    if kind == "attn_concat":
        return f"{kind}:{arch}"
    return f"{kind}:{arch}:hd{head_dim}" if kind in opg.ATTENTION_KINDS else kind


def _head_dim(kind: str, dims, heads: int) -> int:
    return int(dims[2]) // max(int(heads), 1) if kind in opg.ATTENTION_KINDS else 0


@dataclass
class _Regressor:
    coef: np.ndarray                 # a, b, c

    def __call__(self, work: float, nbytes: float) -> float:
        return float(self.coef @ (1.0, work, nbytes))


def _fit_regressor(X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """a, b, c >= 0 minimising sum((X @ coef) / t - 1)^2 (NNLS on relative error); columns
    scaled to unit size first so the solve is well conditioned."""
    from scipy.optimize import nnls
    A = X / t[:, None]
    scale = np.maximum(np.abs(A).max(0), 1e-300)
    coef, _ = nnls(A / scale, np.ones(len(t)))
    return coef / scale


class KernelCosts:
    """Device time of any kernel shape, from the kernel tables of one device: their graph
    rows where every table has them (``timing`` 'graph'), else their isolated rows. Where
    every table also has host rows, ``host`` costs each operator's host issue time the same
    way (a KernelCosts of timing 'host'); else it is None."""

    def __init__(self, tables: list[KernelTable], timing: str | None = None):
        if not tables:
            raise ValueError("KernelCosts needs at least one kernel table")
        devices = {t.device for t in tables}
        if len(devices) > 1:
            raise InputError(f"kernel tables of different devices cannot be combined: "
                             f"{', '.join(sorted(devices))}", tables[0].path)
        sizes = {t.dtype_bytes for t in tables}
        if len(sizes) > 1:
            raise InputError("kernel tables of different dtypes cannot be combined", tables[0].path)
        self.tables, self.device, self.dtype_bytes = tables, tables[0].device, sizes.pop()
        self.timing = timing or ("graph" if all(t.graph_rows for t in tables) else "isolated")
        self.host = (KernelCosts(tables, "host") if timing is None and all(t.host_rows for t in tables)
                     else None)
        # (kind, fixed) -> {axes: log ms}; a shape in several tables: the mean of their logs
        logs: dict = {}
        for tab in tables:
            for kind, (dims, arch, heads, t) in self._rows(tab).items():
                for d, a, h, v in zip(dims, arch, heads, t):
                    fixed, axes = _coords(kind, d, a, int(h))
                    logs.setdefault((kind, fixed), {}).setdefault(axes, []).append(math.log(v))
        self.grid = {k: {ax: float(np.mean(v)) for ax, v in g.items()} for k, g in logs.items()}
        self._axes = {k: [sorted({ax[j] for ax in g}) for j in range(len(next(iter(g))))]
                      for k, g in self.grid.items()}
        self._fit_families()
        self._memo: dict = {}

    def _rows(self, tab: KernelTable) -> dict:
        return {"graph": tab.graph_rows, "host": tab.host_rows}.get(self.timing, tab.rows)

    # -- interpolation
    def _interp(self, kind: str, fixed: tuple, axes: tuple, leave_out: int | None = None):
        """log ms by multilinear interpolation in log-log on the grid of (kind, fixed), or None
        where the grid does not bracket the shape. With leave_out = j, axis j is bracketed by
        its neighbours as if the shape's own value had not been measured."""
        g = self.grid.get((kind, fixed))
        if g is None:
            return None
        terms = [((), 1.0)]
        for j, v in enumerate(axes):
            vals = self._axes[(kind, fixed)][j]
            if leave_out != j and v in vals:
                pts = [(v, 1.0)]
            else:
                lo = [x for x in vals if x < v]
                hi = [x for x in vals if x > v]
                if not lo or not hi or lo[-1] <= 0:
                    return None
                x0, x1 = lo[-1], hi[0]
                w = (math.log(v) - math.log(x0)) / (math.log(x1) - math.log(x0))
                pts = [(x0, 1 - w), (x1, w)]
            terms = [(c + (x,), wc * wx) for c, wc in terms for x, wx in pts]
        total = 0.0
        for corner, w in terms:
            y = g.get(corner)
            if y is None:
                return None
            total += w * y
        return total

    # -- regressors, and the choice between them and interpolation
    def _fit_families(self):
        rows: dict = {}
        for tab in self.tables:
            for kind, (dims, arch, heads, t) in self._rows(tab).items():
                for d, a, h, v in zip(dims, arch, heads, t):
                    fixed, axes = _coords(kind, d, a, int(h))
                    rows.setdefault(_family(kind, a, _head_dim(kind, d, h)), []).append(
                        (kind, fixed, axes, d, v))
        self.regressors: dict[str, _Regressor] = {}
        self.choice: dict[str, str] = {}
        self.loo: dict[str, dict] = {}
        for fam, rs in rows.items():
            X = np.array([(1.0, *_features(k, d, self.dtype_bytes)) for k, _, _, d, _ in rs])
            t = np.array([v for *_, v in rs])
            self.regressors[fam] = _Regressor(_fit_regressor(X, t))
            e_int, e_reg = [], []
            for i, (k, fixed, axes, _, v) in enumerate(rs):
                preds = [self._interp(k, fixed, axes, j) for j in range(len(axes))]
                preds = [p for p in preds if p is not None]
                if not preds or len(rs) < 5:
                    continue
                keep = np.arange(len(rs)) != i
                coef = _fit_regressor(X[keep], t[keep])
                r = float(coef @ X[i])
                for p in preds:
                    e_int.append(abs(math.exp(p) / v - 1))
                    e_reg.append(abs(r / v - 1) if r > 0 else 1.0)
            stats = {"n": len(e_int)}
            if e_int:
                stats.update(interpolation=float(np.median(e_int)), regressor=float(np.median(e_reg)))
            self.loo[fam] = stats
            self.choice[fam] = ("interpolation" if e_int and stats["interpolation"] <= stats["regressor"]
                                else "regressor")

    def lookup(self, kind: str, dims, arch: str, heads: int) -> tuple[float, str]:
        """(ms, how): 'exact', 'interpolated', 'regressor', 'other head layout' (an attention
        regressor of the same implementation at another head width), or 'memory regressor' /
        'kv_concat regressor' (a copy or element-wise kind the tables did not measure)."""
        key = (kind, tuple(int(v) for v in dims), arch, heads)
        got = self._memo.get(key)
        if got is not None:
            return got
        fixed, axes = _coords(kind, dims, arch, heads)
        y = self.grid.get((kind, fixed), {}).get(axes)
        fam = _family(kind, arch, _head_dim(kind, dims, heads))
        if y is not None:
            got = (math.exp(y), "exact")
        else:
            y = self._interp(kind, fixed, axes) if self.choice.get(fam) == "interpolation" else None
            if y is not None:
                got = (math.exp(y), "interpolated")
            else:
                reg, how = self.regressors.get(fam), "regressor"
                if reg is None and kind in opg.ATTENTION_KINDS:
                    near = sorted((abs(int(f.rsplit("hd", 1)[1]) - _head_dim(kind, dims, heads)), f)
                                  for f in self.regressors if f.startswith(f"{kind}:{arch}:hd"))
                    if near:
                        reg, how = self.regressors[near[0][1]], "other head layout"
                if reg is None and kind not in opg.ATTENTION_KINDS and kind != "gemm":
                    near = [f for f in ("memory", "kv_concat") if f in self.regressors]
                    if near:        # bench.py's tables time no element-wise kernels, only the K/V cat
                        reg, how = self.regressors[near[0]], f"{near[0]} regressor"
                if reg is None:
                    have = ", ".join(sorted(self.regressors))
                    raise InputError(f"the kernel tables have no {fam} kernels to cost {kind} "
                                     f"{list(key[1])} (have: {have})", self.tables[0].path)
                got = (max(reg(*_features(kind, dims, self.dtype_bytes)), 1e-6), how)
        self._memo[key] = got
        return got


# ------------------------------------------------------------------ the eager pipeline

@dataclass(frozen=True, slots=True)
class Overhead:
    """Per-call costs of eager serving on one device (see the module docstring)."""

    host_ms_per_launch: float        # h
    kernel_floor_ms: float           # e
    call_ms: float                   # c0
    host_scale: float = 0.0          # s: the measured host issue time of each operator, scaled
    host_ms_per_op: float = 0.0      # g: per operator, the Python between the measured calls


@dataclass(frozen=True, slots=True)
class Costed:
    """A phase's graph at one shape, costed: per operator, launches and isolated device ms."""

    launches: np.ndarray
    device_ms: np.ndarray
    how: tuple[str, ...]
    device_only: bool = False        # device_ms are graph times: no launch inside to take off
    host_ms: np.ndarray | None = None    # measured host issue ms per operator, where the table has them

    def work(self, o: Overhead) -> np.ndarray:
        return self.device_ms if self.device_only else np.maximum(self.device_ms - o.kernel_floor_ms, 0.0)

    def host(self, o: Overhead) -> np.ndarray:
        """Host ms to issue each operator: h per launch, plus s x its measured host time + g."""
        h = self.launches * o.host_ms_per_launch
        return h if self.host_ms is None else h + o.host_scale * self.host_ms + o.host_ms_per_op

    def time_ms(self, o: Overhead) -> float:
        issue = np.cumsum(self.host(o))
        remaining = np.cumsum(self.work(o)[::-1])[::-1]
        return float(np.max(issue + remaining) + o.call_ms)

    def host_bound(self, o: Overhead) -> bool:
        """Whether the host's launches take longer than the device's work (launch-bound)."""
        return float(self.host(o).sum()) >= float(self.work(o).sum())


def cost_graph(costs: KernelCosts, spec, phase: str, L: int, M: int) -> Costed:
    heads, arch = int(spec.heads), spec.arch
    seq = opg.ops(opg.graph(spec, phase, L, M))
    dims = [op.dims + (0,) * (3 - len(op.dims)) for op in seq]
    found = [costs.lookup(op.kind, d, arch, heads) for op, d in zip(seq, dims)]
    host = (None if costs.host is None else
            np.array([costs.host.lookup(op.kind, d, arch, heads)[0] for op, d in zip(seq, dims)]))
    return Costed(np.array([op.launches for op in seq], float), np.array([t for t, _ in found]),
                  tuple(h for _, h in found), costs.timing == "graph", host)


def fit_overhead(points: list[tuple[Costed, float]]) -> Overhead:
    """The host side of the eager pipeline by least squares on log time over measured phase
    medians (Costed, ms). Points with measured host times: (s, g), the host issue time of
    each operator scaled by s (the phase table's session may have a faster or slower host
    than the kernel grid's) plus g per operator (the model's Python between calls), h = e =
    0. Else (h, e), e at most the fastest kernel the points use; e = 0 where every point is
    costed from graph (device) times, which hold no launch. c0 stays 0: a constant per call
    fitted on 24-layer models overpredicted an 8-layer one by 1.4 ms in leave-one-model-out,
    while the per-launch cost carried (15-20 us on the H200 across three models)."""
    from scipy.optimize import least_squares
    if not points:
        raise ValueError("fit_overhead needs measured phase points")
    measured = np.log([ms for _, ms in points])
    floor = min(float(c.device_ms.min()) for c, _ in points)

    def resid(theta):
        o = Overhead(theta[0], theta[1], 0.0)
        return np.log([c.time_ms(o) for c, _ in points]) - measured

    if all(c.host_ms is not None and c.device_only for c, _ in points):
        def resid_sg(th):
            o = Overhead(0.0, 0.0, 0.0, th[0], th[1])
            return np.log([c.time_ms(o) for c, _ in points]) - measured
        best = min((least_squares(resid_sg, x0, bounds=([0, 0], [10.0, 1.0]))
                    for x0 in ([1.0, 0.0], [1.5, 0.005], [0.5, 0.01])), key=lambda r: r.cost)
        return Overhead(0.0, 0.0, 0.0, float(best.x[0]), float(best.x[1]))
    if all(c.device_only for c, _ in points):
        best = min((least_squares(lambda th: resid([th[0], 0.0]), [x0], bounds=([0], [1.0]))
                    for x0 in (0.003, 0.01, 0.02)), key=lambda r: r.cost)
        return Overhead(float(best.x[0]), 0.0, 0.0)
    best = min((least_squares(resid, x0, bounds=([0, 0], [1.0, floor]))
                for x0 in ([0.01, 0.5 * floor], [0.003, 0.0], [0.02, 0.9 * floor])), key=lambda r: r.cost)
    return Overhead(float(best.x[0]), float(best.x[1]), 0.0)


def phase_points(table, spec, costs: KernelCosts, phases=PHASES) -> list[tuple[str, int, int, Costed, float]]:
    """(phase, L, M, Costed, measured median ms) at every isolated batch-1 grid point of a
    phase table (a `CostTable`) for its model `spec`."""
    from .roofline import medians
    have = {p for p, c in table.curves if c == "isolated"}
    out = []
    for ph in phases:
        if ph not in have:
            continue
        for L, M, ms in zip(*medians(table, ph)):
            out.append((ph, int(L), int(M), cost_graph(costs, spec, ph, int(L), int(M)), float(ms)))
    return out


@dataclass(frozen=True)
class ModelSpec:
    """The ranking model a kernel cost model costs (the fields operators.graph reads)."""

    arch: str
    layers: int
    d_model: int
    heads: int
    ffn: int
    dtype: str
    short_term_tokens: int
    summary_tokens: int = 128                     # the target-attention archs' (ArchSpec's defaults)
    segment_len: int = 128
    chunk_tokens: int = opg.STCA_CHUNK_TOKENS

    @classmethod
    def from_dict(cls, m: dict) -> ModelSpec:
        return cls(str(m["arch"]), int(m["layers"]), int(m["d_model"]), int(m["heads"]),
                   int(m.get("ffn") or 4 * int(m["d_model"])), str(m.get("dtype", "bfloat16")),
                   int(m.get("short_term_tokens", 0)), int(m.get("summary_tokens", 128)),
                   int(m.get("segment_len", 128)), int(m.get("chunk_tokens", opg.STCA_CHUNK_TOKENS)))

    @property
    def dtype_bytes(self) -> int:
        return opg.DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.d_model * self.dtype_bytes


class KernelModel:
    """Medians of a model's phases from kernel costs and a device's fitted overhead."""

    def __init__(self, costs: KernelCosts, overhead: Overhead, spec):
        self.costs, self.overhead, self.spec = costs, overhead, spec
        self._memo: dict = {}

    def costed(self, phase: str, L: int, M: int = 0) -> Costed:
        return cost_graph(self.costs, self.spec, phase, L, M)

    def median_ms(self, phase: str, L: int, M: int = 0) -> float:
        key = (phase, L, M)
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = self.costed(phase, L, M).time_ms(self.overhead)
        return t


# ------------------------------------------------------------------ the scenario service

@lru_cache(maxsize=8)
def _device_fit(table_refs: tuple[str, ...]) -> tuple[KernelCosts, Overhead, object]:
    """Kernel costs from every table that has kernels (only those with graph rows, if any
    has: graph and isolated times are not mixed); the overhead fitted on every table that
    has a phase table (each costed as its own model); and the first phase table (for
    prefix_reload and the noise). Tables must share a device."""
    from simrec.calibration.table import load_table
    if not _kernels_present(table_refs[0]):
        raise InputError("has no kernels file with rows: a kernels service's table is a kernel "
                         "table (calibration/kernel_grids/, or a bench.py table with kernels)",
                         str(resolve(table_refs[0]).parent))
    ktabs, phase_tables = [], []
    for ref in table_refs:
        manifest = load_kernels_manifest(ref)
        if manifest.get("table_file"):
            phase_tables.append((ref, load_table(ref)))
        if _kernels_present(ref):
            ktabs.append(load_kernels(ref))
    if not ktabs:
        raise InputError("none of the tables has a kernels file with rows", table_refs[0])
    if not phase_tables:
        raise InputError("none of the tables has a phase table to fit the per-launch overhead "
                         "on; add one of the same device to overhead_from", table_refs[0])
    costs = KernelCosts([t for t in ktabs if t.graph_rows] or ktabs)
    points = []
    for ref, table in phase_tables:
        if str(table.manifest.device.get("name")) != costs.device:
            raise InputError(f"measured on {table.manifest.device.get('name')}, the kernels on "
                             f"{costs.device}: the overhead is fitted per device", ref)
        spec = ModelSpec.from_dict(table.manifest.model)
        points += [(c, ms) for *_, c, ms in phase_points(table, spec, costs)]
    if not points:
        raise InputError("the phase tables have none of "
                         f"{', '.join(PHASES)} (isolated): nothing to fit the per-launch overhead on",
                         phase_tables[0][0])
    return costs, fit_overhead(points), phase_tables[0][1]


def load_kernels_manifest(ref: str) -> dict:
    from .tabular import read_text
    mpath = resolve(ref)
    if not mpath.exists():
        raise InputError(f"no table manifest at {mpath}", ref)
    try:
        data = json.loads(read_text(mpath, "manifest"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", str(mpath), line=e.lineno) from None
    if not isinstance(data, dict):
        raise InputError("a manifest is a JSON object", str(mpath))
    return data


def _kernels_present(ref: str) -> bool:
    """Whether a table has a kernels file with any rows (bench.py writes an empty one when it
    timed no kernels)."""
    import pyarrow.parquet as pq
    manifest = load_kernels_manifest(ref)
    method = manifest.get("method") if isinstance(manifest.get("method"), dict) else {}
    path = resolve(ref).parent / str(method.get("kernels_file", "kernels.parquet"))
    if not path.exists():
        return False
    if not path.is_file():     # a FIFO would block the read: load_kernels names it
        return True
    try:
        return pq.ParquetFile(path).metadata.num_rows > 0
    except Exception:          # unreadable: load_kernels gives the one-line error
        return True


def spread(table, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """(quantiles, log(q-time / median)) of a measured phase, the median over its grid points:
    the noise the kernel model draws with (median-preserving)."""
    c = table.curve(phase, "isolated")
    i = int(np.flatnonzero(c.quantiles == 0.5)[0])
    rel = c.log_ms - c.log_ms[:, :, i:i + 1]
    return c.quantiles.copy(), np.median(rel.reshape(-1, len(c.quantiles)), axis=0)


class KernelPhases:
    """A GR ranking model's phase costs from measured kernels (the `GRPhases` interface).

    Medians come from `KernelModel`; a draw is the median times the spread of the same
    phase in the kernel table's own phase table (same device), by inverse CDF as a table's
    draw is. prefix_reload is ``a + bytes / bandwidth`` fitted on that table's measured
    prefix_reload medians (a host-to-device copy, not a kernel)."""

    def __init__(self, model: KernelModel, table, rng: np.random.Generator):
        from .service import Draws
        self.model = model
        self.kv_bytes_per_token = model.spec.kv_bytes_per_token
        self._u = Draws(rng, lambda r, n: r.uniform(0, 1, n))
        have = {p for p, c in table.curves if c == "isolated"}
        self._spread = {p: spread(table, p) for p in (*PHASES, "prefix_reload") if p in have}
        self._reload = None
        if "prefix_reload" in have:
            from .roofline import medians
            L, _, ms = medians(table, "prefix_reload")
            kv = float(table.manifest.model.get("kv_bytes_per_token") or 0)
            if kv > 0:
                self._reload = _fit_regressor(np.stack([np.ones_like(ms), L * kv], 1), ms)

    @classmethod
    def from_config(cls, cfg, rng: np.random.Generator, where: str) -> KernelPhases:
        refs = (cfg.table, *cfg.overhead_from)
        try:
            costs, overhead, table = _device_fit(refs)
            spec = ModelSpec.from_dict(cfg.model.model_dump())
            kt = costs.tables[0]
            if spec.dtype_bytes != kt.dtype_bytes:
                raise InputError(f"the model's dtype {spec.dtype} has {spec.dtype_bytes} bytes, the "
                                 f"kernel table's {kt.dtype_bytes}", kt.path)
            model = KernelModel(costs, overhead, spec)
            model.costed("full_forward", 1024, 64)           # every kernel family costable
        except InputError as e:
            raise InputError(e.message, e.source, where) from None
        return cls(model, table, rng)

    def check(self, L: np.ndarray, M: np.ndarray) -> int:
        return 0      # no grid: interpolation or a regressor costs every shape

    def median(self, name: str, L: int, M: int = 0) -> float:
        if name == "prefix_reload":
            if self._reload is None:
                raise KeyError("the kernel table's phase table has no prefix_reload to cost reloads")
            return float(self._reload @ (1.0, L * self.kv_bytes_per_token))
        return self.model.median_ms(name, L, M)

    def phase(self, name: str, L: int, M: int = 0) -> float:
        t = self.median(name, L, M)
        sp = self._spread.get(name)
        if sp is None:
            return t
        q, rel = sp
        return t * math.exp(float(np.interp(self._u.next(), q, rel)))

    def sample(self, L: int, M: int) -> float:
        return self.phase("full_forward", L, M)

    def prefix_bytes(self, L: int) -> int:
        return int(L * self.kv_bytes_per_token)
