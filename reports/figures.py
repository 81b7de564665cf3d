"""Shared figure conventions: size, colours, the SLO line, axis units, PNG encoding.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas attached directly, so
nothing here touches pyplot's global state or needs a display, and a notebook's backend is
left alone.
"""

from __future__ import annotations

import io
import re

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

SIZE = (8.0, 5.0)   # inches
DPI = 120
SLO_COLOUR = "#c0392b"
WARMUP_COLOUR = "0.88"
_PALETTE = colormaps["tab10"].colors

# Units implied by a dotted field or metric name (scenario fields carry their units).
_UNITS = [(r"zipf_s$", None), (r"_(qps|rps)$", "requests/s"), (r"_ms$", "ms"), (r"_s$", "s"), (r"_bytes$", "GB"),
          (r"_gbps$", "GB/s"), (r"(history_len(\.\w+)?|_len)$", "tokens"),
          (r"nodes\.count$", "instances"), (r"users\.count$", "users"), (r"max_size$", "requests"),
          (r"(attainment|_rate|_fraction)$", "fraction")]


def new_figure(size: tuple[float, float] = SIZE, **subplots) -> tuple[Figure, object]:
    """A figure with constrained layout and its axes (`subplots` as for Figure.subplots)."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def png_bytes(fig: Figure) -> bytes:
    """Encode a figure as PNG; no timestamp or software tag, so output is reproducible."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def colour(i: int) -> tuple:
    return _PALETTE[i % len(_PALETTE)]


def slo_line(ax, slo_ms: float | None, axis: str = "y", label: str | None = None) -> None:
    """Draw the SLO budget as a red dashed line across the axes (`axis` holds latency)."""
    if slo_ms is None or not np.isfinite(slo_ms):
        return
    label = label or f"SLO: P99 ≤ {slo_ms:g} ms"
    draw = ax.axhline if axis == "y" else ax.axvline
    draw(slo_ms, color=SLO_COLOUR, linestyle="--", linewidth=1.6, label=label, zorder=5)


def shade_warmup(ax, warmup_s: float | None) -> None:
    if warmup_s and warmup_s > 0:
        ax.axvspan(0, warmup_s, color=WARMUP_COLOUR, zorder=0, label="warm-up (not measured)")


def plain_log_axis(axis) -> None:
    """Log-scale tick labels as plain numbers (2, 5, 10, 20 ...) rather than 2x10^0."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def unit_of(name: str) -> str | None:
    """Unit implied by a dotted field or metric name, e.g. `workload.rate_qps` -> requests/s.
    Byte-valued fields are shown in GB (see `format_axis`)."""
    return next((unit for pattern, unit in _UNITS if re.search(pattern, name)), None)


def format_axis(axis, name: str) -> None:
    """Ticks in the unit `axis_label` names: bytes are shown as GB."""
    if name.endswith("_bytes"):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e9:g}"))


def axis_label(name: str) -> str:
    unit = unit_of(name)
    return f"{name} ({unit})" if unit else name


def log_scale_suits(values, ratio: float = 20) -> bool:
    """Numeric, positive values spanning at least `ratio` read better on a log axis."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return len(v) > 1 and bool((v > 0).all()) and v.max() / v.min() >= ratio
