"""Queue length over time per stage (stage totals: timeseries rows with node = -1)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figures import colour, new_figure, shade_warmup


def queue_lengths(ts: pd.DataFrame, stages: list[str], warmup_ms: float | None) -> Figure:
    """Requests waiting (not in service) per stage, one panel per stage on a shared time
    axis (queues of very different sizes stay readable), one replication (the first)."""
    rep = ts["replication"].min()
    x = ts[(ts["replication"] == rep) & (ts["node"] == -1)]
    n = max(len(stages), 1)
    fig, axes = new_figure((8.0, max(5.0, 1.5 * n + 1.2)), nrows=n, sharex=True, squeeze=False)
    axes = axes[:, 0]
    for i, (ax, stage) in enumerate(zip(axes, stages)):
        s = x[x["stage"] == stage].sort_values("time_ms")
        shade_warmup(ax, (warmup_ms or 0) / 1000.0)
        ax.step(s["time_ms"] / 1000.0, s["queue_len"], where="post", color=colour(i), linewidth=1.1)
        top = float(s["queue_len"].max()) if len(s) else 0.0
        if top == 0:
            ax.text(0.5, 0.5, "queue empty at every sample", ha="center", va="center",
                    transform=ax.transAxes, color="0.4", fontsize=9)
        ax.set_ylim(0, max(1.0, top) * 1.12)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        ax.set_ylabel(stage, rotation=0, ha="right", va="center")
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    fig.supylabel("queue length (requests waiting)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:   # the warm-up shading; each panel's stage is its y label
        fig.legend(handles, labels, loc="outside lower center", fontsize=8)
    axes[-1].set_xlabel("simulated time (s)")
    axes[0].set_title(f"Queue length per stage over time (replication {rep}, sampled)")
    return fig
