"""Summarise replications into metrics with confidence intervals, and write a results folder.

Warm-up: requests that arrive before the warm-up cut are kept in requests.parquet (flagged)
but excluded from every metric. The measurement window runs from the cut to the last
arrival; rates and utilisation are per that window.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import scenario as sc
from . import __version__ as VERSION
from . import version_info
from . import history_store
from .cascade import Replication, warmup_cut_ms
from .folders import atomic_folder, safe_name
from .relay import (ADMITTED, DRAM, HIT, PRE_OUTCOMES, PREFIX_OUTCOMES, REJECTED, REMOTE)
from .stats import CI_LEVEL, CI_METHOD, describe, interval


def scenario_sha256(scenario: sc.Scenario) -> str:
    """The run's identity: sha256 of the effective scenario (after overrides, paths made
    absolute) as canonical JSON, with its seed; equal exactly when the runs are."""
    data = {"scenario": scenario.model_dump(mode="json"), "seed": scenario.run.seed}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_id(scenario: sc.Scenario) -> str:
    """`<name>-<8 hex>`: the default results folder, one per scenario, overrides and seed,
    so a `--set` variant never replaces another's results."""
    return f"{safe_name(scenario.name)}-{scenario_sha256(scenario)[:8]}"


def record_invocation(results: "Results", command: list[str] | None, overrides: list[str] | None,
                      source: str | None = None) -> None:
    """Add how the run was asked for (known to the CLI, not to `simulate`): the command's
    argv, the `--set` overrides in order and the scenario file, into summary.json."""
    s = results.summary
    s["effective_scenario"] = {**s.get("effective_scenario", {}), "file": source}
    head = {k: s[k] for k in ("simrec_version", "version") if k in s}
    results.summary = {**head, "command": command, "overrides": overrides,
                       **{k: v for k, v in s.items() if k not in head}}


def warmup_ms(scenario: sc.Scenario, rep: Replication) -> float:
    """Configured warm-up, else 10% of the run (by time, or by request count)."""
    return warmup_cut_ms(scenario, rep.requests.arrival_ms)


def replication_metrics(scenario: sc.Scenario, rep: Replication) -> dict:
    """Per-replication figures; `summarise` turns their spread into intervals."""
    cut = warmup_ms(scenario, rep)
    arr = rep.requests.arrival_ms
    measured = arr >= cut
    window_ms = max(rep.end_ms - cut, 1e-9)
    latency = np.where(np.isnan(rep.completion_ms), np.inf, rep.completion_ms - arr)[measured]
    ok = latency <= scenario.slo.p99_ms
    out = {"e2e": describe(latency), "stages": {}, "utilisation": {}}
    for name in rep.stages:
        rec = rep.columns(name)
        wait = (rec["start_ms"] - rec["enter_ms"])[measured]
        service = rec["service_ms"][measured]
        sojourn = np.where(np.isnan(wait), np.inf, wait + service)
        if name in scenario.slo.stage_p99_ms:
            ok &= sojourn <= scenario.slo.stage_p99_ms[name]
        done = ~np.isnan(wait)
        out["stages"][name] = {**describe(sojourn),
                               "mean_wait_ms": float(np.mean(wait[done])) if done.any() else np.nan,
                               "mean_service_ms": float(np.mean(service[done])) if done.any() else np.nan,
                               "mean_batch": float(np.mean(rec["batch"][measured][done])) if done.any() else np.nan}
        per_node = (rep.window_busy_ms[name] / window_ms).tolist()
        out["utilisation"][name] = {"stage": float(np.mean(per_node)),
                                    "nodes": per_node}
    out.update(history_store.metrics(rep, measured))      # stages with a history store
    if rep.relay is not None:
        out["relay"] = relay_metrics(rep, measured)
        if rep.relay.hbm is not None:
            out["hbm"] = hbm_metrics(rep, measured, cut)
    completed = np.isfinite(latency)
    out["throughput_rps"] = float(completed.sum() / window_ms * 1000.0)
    out["goodput_rps"] = float(ok.sum() / window_ms * 1000.0)
    out["slo_attainment"] = float(ok.mean()) if len(ok) else np.nan
    out["offered_rps"] = float(measured.sum() / window_ms * 1000.0)
    out["counts"] = {"created": int(len(arr)), "completed": int(np.sum(~np.isnan(rep.completion_ms))),
                     "measured": int(measured.sum()), "warmup_ms": cut}
    return out


