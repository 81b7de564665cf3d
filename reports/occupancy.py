"""Prefix-cache memory over time on the relay stage: HBM (used, pinned) and host DRAM."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from .figures import colour, new_figure, shade_warmup

GB = 1e9
MEMORY_COLUMNS = ("hbm_used_bytes", "hbm_pinned_bytes", "dram_used_bytes")


def occupancy(ts: pd.DataFrame, relay: dict, nodes: int, warmup_ms: float | None) -> Figure:
    """Bytes summed over the relay stage's nodes, one replication (the first in `ts`),
    with the configured capacity (per-instance bytes x nodes) as a dotted line."""
    stage = relay.get("stage", "ranking")
    rep = ts["replication"].min()
    x = ts[(ts["replication"] == rep) & (ts["stage"] == stage) & (ts["node"] >= 0)]
    total = x.groupby("time_ms")[list(MEMORY_COLUMNS)].sum().sort_index()
    t = total.index.to_numpy() / 1000.0
    hbm_cap = relay.get("cache", {}).get("hbm_bytes")
    dram_cap = relay.get("expander", {}).get("dram_bytes") or 0
    fig, (hbm, dram) = new_figure(nrows=2, sharex=True)
    hbm.plot(t, total["hbm_used_bytes"] / GB, color=colour(0), label="HBM prefix cache: used")
    hbm.plot(t, total["hbm_pinned_bytes"] / GB, color=colour(1), label="HBM: pinned (awaiting ranking)")
    if hbm_cap:
        hbm.axhline(hbm_cap * nodes / GB, color="0.3", linestyle=":",
                    label=f"HBM capacity ({nodes} × {hbm_cap / GB:.3g} GB)")
    hbm_cols = ["hbm_used_bytes", "hbm_pinned_bytes"]
    if "emb_bytes" in x:   # an HBM pool shared with the embedding cache: the boundary moves
        pool = x.groupby("time_ms")[["emb_bytes", "kv_capacity_bytes", "emb_filled_bytes"]].sum().sort_index()
        total = total.join(pool)
        hbm.plot(t, total["kv_capacity_bytes"] / GB, color="0.3", linestyle=":",
                 label="KV side of the pool (partition boundary)")
        hbm.plot(t, total["emb_bytes"] / GB, color=colour(3), label="EMB side of the pool")
        hbm.plot(t, total["emb_filled_bytes"] / GB, color=colour(4), linestyle="--",
                 label="EMB: filled with valid rows")
        hbm_cols += ["kv_capacity_bytes", "emb_bytes"]
    dram.plot(t, total["dram_used_bytes"] / GB, color=colour(2), label="DRAM expander: used")
    if dram_cap:
        dram.axhline(dram_cap * nodes / GB, color="0.3", linestyle=":",
                     label=f"DRAM capacity ({nodes} × {dram_cap / GB:.3g} GB)")
    else:
        dram.text(0.5, 0.5, "no DRAM expander configured", ha="center", va="center",
                  transform=dram.transAxes, color="0.4")
    for ax, cap, cols in ((hbm, hbm_cap, hbm_cols),
                          (dram, dram_cap, ["dram_used_bytes"])):
        shade_warmup(ax, (warmup_ms or 0) / 1000.0)
        top = max(float(total[cols].to_numpy().max(initial=0)), (cap or 0) * nodes) / GB
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    hbm.set_ylabel("HBM (GB)")
    dram.set_ylabel("host DRAM (GB)")
    dram.set_xlabel("simulated time (s)")
    hbm.set_title(f"Prefix-cache memory on stage '{stage}', summed over {nodes} nodes "
                  f"(replication {rep})")
    return fig
