"""Sweep figures: a metric (with its CI band) against the sweep's x parameter.

One line per variant. Grid axes other than x become facets, one panel per combination of
their values, so every line in a panel differs only in its variant.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .figures import axis_label, colour, format_axis, log_scale_suits, new_figure, plain_log_axis, slo_line

METRIC_LABELS = {
    "e2e.p99_ms": "end-to-end P99 latency (ms)",
    "goodput_rps": "goodput: completed within SLO (requests/s)",
    "throughput_rps": "throughput (requests/s)",
    "slo_attainment": "SLO attainment (fraction of requests)",
}
MAX_FACETS = 12
CI_LABEL = "95% CI over replications"


def metric_label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if (m := re.fullmatch(r"(e2e|stages\.(.+))\.p(\d+(?:_\d+)?)_ms", metric)):
        where = "end-to-end" if m.group(1) == "e2e" else m.group(2)
        return f"{where} P{m.group(3).replace('_', '.')} latency (ms)"
    return axis_label(metric)


def numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def variants_in_order(points: pd.DataFrame, spec: dict) -> list[str]:
    """Variants as the sweep file lists them, then any others in order of appearance."""
    seen = list(dict.fromkeys(points["variant"]))
    listed = [v for v in spec.get("variants", {}) if v in seen]
    return listed + [v for v in seen if v not in listed]


def facet_axes(points: pd.DataFrame, spec: dict) -> list[str]:
    """Grid parameters other than x that the points table carries."""
    return [k for k in spec.get("grid", {}) if k != spec["x"] and k in points.columns]


def short(path: str) -> str:
    """The last two components of a dotted path: enough to tell facets apart."""
    return ".".join(path.split(".")[-2:])


def metric_vs_x(points: pd.DataFrame, spec: dict, metric: str, title: str,
                slo_ms: float | None = None, offered: bool = False) -> Figure:
    """`metric` (mean, and the band between `metric_lo` and `metric_hi` where known) vs x.

    `offered`: also draw y = x, for a rate axis against a throughput metric.
    """
    x = spec["x"]
    others = facet_axes(points, spec)
    combos = (list(points[others].drop_duplicates().sort_values(others).itertuples(index=False, name=None))
              if others else [()])
    if len(combos) > MAX_FACETS:
        title += f" (first {MAX_FACETS} of {len(combos)} panels)"
        combos = combos[:MAX_FACETS]
    is_num = numeric(points[x])
    ticks = None if is_num else list(dict.fromkeys([*(spec.get("grid") or {}).get(x, []), *points[x]]))
    n = len(combos)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    size = (8.0, 5.0) if n == 1 else (4.6 * ncols + 2.2, 3.4 * nrows + 0.9)
    fig, axes = new_figure(size, nrows=nrows, ncols=ncols, sharex=True, sharey=True, squeeze=False)
    flat = list(axes.ravel())
    variants = variants_in_order(points, spec)
    banded = barred = False
    log_y = metric.endswith("_ms") and log_scale_suits(pd.to_numeric(points[metric], errors="coerce"))
    for ax, combo in zip(flat, combos):
        sub = points
        for k, v in zip(others, combo):
            sub = sub[sub[k] == v]
        for i, variant in enumerate(variants):
            g = sub[sub["variant"] == variant]
            if g.empty:
                continue
            if is_num:
                g = g.sort_values(x)
                pos = g[x].to_numpy(float)
            else:
                pos = np.array([ticks.index(v) for v in g[x]], float)
                g = g.iloc[np.argsort(pos, kind="stable")]
                pos = np.sort(pos)
            y = pd.to_numeric(g[metric], errors="coerce").to_numpy(float)
            ax.plot(pos, y, marker="o", markersize=4, color=colour(i), label=variant)
            lo, hi = (pd.to_numeric(g.get(metric + s), errors="coerce") if metric + s in g else None
                      for s in ("_lo", "_hi"))
            if lo is not None and hi is not None:
                lo, hi = lo.to_numpy(float), hi.to_numpy(float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any() and is_num and len(pos) > 1:
                    ax.fill_between(pos, lo, hi, where=ok, color=colour(i), alpha=0.18, linewidth=0)
                    banded = True
                elif ok.any():   # categories or a lone point: a band would have no width
                    err = np.vstack([y - lo, hi - y])[:, ok].clip(0)
                    ax.errorbar(pos[ok], y[ok], yerr=err, fmt="none", ecolor=colour(i), capsize=5)
                    barred = True
        if offered and is_num:
            xs = np.sort(points[x].unique().astype(float))
            ax.plot(xs, xs, color="0.45", linestyle=":", linewidth=1.2, label="offered load")
        slo_line(ax, slo_ms, axis="y")
        if others:
            ax.set_title(", ".join(f"{short(k)}={v:g}" if isinstance(v, float) else f"{short(k)}={v}"
                                   for k, v in zip(others, combo)), fontsize=9)
        ax.grid(True, alpha=0.3)
        if is_num and log_scale_suits(points[x]):
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
            ax.set_xlim(-0.5, len(ticks) - 0.5)
        if not log_y:
            ax.set_ylim(bottom=0)
    if log_y:   # sharey: one call sets every panel
        flat[0].set_yscale("log")
        plain_log_axis(flat[0].yaxis)
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(axis_label(x))
        format_axis(ax.xaxis, x)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric_label(metric))
    by_label: dict[str, object] = {}
    for ax in flat[:n]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(lab, h)
    if banded:
        by_label[f"shaded: {CI_LABEL}"] = Patch(color="0.5", alpha=0.3)
    if barred:
        by_label[f"bars: {CI_LABEL}"] = Line2D([], [], color="0.4", marker="|", markersize=12,
                                               linestyle="none")
    handles, labels = list(by_label.values()), list(by_label)
    if not (banded or barred):
        title += " (no CI: one replication per point)"
    if log_y:
        title += ", log scale"
    if n == 1:
        flat[0].legend(handles, labels, loc="best", fontsize=8)
        flat[0].set_title(title)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8)
        fig.suptitle(title + (f" (facets: {', '.join(others)})" if others else ""))
    return fig