def relay_metrics(rep: Replication, measured: np.ndarray) -> dict:
    """Prefix reuse at ranking (measured requests) and pre-infer accounting (whole run)."""
    relay = rep.relay
    outcome = relay.prefix[measured]
    n = max(len(outcome), 1)
    c = relay.counters
    caches = relay.caches
    return {
        "prefix_hit_rate": float(np.isin(outcome, (HIT, DRAM, REMOTE)).sum() / n),
        "hbm_hit_rate": float((outcome == HIT).sum() / n),
        "dram_hit_rate": float((outcome == DRAM).sum() / n),
        "remote_fetch_rate": float((outcome == REMOTE).sum() / n),
        "triggered_fraction": float(np.isin(relay.pre[measured], (ADMITTED, REJECTED)).sum() / n),
        "pre_infer": {"admitted": c.admitted, "used": c.used, "wasted": c.admitted - c.used,
                      "cancelled": c.cancelled, "rejected": c.rejected, "ran": c.ran},
        "device_ms": {"pre_infer": c.pre_ms, "ranking": c.rank_ms,
                      "pre_infer_share": c.pre_ms / (c.pre_ms + c.rank_ms) if c.pre_ms + c.rank_ms else 0.0},
        "declined": {"dram_reload": c.reload_declined, "remote_fetch": c.fetch_declined},
        "hbm": {"evictions": sum(x.counters.evictions for x in caches),
                "expired": sum(x.counters.expired for x in caches)},
        "dram": {"hits": sum(x.expander.hits for x in caches if x.expander),
                 "drops": sum(x.expander.drops for x in caches if x.expander)},
    }


def hbm_metrics(rep: Replication, measured: np.ndarray, cut: float) -> dict:
    """The HBM pool split and the embedding cache: rankings of measured requests for the
    lookup figures, the measurement window for the boundary, the whole run for traffic."""
    hbm = rep.relay.hbm
    ids, misses = hbm.ids[measured], hbm.misses[measured]
    lo, hi = cut, max(rep.end_ms, cut + 1e-9)
    fractions = [time_average(p.boundary, lo, hi) / hbm.pool_bytes for p in hbm.pools]
    rb = hbm.emb_cfg.row_bytes
    return {
        "emb_hit_rate": float(1.0 - misses.sum() / ids.sum()) if ids.sum() else float("nan"),
        "emb_ms_mean": float(hbm.emb_ms[measured].mean()) if measured.any() else float("nan"),
        "emb_fraction_mean": float(np.mean(fractions)),
        "emb_fraction_min": float(np.min(fractions)),
        "emb_fraction_max": float(np.max(fractions)),
        "boundary_moves": int(sum(p.moves for p in hbm.pools)),
        "emb_miss_bytes": int(sum(p.emb.counters.misses for p in hbm.pools) * rb),
        "emb_refill_bytes": int(round(sum(p.emb.counters.refilled_rows for p in hbm.pools) * rb)),
        "emb_dropped_bytes": int(round(sum(p.emb.counters.dropped_rows for p in hbm.pools) * rb)),
        "gather_extrapolated": int(hbm.cost.extrapolated),
    }


