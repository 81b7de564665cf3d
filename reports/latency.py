"""End-to-end latency: the distribution (CDF and tail) and where a P99 request's time goes.

Both use measured requests only (`warmup == False`). A request that never finished counts
as infinitely late: it stays in the denominator of the CDF but draws no point.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from simrec.results import MEDIAN_BAND, MIN_BAND, P99_BAND, band_rows, band_split  # noqa: F401

from .figures import colour, new_figure, plain_log_axis, slo_line

# Latency bands compared in the breakdown: (label, lower percentile, upper percentile);
# the P99 band and the per-band means are simrec.results' (summary.json's p99_attribution).
BANDS = (("median", *MEDIAN_BAND), ("P99", *P99_BAND))
_LABELLED_REPS = 5    # name each replication in the legend up to this many
_POINTS = 2000        # points drawn per curve below the 99th percentile


def measured_latency(req: pd.DataFrame) -> pd.DataFrame:
    """Measured requests with `latency_ms` finite, or +inf for requests that never finished."""
    m = req[~req["warmup"].astype(bool)].copy()
    m["latency_ms"] = m["latency_ms"].astype(float).fillna(np.inf)
    return m


def _ecdf(latency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite latencies and F(x) over all requests, thinned below the 99th percentile
    (every tail point is kept: the tail is what the plot is for)."""
    n = len(latency)
    x = np.sort(latency[np.isfinite(latency)])
    y = np.arange(1, len(x) + 1) / max(n, 1)
    if len(x) > _POINTS:
        tail = int(0.99 * len(x))
        keep = np.unique(np.concatenate([np.linspace(0, tail, _POINTS).astype(int),
                                         np.arange(tail, len(x))]))
        x, y = x[keep], y[keep]
    return x, y


def cdf_axes(ax, tail, slo_ms: float | None, n: int, title: str, log_x: bool = True) -> None:
    """The axes of a latency CDF (ax) and its tail P(latency > x) (tail) for n samples at
    most: SLO line, log latency axis, P99 guides, titles; the tail's log axis reaches 1/n."""
    for a in (ax, tail):
        slo_line(a, slo_ms, axis="x")
        a.set_xlabel("end-to-end latency (ms, log scale)")
        a.grid(True, which="both", alpha=0.3)
        if log_x:
            a.set_xscale("log")
            plain_log_axis(a.xaxis)
    ax.axhline(0.99, color="0.4", linestyle=":", linewidth=1.2, label="P99 (F = 0.99)")
    tail.axhline(0.01, color="0.4", linestyle=":", linewidth=1.2)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title(title)
    tail.set_ylabel("fraction of requests > x (log scale)")
    tail.set_title("Tail: P(latency > x)")
    if n:
        tail.set_yscale("log")
        tail.set_ylim(0.5 / n, 1.05)
        plain_log_axis(tail.yaxis)          # reports render without mathtext (parse_math off)


def latency_cdf(req: pd.DataFrame, slo_ms: float | None, name: str = "") -> Figure:
    """CDF of end-to-end latency (left) and its tail, P(latency > x) on a log axis (right)."""
    fig, (ax, tail) = new_figure((11.0, 4.8), ncols=2)
    m = measured_latency(req)
    reps = sorted(m["replication"].unique())
    for i, rep in enumerate(reps if len(reps) > 1 else []):
        x, y = _ecdf(m.loc[m["replication"] == rep, "latency_ms"].to_numpy())
        label = (f"replication {rep}" if len(reps) <= _LABELLED_REPS
                 else (f"each of {len(reps)} replications" if i == 0 else None))
        kw = dict(linewidth=0.9, alpha=0.7, color=colour(i + 1) if len(reps) <= _LABELLED_REPS else "0.6")
        ax.step(x, y, where="post", label=label, **kw)
        tail.step(x, 1 - y, where="post", **kw)
    lat = m["latency_ms"].to_numpy()
    x, y = _ecdf(lat)
    unfinished = int((~np.isfinite(lat)).sum())
    pooled = f"pooled ({len(lat):,} requests" + (f", {unfinished:,} unfinished)" if unfinished else ")")
    ax.step(x, y, where="post", color="black", linewidth=1.8, label=pooled)
    tail.step(x, 1 - y, where="post", color="black", linewidth=1.8)
    cdf_axes(ax, tail, slo_ms, len(lat), "End-to-end latency CDF (measured requests)", len(x) > 0)
    if not len(lat):
        ax.text(0.5, 0.5, "no measured requests", ha="center", transform=ax.transAxes)
    ax.legend(loc="lower right", fontsize=8)
    if name:
        fig.suptitle(name)
    return fig


def p99_breakdown(req: pd.DataFrame, stages: list[str], slo_ms: float | None) -> Figure:
    """Mean queue wait, service and network hop per stage, stacked in cascade order, for the
    requests near the P99 of end-to-end latency (and, for contrast, near the median)."""
    fig, ax = new_figure()
    m = measured_latency(req)
    lat = m["latency_ms"].to_numpy()
    parts = [(s, kind) for s in stages for kind in ("wait", "service", "hop")]
    labels, totals = [], []
    shown: dict[tuple[str, str], bool] = {}
    bars = []
    for band, lo, hi in BANDS:
        b = band_split(lat, {p: m[f"{p[0]}_{p[1]}_ms"].to_numpy(float) for p in parts}, lo, hi)
        unfinished, n = b["unfinished"], b["requests"]
        bars.append([b["parts"][p] if n and b["parts"][p] == b["parts"][p] else 0.0 for p in parts])
        totals.append(b["latency_ms"] if n else 0.0)
        labels.append(f"{band} band\nP{lo:g}–P{hi:g}\n(n={n:,})"
                      + (f"\n+{unfinished:,} unfinished" if unfinished else ""))
    widest = max(max(totals, default=0.0), slo_ms or 0.0) or 1.0
    for y, means in enumerate(bars):
        left = 0.0
        for (stage, kind), w in zip(parts, means):
            if not w > 0:
                continue
            i = stages.index(stage)
            style = {"wait": dict(color=colour(i), alpha=0.45, hatch="///", edgecolor=colour(i)),
                     "service": dict(color=colour(i)),
                     "hop": dict(color="0.55")}[kind]
            ax.barh(y, w, left=left, height=0.55, linewidth=0.6, **style)
            shown[(stage, kind)] = True
            if w > 0.06 * widest:
                ax.text(left + w / 2, y, f"{w:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if kind == "wait" else "white")
            left += w
        ax.text(left + 0.01 * widest, y, f"{totals[y]:.1f} ms" if left > 0 else
                "requests in this band never finished", va="center", fontsize=9)
    slo_line(ax, slo_ms, axis="x")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlim(0, widest * 1.15)
    ax.set_xlabel("mean time per request (ms)")
    ax.set_title("Where the P99 request's time goes (measured requests, pooled replications)")
    ax.grid(True, axis="x", alpha=0.3)
    handles = []
    for i, s in enumerate(stages):
        if shown.get((s, "wait")):
            handles.append(Patch(facecolor=colour(i), alpha=0.45, hatch="///", edgecolor=colour(i),
                                 label=f"{s}: queue wait"))
        if shown.get((s, "service")):
            handles.append(Patch(color=colour(i), label=f"{s}: service"))
    if any(k == "hop" for _, k in shown):
        handles.append(Patch(color="0.55", label="network hops"))
    handles += [h for h in ax.get_legend_handles_labels()[0] if h.get_label().startswith("SLO")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    return fig
