"""Roofline cost model: GR phase times from FLOPs and bytes over a device's peaks.

For a phase of a ranking model at shape (L history tokens, M candidates)::

    time = max(FLOPs / (peak x compute_efficiency), bytes / (HBM bandwidth x memory_efficiency))
           + launches x launch overhead x launch_scale
    prefix_reload = KV bytes / (host link x memory_efficiency) + one launch x launch_scale

with ``launches = layers x launches_per_layer``. It is the analytic fallback for devices
nobody measured; `fit_table` fits the two efficiencies and the per-call overhead on a
measured table and they carry to another device unchanged (the overhead as a multiple of
each device's launch overhead).

FLOPs (per DESIGN.md, 2 FLOPs per multiply-add; N layers, d width, s short-term tokens):

- transformer / hstu: the sum over their operator graphs (`simrec.operators`, declared once
  from calibration/gr_models.py): ``prefix_encode = (N-1) [c L + 2 L^2 d] + p L`` (the last
  layer runs only its projection, p = ``6 d^2`` QKV or HSTU's ``8 d^2`` U/V/Q/K, and keeps
  K and V) and ``rank_cached = N [c (M+s) + 4 (M+s)(L+s) d] + 2 M d`` (the scoring head),
  where c is the linear-layer FLOPs per token: ``8 d^2 + 4 d ffn`` for a transformer (QKV +
  output projection, two FFN GEMMs), ``10 d^2`` for HSTU (fused U/V/Q/K d->4d, output d->d,
  no FFN). ``full_forward = prefix_encode + rank_cached``: DESIGN's full pass with
  m -> M + s, less the last layer's history rows past their projection. (DESIGN's
  ``12 (n+m) d^2`` counts multiply-adds at ffn = 4d; in FLOPs that is 24 d^2.)
- stca, vista, laser: the sum over their operator graphs too (`simrec.operators`, declared
  from calibration/arch_models.py), by their own phases (`ARCH_PHASES`), less the d -> 1
  score head (``2 M d``; these archs' FLOPs were fitted without it). The legacy names map
  onto them (prefix_encode = the user-side phase, rank_cached = the candidate phase): stca =
  history_encode / target_attend, vista = summarize / rank_summary, laser = history_encode /
  sta_rank. (DESIGN's STCA formula, ``N [12 L d^2 + M (4 L d h + 20 d^2)]``, is the graph's
  at f = 4d/3 with attention counted per head at full width: one query over L keys of width
  d costs 4 L d FLOPs whatever the head count.)

Bytes: the weights once per call (``N (4 d^2 + 2 d ffn) b``; HSTU ``N 5 d^2 b``) plus K/V at
``N 2 d b`` per token: the K/V of every token a phase computes is written once and every
K/V its attention uses is read once. The cached prefix is L tokens (k for VISTA). The
target-attention archs follow the same rule with their own weights and user-side state
(`_arch_bytes`); STCA without RLB writes and reads M copies of the history and its K/V, and
LASER's eager segmented attention also moves its [h, M, L] score block (written, softmaxed,
read: 5 h M P b) and its [M, S, d] segment summaries (about 7 passes + 2 per GSTA layer).

Noise: with ``cv > 0`` each draw is the roofline time times a lognormal factor of median 1
(median-preserving: the roofline time is fitted to measured medians, so it stays the median
and the relay's predictions; the mean is ``sqrt(1 + cv^2)`` times it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from . import operators
from .errors import InputError

PHASES = ("prefix_encode", "rank_cached", "full_forward", "prefix_reload")
# The measured phases of the target-attention archs and the dims each takes, declared with
# their operator graphs; and what one ranking request costs on each serving path.
ARCH_PHASES = operators.ARCH_PHASES
SERVING_PATHS = {
    "stca": {"rlb": ("stca_history_encode", "stca_target_attend"), "per_target": ("stca_per_target",)},
    "vista": {"hit": ("vista_rank_summary",), "miss": ("vista_summarize", "vista_rank_summary")},
    "laser": {"default": ("laser_history_encode", "laser_sta_rank")},
}
# legacy phase -> the arch's own phase
LEGACY = {
    "stca": {"prefix_encode": "stca_history_encode", "rank_cached": "stca_target_attend"},
    "vista": {"prefix_encode": "vista_summarize", "rank_cached": "vista_rank_summary"},
    "laser": {"prefix_encode": "laser_history_encode", "rank_cached": "laser_sta_rank"},
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
# Table device names -> device presets (first match in the lower-cased name).
PRESET_NAMES = (("h100", "h100"), ("h200", "h200"), ("a100", "a100"),
                ("910b", "ascend910b"), ("910c", "ascend910c"))
PEAK_KEYS = ("peak_tflops", "hbm_gbps", "host_link_gbps", "launch_overhead_us")


@dataclass(frozen=True, slots=True)
class ModelShape:
    arch: str
    layers: int
    d_model: int
    heads: int
    ffn: int
    dtype_bytes: int
    short_term_tokens: int = 0
    summary_tokens: int = 128
    segment_len: int = 128

    @classmethod
    def from_config(cls, m) -> ModelShape:
        """From a scenario's `RooflineModel`."""
        return cls(m.arch, m.layers, m.d_model, m.heads, m.ffn or 4 * m.d_model, m.dtype_bytes,
                   m.short_term_tokens, m.summary_tokens, getattr(m, "segment_len", 128))

    @classmethod
    def from_manifest(cls, model: dict, source: str) -> ModelShape:
        """From a cost table's `model` block (as `calibration.bench` writes it)."""
        missing = [k for k in ("arch", "layers", "d_model", "heads") if k not in model]
        if missing:
            raise InputError(f"the table's model has no {missing[0]} (needed for a roofline)",
                             source, f"model.{missing[0]}")
        d, n = int(model["d_model"]), int(model["layers"])
        b = DTYPE_BYTES.get(str(model.get("dtype")))
        if b is None:
            if "kv_bytes_per_token" not in model:
                raise InputError(f"unknown dtype {model.get('dtype')!r}", source, "model.dtype")
            b = int(model["kv_bytes_per_token"]) // (2 * n * d)
        return cls(str(model["arch"]), n, d, int(model["heads"]), int(model.get("ffn") or 4 * d), b,
                   int(model.get("short_term_tokens", 0)), int(model.get("summary_tokens", 128)),
                   int(model.get("segment_len", 128)))

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases this model has formulas for."""
        own = tuple(p for p, _ in ARCH_PHASES.get(self.arch, ()))
        return tuple(dict.fromkeys(PHASES + own))

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.d_model * self.dtype_bytes

    def cached_tokens(self, L):
        """Tokens of one user's cached prefix: the history, or VISTA's summary."""
        return self.summary_tokens + 0 * L if self.arch == "vista" else L

    def flops(self, phase: str, L, M):
        """The phase's operator graph summed (`simrec.operators`, the one declaration),
        broadcast over L (vista_rank_summary does not depend on it)."""
        if self.arch in ARCH_PHASES:
            g = operators.graph(self, LEGACY[self.arch].get(phase, phase), L, M)
            return operators.total(g, "flops", exclude=("score_head",)) + 0 * L
        if self.arch in operators.ARCHS:
            return operators.flops(self, phase, L, M)
        raise ValueError(f"unknown arch {self.arch!r}")

    def bytes(self, phase: str, L, M):
        N, d, b, kv = self.layers, self.d_model, self.dtype_bytes, self.kv_bytes_per_token
        if self.arch in ARCH_PHASES and phase != "prefix_reload":
            return _arch_bytes(self, LEGACY[self.arch].get(phase, phase), L, M)
        weights = N * (5 * d * d if self.arch == "hstu" else 4 * d * d + 2 * d * self.ffn) * b
        p = self.cached_tokens(L)
        q = M + (self.short_term_tokens if self.arch in ("transformer", "hstu") else 0)
        if phase == "prefix_reload":
            return p * kv
        tokens = {"prefix_encode": 2 * p, "rank_cached": p + 2 * q, "full_forward": 2 * (p + q)}[phase]
        return weights + tokens * kv


def _segments(m: ModelShape, L):
    return -(-np.asarray(L) // m.segment_len) if isinstance(L, np.ndarray) else -(-L // m.segment_len)


def _arch_bytes(m: ModelShape, phase: str, L, M):
    """HBM bytes of a target-attention arch's phase: weights once, the user-side state written
    once by the phase that makes it and read once by each phase that uses it, inputs read."""
    N, d, f, k, b, h = m.layers, m.d_model, m.ffn, m.summary_tokens, m.dtype_bytes, m.heads
    if m.arch == "stca":
        w_hist = N * (3 * d * f + 2 * d * d) * b
        w_tgt = (3 * d * f + N * 2 * d * d + (N - 1) * 2 * d * d) * b
        kv = N * 2 * L * d * b
        enc = w_hist + L * d * b + kv
        att = w_tgt + kv + M * d * b
        # no RLB: each target's copy of the history is written and read, its K/V written and read
        per = w_hist + w_tgt + L * d * b + M * (2 * L * d * b + 2 * kv) + M * d * b
        out = {"stca_history_encode": enc, "stca_target_attend": att, "stca_per_target": per,
               "full_forward": w_hist + w_tgt + L * d * b + 2 * kv + M * d * b}
    elif m.arch == "vista":
        w = N * (4 * d * d + 3 * d * f) * b
        summ = w + L * d * b + N * 2 * 2 * L * d * b + k * d * b
        rank = w + k * d * b + N * 2 * 2 * k * d * b + M * d * b + 0 * L
        out = {"vista_summarize": summ, "vista_rank_summary": rank, "full_forward": summ + rank}
    elif m.arch == "laser":
        S = _segments(m, L)
        kv = 2 * L * d * b
        enc = 2 * d * d * b + L * d * b + kv
        sta = ((3 * d * f + d * d) * b + N * (2 * d * d + 3 * d * f) * b + kv
               + 5 * h * M * S * m.segment_len * b
               + (7 + 2 * N) * M * S * d * b + M * d * b)
        out = {"laser_history_encode": enc, "laser_sta_rank": sta,
               "full_forward": enc + sta - kv}      # in one call the K/V is not re-read from a cache
    else:
        raise ValueError(f"unknown arch {m.arch!r}")
    if phase not in out:
        raise ValueError(f"arch {m.arch} has no phase {phase!r} (has {', '.join(out)})")
    return out[phase]


@dataclass(frozen=True, slots=True)
class Peaks:
    name: str
    peak_tflops: float
    hbm_gbps: float
    host_link_gbps: float
    launch_overhead_us: float

    @classmethod
    def of(cls, spec) -> Peaks:
        """From a `DeviceSpec` or a preset dict."""
        get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k)
        return cls(get("name"), *(float(get(k)) for k in PEAK_KEYS))


@dataclass(frozen=True, slots=True)
class Efficiency:
    compute: float
    memory: float
    launch_scale: float = 1.0    # multiplies the device's launch overhead


@dataclass(frozen=True, slots=True)
class Roofline:
    model: ModelShape
    peaks: Peaks
    eff: Efficiency
    launches_per_layer: int = 12

    @property
    def launches(self) -> int:
        return self.model.layers * self.launches_per_layer

    @property
    def per_call_overhead_ms(self) -> float:
        return self.launches * self.peaks.launch_overhead_us * self.eff.launch_scale / 1e3

    def time_ms(self, phase: str, L, M=0):
        """Phase time (ms) at shape (L, M); L and M may be numpy arrays."""
        m, p, e = self.model, self.peaks, self.eff
        launch_ms = p.launch_overhead_us * e.launch_scale / 1e3
        nbytes = m.bytes(phase, L, M)
        if phase == "prefix_reload":
            return nbytes / (p.host_link_gbps * e.memory * 1e6) + launch_ms
        compute = m.flops(phase, L, M) / (p.peak_tflops * e.compute * 1e9)
        memory = nbytes / (p.hbm_gbps * e.memory * 1e6)
        return np.maximum(compute, memory) + self.launches * launch_ms


# ------------------------------------------------------------------------- fitting

@dataclass(frozen=True)
class Fit:
    """Efficiencies fitted on a measured table, on the table's own device."""

    table: str
    sha256: str
    device: Peaks
    device_source: str                 # the preset used, or "manifest"
    roofline: Roofline                 # the table's model on the table's device, fitted
    points: dict                       # phase -> (L, M, measured median ms) arrays

    @property
    def efficiency(self) -> Efficiency:
        return self.roofline.eff

    def relative_errors(self) -> dict[str, np.ndarray]:
        """Per phase: |roofline / measured - 1| at every grid point (in-sample)."""
        return {ph: np.abs(self.roofline.time_ms(ph, L, M) / ms - 1)
                for ph, (L, M, ms) in self.points.items()}

    def summary(self) -> dict:
        e = self.efficiency
        return {"table": self.table, "sha256": self.sha256, "device": asdict(self.device),
                "device_source": self.device_source, "compute_efficiency": e.compute,
                "memory_efficiency": e.memory, "launch_scale": e.launch_scale,
                "launches_per_call": self.roofline.launches,
                "per_call_overhead_ms": self.roofline.per_call_overhead_ms}


