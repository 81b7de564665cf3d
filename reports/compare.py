"""The compare report: overlaid latency CDFs of the runs, the key figures of every entry
with their intervals, and each entry's difference from the first (simulator/compare.py
computes the figures; this module only draws and lays them out)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from simrec.compare import HIGHER_IS_BETTER, NOT_JUDGED

from .figures import colour, new_figure, png_bytes, slo_line
from .html import MISSING, Plot, figure, note, num, page, paragraph, pct, table, with_ci
from .latency import _ecdf, cdf_axes, measured_latency

MAX_CDF_RUNS = 10      # overlaid curves beyond this are unreadable


def _label(metric: str) -> str:
    names = {"e2e.p50_ms": "end-to-end P50 (ms)", "e2e.p99_ms": "end-to-end P99 (ms)",
             "e2e.p99_9_ms": "end-to-end P99.9 (ms)", "throughput_rps": "throughput (req/s)",
             "goodput_rps": "goodput (req/s)", "slo_attainment": "SLO attainment (fraction)"}
    if metric in names:
        return names[metric]
    parts = metric.split(".")
    if parts[0] == "stages" and parts[-1] == "p99_ms":
        return f"{'.'.join(parts[1:-1])} P99 (ms)"
    return metric


def latency_cdfs(runs: list[tuple[str, np.ndarray]], slo_ms: float | None):
    """CDF (left) and tail P(latency > x) (right) of each run's measured requests, pooled
    over its replications, overlaid."""
    fig, (ax, tail) = new_figure((11.0, 4.8), ncols=2)
    smallest = None
    for i, (label, lat) in enumerate(runs):
        x, y = _ecdf(lat)
        unfinished = int((~np.isfinite(lat)).sum())
        text = f"{label} ({len(lat):,} requests" + (f", {unfinished:,} unfinished)" if unfinished else ")")
        kw = dict(where="post", color=colour(i), linewidth=1.6 if i == 0 else 1.2)
        ax.step(x, y, label=text, **kw)
        tail.step(x, 1 - y, **kw)
        if len(lat):
            smallest = min(smallest or len(lat), len(lat))
    cdf_axes(ax, tail, slo_ms, smallest or 0, "End-to-end latency CDF (measured requests, pooled)")
    ax.legend(loc="lower right", fontsize=7)
    return fig


def _panels(n: int, rows_per_panel: int):
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    height = max(2.2, 0.32 * rows_per_panel + 1.2)
    fig, axes = new_figure((4.2 * cols + 1.5, height * nrows), nrows=nrows, ncols=cols, squeeze=False)
    flat = list(axes.ravel())
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def _forest(ax, labels: list[str], values: list[tuple], zero: bool = False, colours=None) -> None:
    """One row per entry: a point with its interval (the first entry on top)."""
    y = np.arange(len(labels))[::-1]
    for yi, (m, lo, hi), c in zip(y, values, colours or [None] * len(values)):
        if m is None or (isinstance(m, float) and math.isnan(m)):
            ax.text(0.02, yi, "unbounded", va="center", fontsize=7, color="0.4",
                    transform=ax.get_yaxis_transform())
            continue
        err = None if lo is None else [[m - lo], [hi - m]]
        ax.errorbar(m, yi, xerr=err, fmt="o", color=c or "black", ecolor=c or "0.3", capsize=3,
                    markersize=4, linewidth=1.2)
    if zero:
        ax.axvline(0, color="0.5", linewidth=1, linestyle="--")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(True, axis="x", alpha=0.3)


def key_metrics(entries, table: pd.DataFrame, metrics: list[str]):
    """Each key figure of each entry with its 95% interval, a panel per figure."""
    fig, axes = _panels(len(metrics), len(entries))
    labels = [e.label for e in entries]
    for ax, m in zip(axes, metrics):
        vals = [_row(table, i, m, ("mean", "lo", "hi")) for i in range(len(entries))]
        _forest(ax, labels, vals, colours=[colour(0) if i == 0 else None for i in range(len(entries))])
        ax.set_title(_label(m), fontsize=9)
        if m == "e2e.p99_ms" or m.endswith(".p99_ms"):
            slo = entries[0].slo_ms if m == "e2e.p99_ms" else None
            slo_line(ax, slo, axis="x")
    for ax in axes[1:]:
        if ax.get_subplotspec().colspan.start:     # entry names on the left column only
            ax.set_yticklabels([])
    fig.suptitle("Key figures, mean and 95% interval over replications (first entry in blue)")
    return fig


def differences(entries, table: pd.DataFrame, metrics: list[str]):
    """Each entry's difference from the first, with its 95% interval; red where the
    interval lies on the worse side of zero, green on the better side (`worse_side`)."""
    fig, axes = _panels(len(metrics), len(entries) - 1)
    labels = [e.label for e in entries[1:]]
    for ax, m in zip(axes, metrics):
        vals = [_row(table, i, m, ("diff", "diff_lo", "diff_hi")) for i in range(1, len(entries))]
        _forest(ax, labels, vals, zero=True, colours=[_side_colour(m, v) for v in vals])
        ax.set_title(f"Δ {_label(m)}", fontsize=9)
    for ax in axes[1:]:
        if ax.get_subplotspec().colspan.start:
            ax.set_yticklabels([])
    fig.suptitle(f"Difference from {entries[0].label}, with its 95% interval")
    return fig


def worse_side(metric: str, lo, hi) -> str | None:
    """'worse' / 'better' when the difference's interval excludes zero, else None."""
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return None
    if lo <= 0 <= hi or metric in NOT_JUDGED:
        return None
    up = lo > 0
    return "better" if up == (metric in HIGHER_IS_BETTER) else "worse"


