"""Summarise replications into metrics with confidence intervals, and write a results folder.

Warm-up: requests that arrive before the warm-up cut are kept in requests.parquet (flagged)
but excluded from every metric. The measurement window runs from the cut to the last
arrival; rates and utilisation are per that window.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import scenario as sc
from .cascade import Replication
from .relay import (ADMITTED, DRAM, HIT, PRE_OUTCOMES, PREFIX_OUTCOMES, REJECTED, REMOTE)
from .stats import CI_LEVEL, CI_METHOD, describe, interval

try:
    VERSION = version("simrec")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0+unknown"


def warmup_ms(scenario: sc.Scenario, rep: Replication) -> float:
    """Configured warm-up, else 10% of the run (by time, or by request count)."""
    if scenario.run.warmup_s is not None:
        return scenario.run.warmup_s * 1000.0
    arrivals = rep.requests.arrival_ms
    if scenario.run.duration_s is not None:
        return 0.1 * scenario.run.duration_s * 1000.0
    return float(arrivals[len(arrivals) // 10]) if len(arrivals) else 0.0


def busy_in_window(starts: np.ndarray, ends: np.ndarray, lo: float, hi: float) -> float:
    return float(np.sum(np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0, None)))


def replication_metrics(scenario: sc.Scenario, rep: Replication) -> dict:
    """Per-replication figures; `summarise` turns their spread into intervals."""
    cut = warmup_ms(scenario, rep)
    arr = rep.requests.arrival_ms
    measured = arr >= cut
    window_ms = max(rep.end_ms - cut, 1e-9)
    latency = np.where(np.isnan(rep.completion_ms), np.inf, rep.completion_ms - arr)[measured]
    ok = latency <= scenario.slo.p99_ms
    out = {"e2e": describe(latency), "stages": {}, "utilisation": {}}
    for name, rec in rep.stages.items():
        wait = (rec.start_ms - rec.enter_ms)[measured]
        sojourn = np.where(np.isnan(wait), np.inf, wait + rec.service_ms[measured])
        if name in scenario.slo.stage_p99_ms:
            ok &= sojourn <= scenario.slo.stage_p99_ms[name]
        done = ~np.isnan(wait)
        out["stages"][name] = {**describe(sojourn),
                               "mean_wait_ms": float(np.mean(wait[done])) if done.any() else np.nan,
                               "mean_service_ms": float(np.mean(rec.service_ms[measured][done]))
                               if done.any() else np.nan,
                               "mean_batch": float(np.mean(rec.batch[measured][done])) if done.any() else np.nan}
        per_node = [busy_in_window(s, e, cut, rep.end_ms) / window_ms for s, e in rep.busy[name]]
        out["utilisation"][name] = {"stage": float(np.mean(per_node)),
                                    "nodes": per_node}
    if rep.relay is not None:
        out["relay"] = relay_metrics(rep, measured)
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
                      "cancelled": c.cancelled, "rejected": c.rejected},
        "hbm": {"evictions": sum(x.counters.evictions for x in caches),
                "expired": sum(x.counters.expired for x in caches)},
        "dram": {"hits": sum(x.expander.hits for x in caches if x.expander),
                 "drops": sum(x.expander.drops for x in caches if x.expander)},
    }


def _merge(per_rep: list[dict]) -> dict:
    """Turn a list of same-shaped nested dicts of numbers into intervals."""
    first = per_rep[0]
    if isinstance(first, dict):
        return {k: _merge([r[k] for r in per_rep]) for k in first}
    if isinstance(first, list):
        return [_merge([r[i] for r in per_rep]) for i in range(len(first))]
    return interval(per_rep)


@dataclass
class Results:
    """What `simulate` returns: the summary plus per-request and time-series tables."""

    scenario: sc.Scenario
    summary: dict
    requests: pa.Table
    timeseries: pa.Table
    replications: list[Replication] = field(repr=False, default_factory=list)

    def metric(self, *path: str) -> dict:
        """e.g. results.metric("e2e", "p99_ms") -> {"mean", "lo", "hi", "replications"}."""
        node = self.summary["metrics"]
        for p in path:
            node = node[p]
        return node

    def write(self, out_dir: str | Path) -> Path:
        """Write the results folder atomically: a temp folder renamed into place."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
            pq.write_table(self.requests, tmp / "requests.parquet")
            pq.write_table(self.timeseries, tmp / "timeseries.parquet")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def summarise(scenario: sc.Scenario, reps: list[Replication]) -> Results:
    per_rep = [replication_metrics(scenario, r) for r in reps]
    counts = [m.pop("counts") for m in per_rep]
    tables = {}
    for name, stage in scenario.stages.items():
        if stage.service.kind in ("table", "gr"):
            from simrec.calibration.table import load_table
            t = load_table(stage.service.table)
            tables[name] = {"table": t.manifest.name, "label": t.manifest.label,
                            "sha256": t.sha256, "phase": getattr(stage.service, "phase", "gr phases"),
                            "condition": stage.service.condition}
    summary = {
        "simrec_version": VERSION,
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
        "metrics": _merge(per_rep),
    }
    return Results(scenario, summary, requests_table(scenario, reps), timeseries_table(scenario, reps),
                   reps)


def requests_table(scenario: sc.Scenario, reps: list[Replication]) -> pa.Table:
    parts = []
    for rep in reps:
        r = rep.requests
        n = len(r)
        latency = rep.completion_ms - r.arrival_ms
        cols = {
            "replication": np.full(n, rep.index, np.int32),
            "request_id": np.arange(n, dtype=np.int64),
            "arrival_ms": r.arrival_ms, "user_id": r.user_id,
            "history_len": r.history_len, "candidates": r.candidates,
            "warmup": r.arrival_ms < warmup_ms(scenario, rep),
            "completion_ms": rep.completion_ms, "latency_ms": latency,
            "within_slo": np.nan_to_num(latency, nan=np.inf) <= scenario.slo.p99_ms,
        }
        for name, rec in rep.stages.items():
            cols[f"{name}_node"] = rec.node
            cols[f"{name}_wait_ms"] = rec.start_ms - rec.enter_ms
            cols[f"{name}_service_ms"] = rec.service_ms
            cols[f"{name}_batch"] = rec.batch
            cols[f"{name}_hop_ms"] = rec.hop_ms
        if rep.relay is not None:
            cols[f"{rep.relay.stage.name}_prefix"] = _labels(rep.relay.prefix, PREFIX_OUTCOMES)
            cols["pre_infer"] = _labels(rep.relay.pre, PRE_OUTCOMES)
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)


def _labels(codes: np.ndarray, names: dict[int, str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()),
                                          pa.array([names[k] for k in sorted(names)]))


def timeseries_table(scenario: sc.Scenario, reps: list[Replication]) -> pa.Table:
    names = list(scenario.stages)
    parts = []
    for rep in reps:
        ts = rep.timeseries
        n = len(ts["time_ms"])
        parts.append(pa.table({
            "replication": np.full(n, rep.index, np.int32),
            "time_ms": ts["time_ms"],
            "stage": pa.array([names[i] for i in ts["stage"]], pa.string()),
            "node": ts["node"], "queue_len": ts["queue_len"], "in_service": ts["in_service"],
            "busy_fraction": ts["busy_fraction"], "hbm_used_bytes": ts["hbm_used_bytes"],
            "hbm_pinned_bytes": ts["hbm_pinned_bytes"], "dram_used_bytes": ts["dram_used_bytes"],
        }))
    return pa.concat_tables(parts)