def table_peaks(manifest, source: str) -> tuple[Peaks, str]:
    """The peaks of the device a table was measured on: a preset matched by the device's name
    (or kind cpu), with any of PEAK_KEYS given in the manifest's `device` taking precedence."""
    from .devices import PRESETS
    dev = manifest.device
    name = str(dev.get("name", ""))
    preset = next((p for needle, p in PRESET_NAMES if needle in name.lower()), None)
    if preset is None and dev.get("kind") == "cpu":
        preset = "cpu"
    given = {k: dev[k] for k in PEAK_KEYS if k in dev}
    if preset is None and len(given) < len(PEAK_KEYS):
        raise InputError(f"no device preset matches {name!r}; add {', '.join(PEAK_KEYS)} to the "
                         "manifest's device", source, "device")
    base = dict(PRESETS[preset]) if preset else {}
    label = preset if not given else ("manifest" if preset is None else f"{preset}+manifest")
    return Peaks.of({**base, **given, "name": name or base.get("name", "?")}), label


def medians(table, phase: str, condition: str = "isolated") -> tuple[np.ndarray, ...]:
    """(L, M, median ms) over a table curve's grid points, flattened."""
    c = table.curve(phase, condition)
    i = int(np.flatnonzero(c.quantiles == 0.5)[0])
    L, M = np.meshgrid(c.history_len, c.candidates, indexing="ij")
    return L.ravel(), M.ravel(), np.exp(c.log_ms[:, :, i]).ravel()


