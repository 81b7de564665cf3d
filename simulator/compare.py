"""`simrec compare`: runs, and the points of sweeps and capacity searches, side by side.

Each run folder is one entry; a sweep or capacity folder gives one entry per point. Every
figure is shown with its confidence interval, and as a difference from the first entry
with an interval of that difference: paired over replications when both entries are runs
with the same number of replications (replication i of each shares its random streams when
the seeds are equal, which narrows the interval; the pairs are independent either way), else
Welch's interval from each side's own interval (a Student-t interval gives back its
standard error). The output folder holds compare.csv (long form: one row per entry and
figure), report.html and plots/*.png; the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, malformed
from .folders import atomic_folder
from .results import FLAT_SKIP, Results, SweepResults, load_results
from .stats import CI_LEVEL, _t

# The figures in the printed table and the report's plots (stage P99s are added per stage).
KEY = ("e2e.p50_ms", "e2e.p99_ms", "e2e.p99_9_ms", "throughput_rps", "goodput_rps", "slo_attainment")
# Judged better or worse when the difference's interval excludes zero: latencies (lower is
# better) and SLO attainment (higher). Throughput and goodput follow the offered load, so a
# change in them is shown but not judged.
HIGHER_IS_BETTER = ("slo_attainment",)
NOT_JUDGED = ("throughput_rps", "goodput_rps", "offered_rps")


@dataclass
class Estimate:
    """One figure of one entry: the mean, its interval, the replications behind it (their
    values where known: runs)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    values: list | None = None


@dataclass
class Entry:
    label: str
    folder: Path
    kind: str                        # run | sweep | capacity
    point: int | None = None         # the point's row in points.parquet
    params: dict = field(default_factory=dict)
    figures: dict[str, Estimate] = field(default_factory=dict)
    seed: int | None = None
    results: Results | None = None   # a run: its requests are read when the report needs them
    warnings: list[str] = field(default_factory=list)
    slo_ms: float | None = None
    stages: list[str] = field(default_factory=list)


def run_figures(summary: dict) -> dict[str, Estimate]:
    """Every figure of a run summary, by its flat name (as `flat_metrics` names them)."""
    out: dict[str, Estimate] = {}

    def walk(node, path):
        if path in FLAT_SKIP:
            return
        if isinstance(node, dict) and "mean" in node and "replications" in node:
            reps = node["replications"]
            if not isinstance(reps, list) or not all(_real_or_none(node[k]) for k in ("mean", "lo", "hi")):
                raise TypeError(f"metrics.{path}: mean, lo and hi must be numbers or null, "
                                f"replications a list")     # else differences fail later
            out[path] = Estimate(node["mean"], node["lo"], node["hi"], len(reps), list(reps))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
    walk(summary["metrics"], "")
    return out


def _real_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _value(v):
    """A plain Python value from a pandas cell (NaN -> None)."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def load_entries(folders: list[Path]) -> list[Entry]:
    """The entries of these folders, in order: a run each, a point each for the others."""
    entries: list[Entry] = []
    for folder in folders:
        with malformed(str(folder)):
            entries += folder_entries(folder)
    labels = [e.label for e in entries]
    for e in entries:                # two folders of one name (a/x, b/x): tell them apart
        if labels.count(e.label) > 1:
            e.label = str(e.folder) + e.label[len(e.folder.name):]
    return entries


def folder_entries(folder: Path) -> list[Entry]:
    """A run folder's one entry, or a sweep's or capacity search's entry per point."""
    entries: list[Entry] = []
    res = load_results(folder)
    if isinstance(res, Results):
        s = res.summary
        sc = s["scenario"]
        entries.append(Entry(folder.name, folder, "run", figures=run_figures(s), seed=s.get("seed"),
                             results=res, warnings=list(s.get("warnings") or []),
                             slo_ms=sc["slo"]["p99_ms"], stages=list(sc["stages"]),
                             params={"scenario": sc.get("name"),
                                     "run_id": (s.get("effective_scenario") or {}).get("run_id")}))
        return entries
    kind = "sweep" if isinstance(res, SweepResults) else "capacity"
    pts = res.points
    lead = [c for c in res.lead() if c != "point"]
    known = [c for c in pts.columns if c + "_lo" in pts.columns]
    base = (res.record.get("base") or {}) if kind == "sweep" else {}
    slo = (base.get("slo") or {}).get("p99_ms") if kind == "sweep" else None
    stages = list(base.get("stages") or {}) or sorted(
        {m.group(1) for c in known if (m := re.fullmatch(r"stages\.(.+)\.p99_ms", c))})
    for i, row in pts.reset_index(drop=True).iterrows():
        params = {c: _value(row[c]) for c in lead if c in row}
        shown = ", ".join(str(v) if c == "variant" else f"{_short(c)}={v}" for c, v in params.items()
                          if not (c == "variant" and v in ("base", "capacity")))
        point = int(row["point"]) if "point" in row else i
        n = int(row["replications"]) if "replications" in row else 0
        figures = {c: Estimate(_value(row[c]), _value(row[c + "_lo"]), _value(row[c + "_hi"]), n)
                   for c in known}
        warn = row.get("warnings")
        entries.append(Entry(f"{folder.name}#{point}" + (f" ({shown})" if shown else ""), folder,
                             kind, point, params, figures, seed=(base.get("run") or {}).get("seed"),
                             warnings=[warn] if isinstance(warn, str)
                             and warn.strip() else [], slo_ms=slo, stages=stages))
    return entries