def time_average(steps: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Time average over [lo, hi] of a step function given as (time, value) from time 0."""
    t = np.array([x for x, _ in steps] + [np.inf])
    v = np.array([y for _, y in steps], float)
    span = np.clip(np.minimum(t[1:], hi) - np.maximum(t[:-1], lo), 0, None)
    return float((span * v).sum() / (hi - lo))


def settling_warning(scenario: sc.Scenario, reps: list[Replication]) -> str | None:
    """Warn when the latency series has not settled: the mean latency of the first and the
    second half of the measurement window differ beyond their paired 95% interval (and by
    more than 5%), which means the warm-up was too short or the system is unstable."""
    if len(reps) < 2:
        return None
    diffs, means = [], []
    for rep in reps:
        cut = warmup_ms(scenario, rep)
        arr = rep.requests.arrival_ms
        lat = np.where(np.isnan(rep.completion_ms), np.inf, rep.completion_ms - arr)
        mid = (cut + rep.end_ms) / 2
        first, second = lat[(arr >= cut) & (arr < mid)], lat[arr >= mid]
        if len(first) == 0 or len(second) == 0:
            return None
        diffs.append(np.mean(second) - np.mean(first))
        means.append(np.mean(lat[arr >= cut]))
    d = interval(diffs)
    if d["lo"] is None:   # unbounded latencies: requests never finished
        return "latency did not settle: some requests never finished (the system is overloaded)"
    if (d["lo"] > 0 or d["hi"] < 0) and abs(d["mean"]) > 0.05 * np.mean(means):
        trend = "rising" if d["mean"] > 0 else "falling"
        return (f"latency has not settled: mean latency is {trend} between the halves of the "
                f"measurement window by {d['mean']:+.3g} ms (95% CI {d['lo']:+.3g}..{d['hi']:+.3g}); "
                f"lengthen the warm-up or the run, or the system is overloaded")
    return None


def _merge(per_rep: list[dict]) -> dict:
    """Turn a list of same-shaped nested dicts of numbers into intervals."""
    first = per_rep[0]
    if isinstance(first, dict):
        return {k: _merge([r[k] for r in per_rep]) for k in first}
    if isinstance(first, list):
        return [_merge([r[i] for r in per_rep]) for i in range(len(first))]
    return interval(per_rep)


def flat_metrics(summary: dict) -> dict[str, float | None]:
    """One flat row of a summary's metrics: `name`, `name_lo`, `name_hi` per figure.

    Names join the metric path with '.', e.g. `e2e.p99_ms`, `stages.ranking.p99_ms`,
    `utilisation.ranking.stage`, `relay.prefix_hit_rate`. Per-node lists are left out.
    """
    row: dict[str, float | None] = {}

    def walk(node, path):
        if isinstance(node, dict) and "mean" in node and "replications" in node:
            row[path], row[path + "_lo"], row[path + "_hi"] = node["mean"], node["lo"], node["hi"]
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
    walk(summary["metrics"], "")
    return row


class Results:
    """What `simulate` returns: the summary plus per-request and time-series tables.

    The tables are built from the replications' compact records when first asked for;
    `write` streams the requests to Parquet one replication at a time, so writing a large
    run never holds the whole table."""

    def __init__(self, scenario: sc.Scenario, summary: dict, replications: list[Replication]):
        self.scenario, self.summary, self.replications = scenario, summary, replications
        self._requests: pa.Table | None = None
        self._timeseries: pa.Table | None = None

    def __repr__(self) -> str:
        return f"Results({self.scenario.name!r}, {len(self.replications)} replications)"

    @property
    def requests(self) -> pa.Table:
        if self._requests is None:
            self._requests = requests_table(self.scenario, self.replications)
        return self._requests

    @property
    def timeseries(self) -> pa.Table:
        if self._timeseries is None:
            self._timeseries = timeseries_table(self.scenario, self.replications)
        return self._timeseries

    def metric(self, *path: str) -> dict:
        """e.g. results.metric("e2e", "p99_ms") -> {"mean", "lo", "hi", "replications"}."""
        node = self.summary["metrics"]
        for p in path:
            node = node[p]
        return node

    def write(self, out_dir: str | Path, report: bool = False) -> Path:
        """Write the results folder atomically (a temp folder renamed into place), with
        plots and report.html if `report`."""
        with atomic_folder(out_dir, report) as tmp:
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
            write_requests(self.scenario, self.replications, tmp / "requests.parquet")
            pq.write_table(self.timeseries, tmp / "timeseries.parquet")
        return Path(out_dir)


def cost_tables(scenario_data: dict) -> dict[str, dict]:
    """The cost tables a scenario (as data) uses, per stage, with their content hashes."""
    from simrec.calibration.table import load_table
    tables = {}
    for name, stage in scenario_data["stages"].items():
        service = stage["service"]
        if service["kind"] in ("table", "gr"):
            t = load_table(service["table"])
            tables[name] = {"table": t.manifest.name, "label": t.manifest.label, "sha256": t.sha256,
                            "phase": service.get("phase", "gr phases"),
                            "condition": service["condition"]}
    return tables


def table_hashes(scenario_data: dict) -> dict[str, str]:
    return {name: t["sha256"] for name, t in cost_tables(scenario_data).items()}


def engine_info(scenario: sc.Scenario, reps: list[Replication], asked: str | None = None) -> dict:
    """Which engine was asked for and which ran, with the reasons the fast engine declined."""
    asked = asked or getattr(scenario.run, "engine", None) or "auto"
    notes = sorted({r.engine_note for r in reps if r.engine_note})
    return {"requested": asked, "used": sorted({r.engine for r in reps}), "notes": notes}


def summarise(scenario: sc.Scenario, reps: list[Replication],
              per_rep: list[dict] | None = None, engine: str | None = None) -> Results:
    """The summary of these replications (`per_rep`: their `replication_metrics`, if known;
    `engine`: the engine asked for, if not the scenario's)."""
    per_rep = [replication_metrics(scenario, r) for r in reps] if per_rep is None else \
        [{**m} for m in per_rep]
    counts = [m.pop("counts") for m in per_rep]
    engine = engine_info(scenario, reps, engine)
    warnings = [w for w in [settling_warning(scenario, reps)] if w]
    if engine["requested"] == "fast" and "simpy" in engine["used"]:
        warnings.append(f"run.engine fast: SimPy ran instead ({'; '.join(engine['notes'])})")
    tables = cost_tables(scenario.model_dump(mode="json"))
    digest = scenario_sha256(scenario)
    summary = {
        "simrec_version": VERSION,
        "version": version_info(),
        # The effective scenario itself is `scenario`; this is its identity (the CLI's
        # record_invocation adds the command, the overrides and the scenario file).
        "effective_scenario": {"sha256": digest,
                               "run_id": f"{safe_name(scenario.name)}-{digest[:8]}"},
        "scenario": scenario.model_dump(mode="json"),
        "seed": scenario.run.seed,
        "replications": len(reps),
        "ci": {"level": CI_LEVEL, "method": CI_METHOD},
        "time_unit": "ms",
        "cost_tables": tables,
        "requests": {"created": sum(c["created"] for c in counts),
                     "completed": sum(c["completed"] for c in counts),
                     "measured": sum(c["measured"] for c in counts),
                     "warmup_ms": [c["warmup_ms"] for c in counts]},
        "extrapolated_lookups": {name: sum(r.extrapolated[name] for r in reps) for name in scenario.stages},
        "warnings": warnings,
        "engine": engine,
        "metrics": _merge(per_rep),
    }
    return Results(scenario, summary, reps)


def requests_table(scenario: sc.Scenario, reps: list[Replication]) -> pa.Table:
    return pa.concat_tables([requests_part(scenario, rep) for rep in reps])


ROW_GROUP = 1 << 18      # requests.parquet is written this many rows at a time


def write_requests(scenario: sc.Scenario, reps: list[Replication], path: Path) -> None:
    """requests.parquet, a row group at a time (never the whole table in memory)."""
    writer = None
    try:
        for rep in reps:
            for lo in range(0, max(len(rep.requests), 1), ROW_GROUP):
                part = requests_part(scenario, rep, slice(lo, lo + ROW_GROUP))
                if writer is None:
                    writer = pq.ParquetWriter(path, part.schema)
                writer.write_table(part)
    finally:
        if writer is not None:
            writer.close()


def requests_part(scenario: sc.Scenario, rep: Replication, rows: slice = slice(None)) -> pa.Table:
    """One replication's rows of requests.parquet (all, or `rows`)."""
    r = rep.requests
    arrival = r.arrival_ms[rows]
    n = len(arrival)
    completion = rep.completion_ms[rows]
    latency = completion - arrival
    cols = {
        "replication": np.full(n, rep.index, np.int32),
        "request_id": np.arange(len(r), dtype=np.int64)[rows],
        "arrival_ms": arrival, "user_id": r.user_id[rows],
        "history_len": r.history_len[rows], "candidates": r.candidates[rows],
        "warmup": arrival < warmup_ms(scenario, rep),
        "completion_ms": completion, "latency_ms": latency,
        "within_slo": np.nan_to_num(latency, nan=np.inf) <= scenario.slo.p99_ms,
    }
    for name in rep.stages:
        rec = rep.columns(name, rows)
        cols[f"{name}_node"] = rec["node"]
        cols[f"{name}_wait_ms"] = rec["start_ms"] - rec["enter_ms"]
        cols[f"{name}_service_ms"] = rec["service_ms"]
        cols[f"{name}_batch"] = rec["batch"]
        cols[f"{name}_hop_ms"] = rec["hop_ms"]
    if rep.relay is not None:
        name = rep.relay.stage.name
        cols[f"{name}_prefix"] = _labels(rep.relay.prefix[rows], PREFIX_OUTCOMES)
        cols["pre_infer"] = _labels(rep.relay.pre[rows], PRE_OUTCOMES)
        if rep.relay.hbm is not None:
            hbm = rep.relay.hbm
            cols[f"{name}_emb_ids"] = hbm.ids[rows]
            cols[f"{name}_emb_misses"] = hbm.misses[rows]
            cols[f"{name}_emb_ms"] = hbm.emb_ms[rows]
    cols.update(history_store.columns(rep, rows))         # stages with a history store
    return pa.table(cols)


def _labels(codes: np.ndarray, names: dict[int, str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()),
                                          pa.array([names[k] for k in sorted(names)]))


RELAY_COLUMNS = ["kv_hit_rate"]
HBM_COLUMNS = ["emb_bytes", "kv_capacity_bytes", "emb_filled_bytes", "emb_hit_rate",
               "emb_miss_bytes", "emb_refill_bytes"]


def timeseries_table(scenario: sc.Scenario, reps: list[Replication]) -> pa.Table:
    names = list(scenario.stages)
    parts = []
    for rep in reps:
        ts = rep.timeseries
        n = len(ts["time_ms"])
        cols = {
            "replication": np.full(n, rep.index, np.int32),
            "time_ms": ts["time_ms"],
            "stage": pa.array([names[i] for i in ts["stage"]], pa.string()),
            "node": ts["node"], "queue_len": ts["queue_len"], "in_service": ts["in_service"],
            "busy_fraction": ts["busy_fraction"], "hbm_used_bytes": ts["hbm_used_bytes"],
            "hbm_pinned_bytes": ts["hbm_pinned_bytes"], "dram_used_bytes": ts["dram_used_bytes"],
        }
        # Relay runs: the interval's prefix hit rate; HBM pools: the split and the EMB cache.
        cols.update({k: v for k, v in ts.items() if k in RELAY_COLUMNS + HBM_COLUMNS})
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)