@lru_cache(maxsize=16)
def fit_table(ref: str, launches_per_layer: int = 12) -> Fit:
    """Least squares on log time over the isolated medians of every GR phase the table has
    (full_forward, rank_cached, prefix_encode, and prefix_reload, the one phase where the
    memory efficiency shows), for compute_efficiency, memory_efficiency and launch_scale."""
    from scipy.optimize import least_squares

    from simrec.calibration.table import load_table
    table = load_table(ref)
    source = str(table.path)
    model = ModelShape.from_manifest(table.manifest.model, source)
    peaks, device_source = table_peaks(table.manifest, source)
    have = {p for p, c in table.curves if c == "isolated"}
    points = {ph: medians(table, ph) for ph in model.phases if ph in have}
    if not set(points) - {"prefix_reload"}:
        raise InputError("a roofline fit needs full_forward, rank_cached or prefix_encode "
                         "(or an arch's own phases; isolated) in the table", source)
    base = Roofline(model, peaks, Efficiency(1.0, 1.0), launches_per_layer)

    def residuals(theta):
        r = replace(base, eff=Efficiency(*np.exp(theta)))
        return np.concatenate([np.log(r.time_ms(ph, L, M)) - np.log(ms) for ph, (L, M, ms) in points.items()])

    # Start the overhead at half the fastest GR call; try a few compute efficiencies, as the
    # max() makes the surface piecewise and a single start can stall on the wrong piece.
    fastest = min(ms.min() for ph, (_, _, ms) in points.items() if ph != "prefix_reload")
    scale0 = 0.5 * fastest / base.per_call_overhead_ms
    lo, hi = np.log([1e-6, 1e-6, 1e-6]), np.log([1.0, 1.0, 1e6])
    best = min((least_squares(residuals, np.clip(np.log([ce, 0.5, scale0]), lo + 1e-9, hi - 1e-9),
                              bounds=(lo, hi), x_scale=1.0) for ce in (0.01, 0.1, 0.5)),
               key=lambda r: r.cost)
    fitted = replace(base, eff=Efficiency(*(float(v) for v in np.exp(best.x))))
    return Fit(ref, table.sha256, peaks, device_source, fitted, points)


