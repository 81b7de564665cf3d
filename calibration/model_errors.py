"""The cost models' own errors on a measured table, kept in its manifest's `errors` block.

- ``interpolation``: leave-one-grid-point-out. For each phase's isolated medians, a grid
  point that is interior along an axis (L or M) is predicted from its two neighbours on that
  axis, linearly in log(time) over log(shape), as the table's interpolator would predict it
  had that grid value not been measured. A point interior along both axes gives one
  prediction per axis.
- ``roofline``: the roofline fitted on the table (`simrec.roofline.fit_table`) against the
  same medians, on the table's own device. In-sample: the three fitted parameters saw these
  points.

Errors are |predicted / measured - 1|, summarised per phase by their median, P90 (numpy's
linear quantile) and max. Writing them rewrites manifest.json only; the table file and so
its sha256 are unchanged. No torch needed.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from simrec.errors import InputError

from .table import TABLES_DIR, load_table, resolve

CONDITION = "isolated"


def _stats(err: np.ndarray, worst: dict | None = None) -> dict:
    out = {"n": int(len(err))}
    if len(err):
        out.update(median=round(float(np.median(err)), 4), p90=round(float(np.quantile(err, 0.9)), 4),
                   max=round(float(err.max()), 4))
    if worst:
        out["worst"] = worst
    return out


def loo_interpolation(table) -> dict[str, dict]:
    """Per phase: leave-one-grid-point-out interpolation errors of the isolated medians."""
    out = {}
    for (phase, cond), c in sorted(table.curves.items()):
        if cond != CONDITION:
            continue
        y = c.log_ms[:, :, int(np.flatnonzero(c.quantiles == 0.5)[0])]
        errs, where = [], []
        for axis, grid in ((0, c.history_len), (1, c.candidates)):
            x = np.log(grid) if len(grid) > 2 else None
            for i in range(1, len(grid) - 1) if x is not None else ():
                t = (x[i] - x[i - 1]) / (x[i + 1] - x[i - 1])
                lo, mid, hi = (np.take(y, k, axis=axis) for k in (i - 1, i, i + 1))
                e = np.abs(np.exp((1 - t) * lo + t * hi - mid) - 1)
                for j, v in enumerate(e):
                    L, M = (grid[i], c.candidates[j]) if axis == 0 else (c.history_len[j], grid[i])
                    errs.append(v)
                    where.append({"L": int(L), "M": int(M), "axis": "L" if axis == 0 else "M"})
        err = np.asarray(errs, float)
        worst = {**where[int(np.argmax(err))], "error": round(float(err.max()), 4)} if len(err) else None
        out[phase] = _stats(err, worst)
    return out


def roofline_errors(table_ref: str, launches_per_layer: int = 12) -> dict:
    """The roofline fitted on the table and its error per phase (or why it could not be fitted)."""
    from simrec.roofline import fit_table
    try:
        fit = fit_table(table_ref, launches_per_layer)
    except InputError as e:
        return {"skipped": e.message}
    s = fit.summary()
    phases = {}
    for ph, err in fit.relative_errors().items():
        L, M, _ = fit.points[ph]
        k = int(np.argmax(err))
        phases[ph] = _stats(err, {"L": int(L[k]), "M": int(M[k]), "error": round(float(err[k]), 4)})
    return {
        "method": "time = max(FLOPs / (peak x compute_efficiency), bytes / (hbm x memory_efficiency)) "
                  "+ launches x launch_overhead x launch_scale (simrec.roofline); efficiencies and "
                  "launch_scale fitted by least squares on log time over these isolated medians, "
                  "so the errors are in-sample",
        "device": s["device"], "device_source": s["device_source"],
        "fit": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()
                if k in ("compute_efficiency", "memory_efficiency", "launch_scale",
                         "launches_per_call", "per_call_overhead_ms")},
        "phases": phases,
    }


def compute_errors(ref: str, launches_per_layer: int = 12) -> dict:
    """The `errors` block for a table: LOO interpolation and roofline-vs-measured errors."""
    table = load_table(ref)
    return {
        "computed": datetime.date.today().isoformat(),
        "statistic": "|predicted / measured - 1| over grid points of the isolated medians, "
                     "per phase: median, p90, max; n = predictions",
        "interpolation_loo": {
            "method": "each grid point interior along L (or M) predicted from its two neighbours "
                      "on that axis, linear in log time over log shape",
            "phases": loo_interpolation(table),
        },
        "roofline": roofline_errors(ref, launches_per_layer),
    }


def is_builtin(ref: str) -> bool:
    """A table shipped inside the package: read-only (an install's site-packages, or the
    checkout's own calibration/tables, whose files are part of the source)."""
    try:
        return resolve(ref).resolve().is_relative_to(TABLES_DIR.resolve())
    except OSError:
        return False


def write_errors(ref: str, errors: dict) -> Path:
    """Replace the manifest's `errors` block, keeping every other key and the table's hash.
    A built-in table is refused: copy its folder and write there."""
    mpath = resolve(ref)
    if is_builtin(ref):
        raise InputError("a built-in cost table is read-only; copy its folder and give the copy "
                         "(or --out DIR with --errors-only)", ref)
    load_table(ref)                                 # valid, sha256 matching
    manifest = json.loads(mpath.read_text())
    manifest["errors"] = errors
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    load_table.cache_clear()
    load_table(ref)                                 # still valid
    return mpath


def format_errors(errors: dict) -> str:
    """Lines for a terminal: one per phase and model."""
    def pct(s: dict) -> str:
        if not s.get("n"):
            return "   (no interior points)"
        return f"median {s['median']:6.1%}  p90 {s['p90']:6.1%}  max {s['max']:6.1%}  (n={s['n']})"

    lines = ["leave-one-grid-point-out interpolation error (isolated medians):"]
    for ph, s in errors["interpolation_loo"]["phases"].items():
        lines.append(f"  {ph:16s} {pct(s)}")
    r = errors["roofline"]
    if "skipped" in r:
        lines.append(f"roofline: not fitted ({r['skipped']})")
        return "\n".join(lines)
    f = r["fit"]
    lines.append(f"roofline vs measured on {r['device']['name']} ({r['device_source']} peaks), in-sample: "
                 f"compute_efficiency {f['compute_efficiency']:.3g}, memory_efficiency "
                 f"{f['memory_efficiency']:.3g}, per-call overhead {f['per_call_overhead_ms']:.3g} ms")
    for ph, s in r["phases"].items():
        lines.append(f"  {ph:16s} {pct(s)}")
    return "\n".join(lines)
