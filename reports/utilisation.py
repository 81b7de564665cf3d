"""Utilisation per stage: mean over nodes with its confidence interval, and each node."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .figures import colour, new_figure


def _val(x) -> float:
    return np.nan if x is None else float(x)


def utilisation(summary: dict) -> Figure:
    """Bars of `utilisation.<stage>.stage` (busy time / measurement window, mean over nodes)
    with the CI over replications; dots are the per-node means, to show imbalance."""
    fig, ax = new_figure()
    util = summary["metrics"].get("utilisation", {})
    names = list(util)
    level = summary.get("ci", {}).get("level", 0.95)
    ticks = []
    for i, name in enumerate(names):
        stage = util[name]["stage"]
        mean, lo, hi = (100 * _val(stage[k]) for k in ("mean", "lo", "hi"))
        yerr = None if np.isnan(lo) else [[mean - lo], [hi - mean]]
        ax.bar(i, mean, width=0.6, color=colour(i), yerr=yerr, capsize=6, ecolor="black",
               label=f"mean over nodes, {level:.0%} CI" if i == 0 else None)
        ticks.append(f"{name}\n{mean:.0f}%" + ("" if np.isnan(lo) else f" [{lo:.0f}, {hi:.0f}]"))
        nodes = [100 * _val(n["mean"]) for n in util[name].get("nodes", [])]
        if nodes:
            jitter = np.linspace(-0.24, 0.24, len(nodes)) if len(nodes) > 1 else np.zeros(1)
            ax.scatter(i + jitter, nodes, s=14, color="black", alpha=0.6, zorder=3,
                       label="per node" if i == 0 else None)
    ax.axhline(100, color="0.3", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(names)), ticks)
    ax.set_ylim(0, 110)
    ax.set_xlabel(f"stage: mean utilisation [{level:.0%} CI]")
    ax.set_ylabel("utilisation (% of node time busy)")
    ax.set_title("Utilisation per stage (measurement window)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig
