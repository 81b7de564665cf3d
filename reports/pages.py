"""The three report pages: a run, a sweep, a capacity search."""

from __future__ import annotations

import re

import pandas as pd

from .capacity import verdict
from .html import (MISSING, Plot, count, figure, metric_ci, note, num, page, paragraph, pct, table,
                   with_ci, yaml_block)


def _get(d: dict, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


# ------------------------------------------------------------------ run
def run_page(summary: dict, plots: list[Plot]) -> str:
    sc = summary["scenario"]
    m = summary["metrics"]
    slo = sc["slo"]
    e2e = m["e2e"]
    level = summary.get("ci", {}).get("level", 0.95)
    ci = f"mean [{level:.0%} CI]"
    key = [
        ["end-to-end P50 (ms)", metric_ci(e2e.get("p50_ms"))],
        ["end-to-end P99 (ms)", metric_ci(e2e.get("p99_ms"))],
        ["end-to-end P99.9 (ms)", metric_ci(e2e.get("p99_9_ms"))],
        ["end-to-end mean (ms)", metric_ci(e2e.get("mean_ms"))],
        ["SLO: end-to-end P99 budget (ms)", count(slo["p99_ms"])],
        ["SLO attainment", metric_ci(m.get("slo_attainment"), pct)],
        ["offered load (requests/s)", metric_ci(m.get("offered_rps"))],
        ["throughput (requests/s)", metric_ci(m.get("throughput_rps"))],
        ["goodput: completed within SLO (requests/s)", metric_ci(m.get("goodput_rps"))],
    ]
    p99 = e2e.get("p99_ms") or {}
    bound = p99.get("hi") if p99.get("hi") is not None else p99.get("mean")
    verdict = (MISSING if bound is None else
               ("meets" if bound <= slo["p99_ms"] else "misses") + f" the SLO ({num(bound)} vs {num(slo['p99_ms'])} ms"
               + (", upper CI bound)" if p99.get("hi") is not None else ", one replication: no CI)"))
    key.append(["P99 verdict", verdict])
    budgets = slo.get("stage_p99_ms", {})
    stage_rows = []
    for name, st in m.get("stages", {}).items():
        u = _get(m, "utilisation", name, "stage")
        stage_rows.append([name, metric_ci(st.get("p50_ms")), metric_ci(st.get("p99_ms")),
                           count(budgets.get(name)), metric_ci(st.get("mean_wait_ms")),
                           metric_ci(st.get("mean_service_ms")), metric_ci(st.get("mean_batch")),
                           metric_ci(u, pct),
                           metric_ci(_get(m, "p99_attribution", "stages", name, "share"), pct)])
    sections = [("Key figures", table(["figure", ci], key)),
                ("Stages", paragraph("Stage latency is the sojourn: queue wait plus service. P99 time "
                                     "share: the stage's wait, service and hop over the "
                                     "end-to-end latency of the requests ranked P98.5–P99.5 "
                                     "(summary.json: metrics.p99_attribution).")
                 + table(["stage", "P50 (ms)", "P99 (ms)", "P99 budget (ms)", "mean wait (ms)",
                          "mean service (ms)", "mean batch", "utilisation",
                          "P99 time share"], stage_rows))]
    if "relay" in m:
        sections.append(("RelayGR prefix caching", relay_section(m["relay"], sc.get("relay") or {})))
    sections.append(("Plots", "".join(figure(p) for p in plots)))
    sections.append(("Provenance", provenance(summary)))
    sections.append(("Scenario (effective: after overrides)", yaml_block(sc)))
    sections.insert(0, ("Run", run_identity(summary)))
    notes = run_notes(summary)
    if notes:
        sections.insert(0, ("Read this first", "".join(note(n) for n in notes)))
    subtitle = " · ".join(x for x in (
        offered_load(sc), f"{summary.get('replications')} replications, seed {summary.get('seed')}",
        f"intervals: {level:.0%} {summary.get('ci', {}).get('method', '')}".strip(),
        f"simrec {summary.get('simrec_version', '?')}") if x)
    return page(f"simrec run: {sc.get('name', '')}", subtitle, sections)


def offered_load(sc: dict) -> str:
    """The subtitle's load, from the effective scenario (the description is the file's own
    text and may name a rate an override has changed)."""
    w = sc.get("workload") or {}
    kind = (w.get("arrivals") or {}).get("kind", "poisson")
    if w.get("rate_qps") is None:
        return f"{kind} arrivals"
    return f"{num(w['rate_qps'])} QPS offered ({kind})"


def run_identity(summary: dict) -> str:
    """What made this run: the command, its overrides, the scenario's identity, the code."""
    sc = summary["scenario"]
    ident = summary.get("effective_scenario") or {}
    version = summary.get("version") or {}
    overrides = summary.get("overrides")
    command = summary.get("command")
    rows = [["command", " ".join(_quote(a) for a in command) if command else "(not recorded: the Python API)"],
            ["overrides (--set, in order)", "; ".join(overrides) if overrides else
             ("none" if overrides is not None else "(not recorded)")],
            ["scenario file", ident.get("file") or MISSING],
            ["description (as written in the file)", sc.get("description") or MISSING],
            ["run id (name and effective-scenario hash)", ident.get("run_id") or MISSING],
            ["effective scenario sha256", ident.get("sha256") or MISSING],
            ["simrec version", version.get("simrec") or summary.get("simrec_version") or MISSING],
            ["git commit", version.get("git_commit") or MISSING]]
    return table(["item", "value"], rows, lambda i, j: "text")   # words, not figures: left-aligned


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(str(arg))


def relay_section(r: dict, cfg: dict) -> str:
    rates = [["prefix hit rate at ranking (HBM, DRAM or remote)", metric_ci(r.get("prefix_hit_rate"), pct)],
             ["HBM hit rate", metric_ci(r.get("hbm_hit_rate"), pct)],
             ["DRAM (expander) hit rate", metric_ci(r.get("dram_hit_rate"), pct)],
             ["remote fetch rate", metric_ci(r.get("remote_fetch_rate"), pct)],
             ["pre-infer triggered fraction", metric_ci(r.get("triggered_fraction"), pct)]]
    counts = [[f"pre-infer {k}", metric_ci(v, count)] for k, v in (r.get("pre_infer") or {}).items()]
    counts += [[f"HBM {k}", metric_ci(v, count)] for k, v in (r.get("hbm") or {}).items()]
    counts += [[f"DRAM {k}", metric_ci(v, count)] for k, v in (r.get("dram") or {}).items()]
    trig = (cfg.get("trigger") or {}).get("kind", MISSING)
    return (paragraph(f"Stage {cfg.get('stage', 'ranking')}, trigger {trig}. Rates are over measured "
                      "requests; counts are per replication over the whole run.")
            + table(["rate", "mean [CI]"], rates) + table(["count per replication", "mean [CI]"], counts))


def provenance(summary: dict) -> str:
    req = summary.get("requests", {})
    rows = [["requests created / completed / measured",
             " / ".join(count(req.get(k)) for k in ("created", "completed", "measured"))],
            ["warm-up cut per replication (ms)", ", ".join(num(w) for w in req.get("warmup_ms", []))],
            ["confidence intervals", f"{summary.get('ci', {}).get('level', '')} "
                                     f"{summary.get('ci', {}).get('method', '')}"]]
    for stage, t in (summary.get("cost_tables") or {}).items():
        rows.append([f"cost table ({stage})", f"{t.get('table')} [{t.get('label')}] phase {t.get('phase')}, "
                                             f"sha256 {str(t.get('sha256', ''))[:12]}"])
    for stage, n in (summary.get("extrapolated_lookups") or {}).items():
        if n:
            rows.append([f"extrapolated lookups ({stage})", num(n)])
    return table(["item", "value"], rows)


def run_notes(summary: dict) -> list[str]:
    notes = []
    for stage, t in (summary.get("cost_tables") or {}).items():
        if t.get("label") != "measured":
            notes.append(f"Stage {stage} takes its service times from cost table {t.get('table')} "
                         f"labelled '{t.get('label')}': not a measurement of real hardware.")
    for stage, n in (summary.get("extrapolated_lookups") or {}).items():
        if n:
            notes.append(f"Stage {stage}: {n:,} requests had shapes outside the cost table's grid "
                         "(extrapolated).")
    notes += [str(w) for w in summary.get("warnings") or []]
    if _get(summary, "metrics", "e2e", "p99_ms", "mean") is None:
        notes.append("Some requests never finished: percentiles they reach are unbounded (shown as —).")
    return notes


# ------------------------------------------------------------------ points tables
_PERCENT = re.compile(r"(slo_attainment|_rate|_fraction|^utilisation\..*\.stage)$")


def metric_columns(points: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, header) for the figures worth a column, in reading order."""
    fixed = [("e2e.p50_ms", "e2e P50 (ms)"), ("e2e.p99_ms", "e2e P99 (ms)"),
             ("e2e.p99_9_ms", "e2e P99.9 (ms)"), ("throughput_rps", "throughput (req/s)"),
             ("goodput_rps", "goodput (req/s)"), ("slo_attainment", "SLO attainment")]
    cols = [(c, h) for c, h in fixed if c in points]
    for c in points.columns:
        if (s := re.fullmatch(r"stages\.(.+)\.p99_ms", c)):
            cols.append((c, f"{s.group(1)} P99 (ms)"))
    for c in points.columns:
        if (s := re.fullmatch(r"utilisation\.(.+)\.stage", c)):
            cols.append((c, f"{s.group(1)} utilisation"))
    if "relay.prefix_hit_rate" in points:
        cols.append(("relay.prefix_hit_rate", "prefix hit rate"))
    return cols


def _cell(row: pd.Series, col: str) -> str:
    fmt = pct if _PERCENT.search(col) else num
    val = lambda c: None if c not in row or pd.isna(row[c]) else float(row[c])  # noqa: E731
    return with_ci(val(col), val(col + "_lo"), val(col + "_hi"), fmt)


def p99_verdict(mean, lo, hi, slo_ms: float) -> str:
    """As the capacity search judges: pass if the upper bound is within the SLO, fail if the
    lower bound is above it (or the P99 is unbounded), undecided otherwise. With one
    replication (no interval) the mean decides."""
    known = [None if v is None or pd.isna(v) else float(v) for v in (mean, lo, hi)]
    mean, lo, hi = known
    if mean is None:
        return "fail" if lo is None and hi is None else MISSING
    if lo is None or hi is None:
        return "pass" if mean <= slo_ms else "fail"
    return "pass" if hi <= slo_ms else "fail" if lo > slo_ms else "undecided"


def points_table(points: pd.DataFrame, lead: list[str], slo_ms: float | None,
                 metric: str = "e2e.p99_ms") -> str:
    """One row per point: the lead columns as given, metrics as `mean [lo, hi]`, and the
    verdict of `metric` (a P99) against the SLO (`p99_verdict`)."""
    metrics = metric_columns(points)
    headers = lead + [h for _, h in metrics] + (["P99 vs SLO"] if slo_ms else [])
    rows, verdicts = [], []
    for _, r in points.iterrows():
        row = [num(r[c]) for c in lead]
        row += [_cell(r, c) for c, _ in metrics]
        if slo_ms:
            v = p99_verdict(*(r.get(metric + s) for s in ("", "_lo", "_hi")), slo_ms=slo_ms)
            row.append(v)
            verdicts.append(v)
        rows.append(row)
    last = len(headers) - 1
    return table(headers, rows, lambda i, j: verdicts[i] if slo_ms and j == last and
                 verdicts[i] != MISSING else None)


def point_warnings(points: pd.DataFrame) -> str:
    """The simulator's warnings per point (e.g. a latency series that has not settled)."""
    if "warnings" not in points:
        return ""
    lines = [f"point {r['point'] if 'point' in r else i}: {r['warnings']}"
             for i, (_, r) in enumerate(points.iterrows())
             if isinstance(r["warnings"], str) and r["warnings"].strip()]
    return "".join(note(line) for line in lines)


# ------------------------------------------------------------------ sweep
def sweep_page(spec: dict, points: pd.DataFrame, lead: list[str], plots: list[Plot]) -> str:
    base = spec.get("base") or {}
    slo, metric = spec.get("slo_p99_ms"), spec.get("metric", "e2e.p99_ms")
    grid = table(["parameter", "values"],
                 [[k + (" (x axis)" if k == spec["x"] else ""), ", ".join(str(v) for v in vals)]
                  for k, vals in (spec.get("grid") or {}).items()])
    variants = table(["variant", "overrides"],
                     [[name, ", ".join(f"{k}={v}" for k, v in (o or {}).items()) or "(base scenario)"]
                      for name, o in (spec.get("variants") or {}).items()])
    common = spec.get("set") or {}
    applied = (paragraph("Applied to every point: " + ", ".join(f"{k}={v}" for k, v in common.items()))
               if common else "")
    sections = [
        ("Sweep", paragraph(f"x axis: {spec['x']}. A point passes when the upper confidence bound "
                            f"of its {metric} is within the SLO ({count(slo)} ms), fails when "
                            "the lower bound is above it, and is undecided otherwise.")
         + grid + variants + applied),
        ("Plots", "".join(figure(p) for p in plots)),
        ("Points", points_table(points, lead, slo, metric) + point_warnings(points)),
        ("Base scenario", yaml_block(base)),
    ]
    subtitle = (f"{len(points)} points, {points['variant'].nunique()} variants; "
                f"SLO: {metric} ≤ {count(slo)} ms")
    return page(f"simrec sweep: {base.get('name', '')}", subtitle, sections)


# ------------------------------------------------------------------ capacity
def capacity_page(spec: dict, points: pd.DataFrame | None, lead: list[str], plots: list[Plot]) -> str:
    param, metric, slo = spec["parameter"], spec.get("metric", "e2e.p99_ms"), spec.get("slo_ms")
    lo, hi = (list(spec.get("bracket") or []) + [None, None])[:2]
    evaluations = spec.get("evaluations", len(spec.get("points", [])))
    headline = (f"Best passing {param}: {num(lo) if lo is not None else 'none passed'}; "
                f"nearest failing: {num(hi) if hi is not None else 'none failed'}. "
                f"{evaluations} evaluations.")
    rule = (f"A value passes when the upper confidence bound of {metric} is ≤ {count(slo)} ms, fails "
            "when the lower bound is above it, and is undecided otherwise.")
    evals = [[i + 1, num(p.get("value")), with_ci(p.get("p99"), p.get("p99_lo"), p.get("p99_hi")),
              verdict(p)] for i, p in enumerate(spec.get("points", []))]
    sections = [("Result", paragraph(f"{headline} {rule}")
                 + table(["#", param, f"{metric} [CI]", "verdict"], evals,
                         lambda i, j: evals[i][3] if j == 3 else None)),
                ("Plots", "".join(figure(p) for p in plots))]
    if points is not None:
        sections.append(("Points", points_table(points, lead, slo, metric) + point_warnings(points)))
    base = spec.get("base") or spec.get("scenario")
    if base:
        sections.append(("Base scenario", yaml_block(base)))
    title = f"simrec capacity: {param}" + (f" ({base.get('name')})" if isinstance(base, dict)
                                             and base.get("name") else "")
    return page(title, f"{evaluations} evaluations; SLO: {metric} ≤ {count(slo)} ms", sections)