def _side_colour(metric: str, v: tuple) -> str:
    side = worse_side(metric, v[1], v[2])
    return {"worse": "#b03a2e", "better": "#1e8449"}.get(side, "0.3")


def _row(table: pd.DataFrame, entry: int, metric: str, keys: tuple) -> tuple:
    sel = table[(table["entry"] == entry) & (table["metric"] == metric)]
    if sel.empty:
        return None, None, None
    return tuple(_plain(sel.iloc[0][k]) for k in keys)


def _plain(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def compare_report(entries, table: pd.DataFrame, metrics: list[str]) -> tuple[list[Plot], str]:
    """The plots and the page."""
    plots = []
    runs = [e for e in entries if e.kind == "run"][:MAX_CDF_RUNS]
    if runs:
        lat = [(e.label, measured_latency(e.results.requests.select(["replication", "warmup", "latency_ms"])
                                          .to_pandas())["latency_ms"].to_numpy()) for e in runs]
        plots.append(Plot("latency_cdfs", "End-to-end latency of each run's measured requests (pooled over "
                          "replications), overlaid: CDF and tail, with the first run's SLO.",
                          png_bytes(latency_cdfs(lat, runs[0].slo_ms))))
    plots.append(Plot("key_metrics", "Key figures of every entry: mean and 95% confidence interval over "
                      "replications.", png_bytes(key_metrics(entries, table, metrics))))
    plots.append(Plot("differences", f"Difference of each entry from the first ({entries[0].label}) with "
                      "its 95% interval (paired over replications for runs with equal replication "
                      "counts, else Welch); red: worse, green: better beyond the interval (throughput and goodput "
                      "follow the offered load and are not judged).",
                      png_bytes(differences(entries, table, metrics))))
    return plots, compare_page(entries, table, metrics, plots)


def _fmt(metric: str):
    return pct if metric == "slo_attainment" else num


def compare_page(entries, long: pd.DataFrame, metrics: list[str], plots: list[Plot]) -> str:
    ident = [[e.label, e.kind, str(e.folder),
              ", ".join(f"{k}={v}" for k, v in e.params.items() if v is not None) or MISSING,
              MISSING if e.seed is None else str(e.seed),
              str(max((f.n for f in e.figures.values()), default=0))] for e in entries]
    figs = []
    for i, e in enumerate(entries):
        figs.append([e.label] + [with_ci(*_row(long, i, m, ("mean", "lo", "hi")), fmt=_fmt(m))
                                 for m in metrics])
    diffs, classes = [], []
    for i, e in enumerate(entries[1:], 1):
        row, cls = [e.label], [None]
        for m in metrics:
            d, lo, hi = _row(long, i, m, ("diff", "diff_lo", "diff_hi"))
            f = _fmt(m)
            row.append(MISSING if d is None else with_ci(d, lo, hi, fmt=lambda v, f=f: ("+" if v > 0 else "") + f(v)))
            cls.append({"worse": "fail", "better": "pass"}.get(worse_side(m, lo, hi)))
        diffs.append(row)
        classes.append(cls)
    headers = ["entry"] + [_label(m) for m in metrics]
    notes = [f"{e.label}: {w}" for e in entries for w in e.warnings]
    sections = []
    if notes:
        sections.append(("Read this first", "".join(note(n) for n in notes)))
    sections += [
        ("Entries", paragraph("A run folder is one entry; a sweep or capacity folder gives one entry "
                              "per point. Differences are taken against the first entry.")
         + table(["entry", "kind", "folder", "what", "seed", "replications"], ident, lambda i, j: "text"
                 if j in (2, 3) else None)),
        ("Key figures", paragraph("Mean [95% confidence interval] over replications.")
         + table(headers, figs)),
        (f"Differences from {entries[0].label}",
         paragraph("Entry minus first entry [95% interval of the difference]: paired over replications "
                   "when both are runs with equal replication counts, else Welch's interval from each "
                   "side's own. Red: worse beyond the interval; green: better (throughput and goodput follow "
                   "the offered load and are not judged).")
         + table(headers, diffs, lambda i, j: classes[i][j])),
        ("Plots", "".join(figure(p) for p in plots)),
    ]
    kinds = sorted({e.kind for e in entries})
    subtitle = f"{len(entries)} entries ({', '.join(kinds)}) from {len({e.folder for e in entries})} folders"
    return page("simrec compare", subtitle, sections)