def difference(a: Estimate, b: Estimate, level: float = CI_LEVEL) -> tuple[float | None, float | None,
                                                                      float | None, str]:
    """b - a with its interval, and how the interval was found (paired, Welch, none)."""
    if a.mean is None or b.mean is None:
        return None, None, None, "unbounded"
    d = b.mean - a.mean
    if (a.values is not None and b.values is not None and len(a.values) == len(b.values) >= 2
            and all(v is not None for v in (*a.values, *b.values))):
        diffs = np.subtract(b.values, a.values)
        half = _t(level, len(diffs) - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
        return d, d - half, d + half, "paired"
    se = [_se(f, level) for f in (a, b)]
    if any(s is None for s in se):
        return d, None, None, "no interval"
    var = se[0] ** 2 + se[1] ** 2
    if var == 0:
        return d, d, d, "welch"
    df = var ** 2 / sum(s ** 4 / (f.n - 1) for s, f in zip(se, (a, b)) if s > 0)
    half = _t(level, df) * math.sqrt(var)
    return d, d - half, d + half, "welch"


def _se(f: Estimate, level: float) -> float | None:
    """The standard error behind a Student-t interval: half-width / t quantile, taking the
    wider side (the same for a symmetric interval; conservative for one cut at 0 or an
    asymmetric proportion interval)."""
    if f.lo is None or f.hi is None or f.n < 2 or f.mean is None:
        return None
    return max(f.hi - f.mean, f.mean - f.lo) / _t(level, f.n - 1)


def key_figures(entries: list[Entry]) -> list[str]:
    """KEY, then the P99 of each stage any entry has, in the first entry's order."""
    names = [k for k in KEY if any(k in e.figures for e in entries)]
    stages = list(dict.fromkeys(s for e in entries for s in e.stages))
    return names + [f"stages.{s}.p99_ms" for s in stages
                    if any(f"stages.{s}.p99_ms" in e.figures for e in entries)]


def long_table(entries: list[Entry]):
    """compare.csv: one row per entry and figure (every figure any entry has)."""
    import pandas as pd
    names = list(dict.fromkeys(n for e in entries for n in e.figures))
    first = entries[0]
    rows = []
    for i, e in enumerate(entries):
        for name in names:
            f = e.figures.get(name)
            if f is None:
                continue
            base = first.figures.get(name)
            d, lo, hi, how = difference(base, f) if base is not None else (None, None, None, "absent")
            rows.append({"entry": i, "label": e.label, "kind": e.kind, "folder": str(e.folder),
                         "point": e.point, "metric": name, "mean": f.mean, "lo": f.lo, "hi": f.hi,
                         "replications": f.n, "diff": d, "diff_lo": lo, "diff_hi": hi,
                         "diff_method": how})
    return pd.DataFrame(rows)


def _ci(mean, lo, hi, sign: bool = False) -> str:
    if mean is None:
        return "unbounded"
    f = (lambda v: f"{v:+.4g}") if sign else (lambda v: f"{v:.4g}")
    return f(mean) if lo is None else f"{f(mean)} [{f(lo)}, {f(hi)}]"


def printed_table(entries: list[Entry], table) -> str:
    """The key figures per entry (mean [95% CI]) and the P99's difference from the first."""
    import pandas as pd
    names = key_figures(entries)[:6]
    rows = []
    for i, e in enumerate(entries):
        sel = table[table["entry"] == i].set_index("metric")
        row = {"entry": e.label}
        for n in names:
            row[n] = _ci(*(_value(sel.loc[n, k]) for k in ("mean", "lo", "hi"))) if n in sel.index else "—"
        if "e2e.p99_ms" in sel.index and i:
            row["Δ e2e.p99_ms"] = _ci(*(_value(sel.loc["e2e.p99_ms", k]) for k in ("diff", "diff_lo", "diff_hi")),
                                      sign=True)
        elif "e2e.p99_ms" in names:
            row["Δ e2e.p99_ms"] = "(first)" if i == 0 else "—"
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False)


def default_out(folders: list[Path]) -> Path:
    """results/compare-<8 hex of the folders compared>: one per set of folders."""
    key = "\0".join(str(f.resolve()) for f in folders)
    return Path("results") / f"compare-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def check_out(out: Path, folders: list[Path]) -> None:
    """Refuse an output folder that is, or holds, a folder being compared (it would be replaced)."""
    o = out.resolve()
    for f in folders:
        r = f.resolve()
        if r == o or o in r.parents:
            raise InputError(f"is (or holds) the folder being compared, {f}: choose another --out", str(out))


def compare(folders: list[str | Path], out: str | Path | None = None):
    """Compare these folders; with `out`, write compare.csv, report.html and plots/ there.
    Returns (entries, the long table, the printed table)."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise InputError("give at least one results folder", "compare")
    entries = load_entries(folders)
    if len(entries) < 2:
        raise InputError("nothing to compare: give two runs, or a sweep with two points or more",
                         str(folders[0]))
    table = long_table(entries)
    text = printed_table(entries, table)
    if out is not None:
        out = Path(out)
        check_out(out, folders)
        with atomic_folder(out) as tmp:
            table.to_csv(tmp / "compare.csv", index=False)
            write_report(tmp, entries, table)
    return entries, table, text


def write_report(folder: Path, entries: list[Entry], table) -> list[Path]:
    """plots/*.png and report.html (matplotlib's math text off, as for every report)."""
    import matplotlib

    from simrec.reports.build import write_report as write
    from simrec.reports.compare import compare_report
    with matplotlib.rc_context({"text.parse_math": False}):
        plots, html = compare_report(entries, table, key_figures(entries))
    return write(folder, plots, html)
