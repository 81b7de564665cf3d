"""Capacity search: each evaluated point's P99 with its CI, pass or fail, and the bracket."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import axis_label, format_axis, log_scale_suits, new_figure, plain_log_axis, slo_line
from .sweep import metric_label

PASS_COLOUR, FAIL_COLOUR, UNDECIDED_COLOUR, BRACKET_COLOUR = "#1e8449", "#c0392b", "#d68910", "#f4d03f"
VERDICTS = (("pass", "o", PASS_COLOUR, "passed (upper CI bound ≤ SLO)"),
            ("undecided", "D", UNDECIDED_COLOUR, "undecided (CI straddles the SLO)"),
            ("fail", "X", FAIL_COLOUR, "failed"))


def verdict(point: dict) -> str:
    """`verdict` as written by the search, else from `passed` (older files)."""
    v = point.get("verdict")
    if v in ("pass", "fail", "undecided"):
        return v
    return "pass" if point["passed"] else "fail"


def _num(x) -> float:
    return np.nan if x is None else float(x)


def capacity(spec: dict) -> Figure:
    """Points in evaluation order (numbered), a light line through them in parameter order,
    the SLO, and the bracket [best passing, nearest failing] shaded.

    A point passes when its P99's upper confidence bound is within the SLO, fails when the
    lower bound is above it, and is undecided otherwise (the CI straddles the SLO)."""
    fig, ax = new_figure()
    pts = pd.DataFrame(spec["points"])
    pts["order"] = np.arange(1, len(pts) + 1)
    for c in ("value", "p99", "p99_lo", "p99_hi"):
        pts[c] = [_num(v) for v in pts.get(c, [None] * len(pts))]
    pts["verdict"] = [verdict(p) for p in spec["points"]]
    line = pts.sort_values("value")
    ax.plot(line["value"], line["p99"], color="0.7", linewidth=1, zorder=1)
    for v, marker, col, label in VERDICTS:
        g = pts[(pts["verdict"] == v) & np.isfinite(pts["p99"])]
        if g.empty:
            continue
        err = np.vstack([(g["p99"] - g["p99_lo"]).to_numpy(), (g["p99_hi"] - g["p99"]).to_numpy()])
        err = np.where(np.isfinite(err), np.clip(err, 0, None), 0)
        ax.errorbar(g["value"], g["p99"], yerr=err, fmt=marker, color=col, ecolor=col, capsize=4,
                    markersize=7, label=label, zorder=3)
    # One label per drawn position: a value evaluated twice (cached) reads "#4,6".
    for (value, p99), g in pts.fillna({"p99": -1.0}).groupby(["value", "p99"], sort=False):
        finite = p99 >= 0
        ax.annotate("#" + ",".join(str(o) for o in g["order"]), (value, p99 if finite else 0.96),
                    textcoords="offset points", xytext=(6, -10), fontsize=7, color="0.3",
                    xycoords="data" if finite else ax.get_xaxis_transform())
    unbounded = pts[~np.isfinite(pts["p99"])]
    if not unbounded.empty:   # P99 not reached (requests never finished): mark at the top
        ax.scatter(unbounded["value"], np.full(len(unbounded), 0.96), marker="^", s=60,
                   color=FAIL_COLOUR, transform=ax.get_xaxis_transform(), zorder=3,
                   label="P99 unbounded (requests never finished): fails")
    lo, hi = (_num(v) for v in (list(spec.get("bracket") or []) + [None, None])[:2])
    if np.isfinite(lo) and np.isfinite(hi):
        ax.axvspan(lo, hi, color=BRACKET_COLOUR, alpha=0.35, zorder=0,
                   label=f"bracket: passes at {lo:g}, fails at {hi:g}")
    else:
        for v, what in ((lo, "best passing"), (hi, "nearest failing")):
            if np.isfinite(v):
                ax.axvline(v, color=BRACKET_COLOUR, linewidth=3, alpha=0.7, label=f"{what}: {v:g}")
    slo_line(ax, spec.get("slo_ms"), axis="y")
    parameter = spec.get("parameter", "parameter")
    values = pts["value"].to_numpy(float)
    values = values[np.isfinite(values)]
    if log_scale_suits(values, ratio=10):   # searches expand and bisect geometrically
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        if len(values):
            ax.set_xlim(values.min() / 1.15, values.max() * 1.15)
    elif len(values):   # the unbounded markers do not take part in autoscaling
        pad = 0.05 * (values.max() - values.min()) or 0.05 * abs(values.max()) or 1.0
        ax.set_xlim(values.min() - pad, values.max() + pad)
    p99 = pts["p99"].to_numpy(float)
    if log_scale_suits(p99[np.isfinite(p99)], ratio=20):   # one overloaded point would squash the rest
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(axis_label(parameter))
    format_axis(ax.xaxis, parameter)
    ax.set_ylabel(metric_label(spec.get("metric", "e2e.p99_ms")) + ", CI bars")
    ax.set_title(f"Capacity search over {parameter}: {spec.get('evaluations', len(pts))} evaluations "
                 "(#n = order)")
    ax.grid(True, alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    return fig
