"""Plots and a self-contained HTML report built from a results folder.

    from simrec.reports import build_report
    build_report(Path("results/default-cascade"))   # -> [plots/*.png ..., report.html]

The folder kind is recognised by its marker file: `summary.json` (a run: latency CDF,
P99 breakdown, utilisation, queue length, and prefix-cache memory when the scenario has a
`relay` block), `sweep.json` (P99 and goodput against the sweep's x parameter, per
variant) or `capacity.json` (P99 at each evaluated value, pass/fail and the bracket).
Plots go to `plots/*.png` (matplotlib, Agg canvas, no display) and are embedded in
`report.html` as data URIs. Module per figure: latency, utilisation, queues, occupancy,
sweep, capacity; `pages` and `html` build the document, `build` reads and writes folders.
"""

from .build import build_report

__all__ = ["build_report"]