# ------------------------------------------------------------------------- service

class RooflinePhases:
    """A GR ranking model's phase costs from a roofline (the `GRPhases` interface)."""

    def __init__(self, roofline: Roofline, rng: np.random.Generator, cv: float = 0.0,
                 fit: Fit | None = None):
        from .service import Draws
        self.roofline = roofline
        self.fit = fit
        self.kv_bytes_per_token = roofline.model.kv_bytes_per_token
        sigma = math.sqrt(math.log1p(cv * cv))
        self._noise = Draws(rng, lambda r, n: np.exp(sigma * r.standard_normal(n))) if cv > 0 else None
        self._memo: dict[tuple, float] = {}

    @classmethod
    def from_config(cls, cfg, device, rng: np.random.Generator, where: str) -> RooflinePhases:
        """From a scenario's `RooflineService` on `device` (a `DeviceSpec`). With `fit_from`,
        the fitted efficiencies and overhead replace compute_efficiency and memory_efficiency."""
        if device is None:
            raise InputError("a roofline service needs a device", None, where)
        eff, fit = Efficiency(cfg.compute_efficiency, cfg.memory_efficiency), None
        if cfg.fit_from:
            try:
                fit = fit_table(cfg.fit_from, cfg.launches_per_layer)
            except InputError as e:
                raise InputError(e.message, e.source, f"{where}.fit_from") from None
            eff = fit.efficiency
        roofline = Roofline(ModelShape.from_config(cfg.model), Peaks.of(device), eff, cfg.launches_per_layer)
        return cls(roofline, rng, cfg.cv, fit)

    def check(self, L: np.ndarray, M: np.ndarray) -> int:
        return 0      # no grid: every shape is costed the same way

    def median(self, name: str, L: int, M: int = 0) -> float:
        key = (name, L, M)
        t = self._memo.get(key)
        if t is None:
            if name not in self.roofline.model.phases:
                raise KeyError(f"roofline has no phase {name!r}")
            t = self._memo[key] = float(self.roofline.time_ms(name, L, M))
        return t

    def phase(self, name: str, L: int, M: int = 0) -> float:
        t = self.median(name, L, M)
        return t * self._noise.next() if self._noise else t

    def sample(self, L: int, M: int) -> float:
        return self.phase("full_forward", L, M)

    def prefix_bytes(self, L: int) -> int:
        return int(self.roofline.model.cached_tokens(L) * self.kv_bytes_per_token)
