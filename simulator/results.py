"""Summarise replications into metrics with confidence intervals, and write a results folder.

Warm-up: requests that arrive before the warm-up cut are kept in requests.parquet (flagged)
but excluded from every metric. The measurement window runs from the cut to the last
arrival; rates and utilisation are per that window.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import scenario as sc
from . import __version__ as VERSION
from . import version_info
from . import history_store
from .cascade import Replication, warmup_cut_ms
from .errors import InputError
from .folders import atomic_folder, safe_name
from .relay import (ADMITTED, DRAM, HIT, PRE_OUTCOMES, PREFIX_OUTCOMES, REJECTED, REMOTE)
from .stats import (CI_LEVEL, CI_METHOD_PER_METRIC, PERCENTILES, describe, iact, interval,
                    interval_methods, metric_kind, pooled_percentile, trend)


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
    out = {"e2e": describe(latency), "stages": {}, "utilisation": {}}
    sojourns, parts = {}, {}
    for name in rep.stages:
        rec = rep.columns(name)
        wait = (rec["start_ms"] - rec["enter_ms"])[measured]
        service = rec["service_ms"][measured]
        sojourn = sojourns[name] = stage_sojourn(wait, service)
        parts.update({(name, "wait"): wait, (name, "service"): service,
                      (name, "hop"): rec["hop_ms"][measured]})
        done = ~np.isnan(wait)
        out["stages"][name] = {**describe(sojourn),
                               "mean_wait_ms": float(np.mean(wait[done])) if done.any() else np.nan,
                               "mean_service_ms": float(np.mean(service[done])) if done.any() else np.nan,
                               "mean_batch": float(np.mean(rec["batch"][measured][done])) if done.any() else np.nan}
        per_node = (rep.window_busy_ms[name] / window_ms).tolist()
        out["utilisation"][name] = {"stage": float(np.mean(per_node)),
                                    "nodes": per_node}
    ok = within_slo(scenario.slo, latency, sojourns)
    out["p99_attribution"] = p99_attribution(latency, parts, list(rep.stages))
    out.update(history_store.metrics(rep, measured))      # stages with a history store
    if rep.relay is not None:
        out["relay"] = relay_metrics(rep, measured)
        if rep.relay.hbm is not None:
            out["hbm"] = hbm_metrics(rep, measured, cut)
    # Completed inside the window [cut, end] (NaN, never completed, compares False): an
    # overloaded run's throughput is its capacity, not what it finished while draining.
    completion = rep.completion_ms
    out["throughput_rps"] = float(np.sum((completion >= cut) & (completion <= rep.end_ms))
                                  / window_ms * 1000.0)
    out["goodput_rps"] = float(np.sum(ok & (completion[measured] <= rep.end_ms)) / window_ms * 1000.0)
    out["slo_attainment"] = float(ok.mean()) if len(ok) else np.nan
    out["offered_rps"] = float(measured.sum() / window_ms * 1000.0)
    out["counts"] = {"created": int(len(arr)), "completed": int(np.sum(~np.isnan(rep.completion_ms))),
                     "measured": int(measured.sum()), "warmup_ms": cut}
    return out


def stage_sojourn(wait_ms: np.ndarray, service_ms: np.ndarray) -> np.ndarray:
    """A stage's time per request (queue wait + service); +inf where it never started."""
    return np.where(np.isnan(wait_ms), np.inf, wait_ms + service_ms)


def within_slo(slo: sc.SLO, latency_ms: np.ndarray, sojourn_ms: dict[str, np.ndarray]) -> np.ndarray:
    """The one SLO test per request, behind both `within_slo` in requests.parquet and
    `slo_attainment` / `goodput_rps`: end-to-end latency <= slo.p99_ms AND, for every stage
    with a budget in slo.stage_p99_ms, its sojourn (wait + service) <= that budget. A request
    that never finished (NaN or inf) is late."""
    ok = np.where(np.isnan(latency_ms), np.inf, latency_ms) <= slo.p99_ms
    for name, budget in slo.stage_p99_ms.items():
        if name in sojourn_ms:
            ok &= np.where(np.isnan(sojourn_ms[name]), np.inf, sojourn_ms[name]) <= budget
    return ok


# Where a tail request's time goes: requests ranked in this band of end-to-end latency
# (pooled in the report's plot, per replication in summary.json), and at least MIN_BAND.
P99_BAND = (98.5, 99.5)
MEDIAN_BAND = (49.5, 50.5)
MIN_BAND = 5


def band_rows(latency: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """Indices of the requests ranked between the lo and hi percentiles of latency
    (unfinished requests rank last), widened to at least MIN_BAND requests around the
    band's centre when the run is short."""
    n = len(latency)
    if n == 0:
        return np.arange(0)
    order = np.argsort(latency, kind="stable")
    lo = int(np.floor(lo_pct / 100 * (n - 1)))
    hi = int(np.ceil(hi_pct / 100 * (n - 1)))
    k = min(max(hi - lo + 1, MIN_BAND), n)
    start = min(max((lo + hi) // 2 - k // 2, 0), n - k)
    return order[start:start + k]


def band_split(latency: np.ndarray, parts: dict, lo_pct: float, hi_pct: float) -> dict:
    """Mean of each part (e.g. (stage, "wait") -> ms per request) over the finished requests
    in a latency band: what the P99 breakdown plot draws and summary.json's
    p99_attribution records, so the two cannot disagree."""
    rows = band_rows(latency, lo_pct, hi_pct)
    done = rows[np.isfinite(latency[rows])]

    def mean(v: np.ndarray) -> float:
        v = np.asarray(v, float)[done]
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else float("nan")
    return {"requests": len(done), "unfinished": len(rows) - len(done),
            "latency_ms": mean(latency), "parts": {k: mean(v) for k, v in parts.items()}}


def p99_attribution(latency: np.ndarray, parts: dict, stages: list[str]) -> dict:
    """Per stage, the mean wait, service and hop (ms) of the requests in the P99 band of
    end-to-end latency, and the stage's share of their mean latency."""
    b = band_split(latency, parts, *P99_BAND)
    total = b["latency_ms"]
    out = {"latency_ms": total, "requests": b["requests"], "unfinished": b["unfinished"], "stages": {}}
    for s in stages:
        ms = {k: b["parts"].get((s, k), float("nan")) for k in ("wait", "service", "hop")}
        spent = sum(v for v in ms.values() if v == v)
        out["stages"][s] = {"wait_ms": ms["wait"], "service_ms": ms["service"], "hop_ms": ms["hop"],
                            "share": spent / total if total and total == total else float("nan")}
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


def unbounded_warning(metrics: dict, replications: int) -> str | None:
    """The end-to-end P99 has no upper confidence bound: the replications are too few or
    too short for it (their tail events too rare), e.g. a stopping rule that ran out."""
    p99 = metrics["e2e"]["p99_ms"]
    if replications < 2 or p99["mean"] is None or p99["hi"] is not None:
        return None
    return (f"e2e.p99_ms has no upper 95% bound from {replications} replications (lower bound "
            f"{p99['lo_one_sided']:.4g} ms): lengthen the replications or add more")


# The P99's interval covers at its nominal rate when each replication is at least
# SHORT_REPLICATION latency autocorrelation times long and the run holds at least
# FEW_TAIL_SAMPLES effectively independent samples beyond the P99 (measured requests / the
# integrated autocorrelation time x 0.01, replications pooled). Below either, the M/M/c
# checks of tests/test_theory.py saw 75-88% coverage of a 95% interval: the run's tail
# episodes are too few, and their spread over replications too skewed, for any interval
# the run itself can form. More replications cure the second, not the first: 30
# replications of 2,000 requests (39 autocorrelation times each) covered 36 of 40 seeds at
# a fixed count, 30 of 40 where the stopping rule chose the count (it stopped when the
# spread looked small by chance).
# Both bounds lie between the cases that undercovered (30-39 times; 3.0-3.9 samples) and
# those that did not (48 and up; 4.8 and up).
SHORT_REPLICATION = 50
FEW_TAIL_SAMPLES = 5
IACT_SAMPLES = 1 << 20     # the autocorrelation is estimated on at most this many per replication


def replication_length(parts: list[np.ndarray]) -> dict | None:
    """Of the measured end-to-end latencies, one array per replication in arrival order:
    requests per replication (median), the integrated autocorrelation time in requests
    (stats.iact), the run's length in those times (each replication and all), and its
    effectively independent samples beyond the P99; None when a request never finished
    (an overloaded run) or there are none."""
    parts = [p[:IACT_SAMPLES] for p in parts]
    tau = iact(parts)
    if not parts or not math.isfinite(tau):
        return None
    n = float(np.median([len(p) for p in parts]))
    total = sum(len(p) for p in parts) / tau
    return {"measured_per_replication": n, "latency_iact_requests": tau,
            "autocorrelation_times": n / tau, "autocorrelation_times_total": total,
            "p99_tail_samples": 0.01 * total}


def short_replication_warning(length: dict | None) -> str | None:
    """The replications are too short, or too few, for the P99's interval (see
    SHORT_REPLICATION)."""
    if length is None:
        return None
    tau, each, tail = (length[k] for k in ("latency_iact_requests", "autocorrelation_times",
                                           "p99_tail_samples"))
    if each >= SHORT_REPLICATION and tail >= FEW_TAIL_SAMPLES:
        return None
    need = []
    if each < SHORT_REPLICATION:
        need.append(f"at least {math.ceil(SHORT_REPLICATION * tau)} measured requests per replication")
    if tail < FEW_TAIL_SAMPLES:
        need.append(f"at least {math.ceil(FEW_TAIL_SAMPLES / 0.01 * tau)} in all")
    return (f"replications are short for the P99: {length['measured_per_replication']:.0f} measured "
            f"requests each, {each:.0f} latency autocorrelation times (about {tau:.0f} requests), "
            f"{tail:.1f} effectively independent samples beyond the P99 in all; its 95% interval "
            f"can then cover the truth less often than 95%: measure {' and '.join(need)}")


def settling_warning(scenario: sc.Scenario, reps: list[Replication]) -> str | None:
    """Warn when the latency series has not settled: the mean latency (or the P99) of the
    first and the second half of the measurement window differ beyond their 95% interval
    (and by more than 5%, or 10%), which means the warm-up was too short or the system is
    unstable. The interval is paired over replications, or for the mean with one
    replication from batch means (stats.trend)."""
    firsts, seconds, means = [], [], []
    for rep in reps:
        cut = warmup_ms(scenario, rep)
        arr = rep.requests.arrival_ms
        lat = np.where(np.isnan(rep.completion_ms), np.inf, rep.completion_ms - arr)
        mid = (cut + rep.end_ms) / 2
        first, second = lat[(arr >= cut) & (arr < mid)], lat[arr >= mid]
        if len(first) == 0 or len(second) == 0:
            return None
        firsts.append(first)
        seconds.append(second)
        means.append(np.mean(lat[arr >= cut]))
    if not reps:
        return None
    d = trend(firsts, seconds)
    if d["mean"] is None or not np.all(np.isfinite(means)):   # requests never finished
        return "latency did not settle: some requests never finished (the system is overloaded)"
    if d["lo"] is None:
        return None
    if (d["lo"] > 0 or d["hi"] < 0) and abs(d["mean"]) > 0.05 * np.mean(means):
        direction = "rising" if d["mean"] > 0 else "falling"
        return (f"latency has not settled: mean latency is {direction} between the halves of the "
                f"measurement window by {d['mean']:+.3g} ms (95% CI {d['lo']:+.3g}..{d['hi']:+.3g}); "
                f"lengthen the warm-up or the run, or the system is overloaded")
    # The tail can drift while the mean holds (a slow build-up of the longest queues): the
    # P99 of each half, paired over replications (needs 2), beyond its 99% interval (a half's
    # P99 is noisy, its differences heavy-tailed: 95% warned of 3 in 40 settled M/M/1 runs)
    # and by 10%.
    if len(reps) >= 2:
        p99 = [np.percentile(b, 99) - np.percentile(a, 99) for a, b in zip(firsts, seconds)]
        d = interval(p99, 0.99)
        level = np.percentile(np.concatenate(firsts + seconds), 99)
        if d["lo"] is not None and (d["lo"] > 0 or d["hi"] < 0) and abs(d["mean"]) > 0.1 * level:
            direction = "rising" if d["mean"] > 0 else "falling"
            return (f"latency has not settled: the P99 is {direction} between the halves of the "
                    f"measurement window by {d['mean']:+.3g} ms (99% CI {d['lo']:+.3g}..{d['hi']:+.3g}); "
                    f"lengthen the warm-up or the run, or the system is overloaded")
    return None


def _merge(per_rep: list[dict], path: str = "") -> dict:
    """Turn a list of same-shaped nested dicts of numbers into intervals, each of the kind
    its path asks for (stats.metric_kind; list items take their list's path). Percentiles
    get a placeholder here: `pooled_percentiles` replaces them."""
    first = per_rep[0]
    if isinstance(first, dict):
        return {k: _merge([r[k] for r in per_rep], f"{path}.{k}" if path else k) for k in first}
    if isinstance(first, list):
        return [_merge([r[i] for r in per_rep], path) for i in range(len(first))]
    kind = metric_kind(path)
    return interval(per_rep, kind="nonnegative" if kind == "percentile" else kind)


def measured_latency(scenario: sc.Scenario, rep: Replication, key: str = "e2e") -> np.ndarray:
    """The measured requests' end-to-end latency (key "e2e") or a stage's sojourn (key: the
    stage's name), in arrival order, +inf where never finished."""
    arr = rep.requests.arrival_ms
    measured = arr >= warmup_ms(scenario, rep)
    if key == "e2e":
        x = rep.completion_ms[measured] - arr[measured]
    else:
        rec = rep.columns(key)
        x = (rec["start_ms"] - rec["enter_ms"] + rec["service_ms"])[measured]
    return np.where(np.isnan(x), np.inf, x)


def pooled_percentiles(scenario: sc.Scenario, reps: list[Replication], metrics: dict) -> None:
    """Replace the merged percentiles in `metrics` by those of all replications' measured
    samples pooled (stats.pooled_percentile), one latency series at a time."""
    for key in ["e2e", *scenario.stages]:
        node = metrics["e2e"] if key == "e2e" else metrics["stages"][key]
        samples = [measured_latency(scenario, r, key) for r in reps]
        for name, q in PERCENTILES.items():
            node[f"{name}_ms"] = pooled_percentile(samples, q)


FLAT_SKIP = frozenset({"p99_attribution"})


def flat_metrics(summary: dict) -> dict[str, float | None]:
    """One flat row of a summary's metrics: `name`, `name_lo`, `name_hi` per figure.

    Names join the metric path with '.', e.g. `e2e.p99_ms`, `stages.ranking.p99_ms`,
    `utilisation.ranking.stage`, `relay.prefix_hit_rate`. Per-node lists and the P99
    attribution (a breakdown, not a figure a sweep judges: see sweep.metric_names) are left out.
    """
    row: dict[str, float | None] = {}

    def walk(node, path):
        if path in FLAT_SKIP:
            return
        if isinstance(node, dict) and "mean" in node and "replications" in node:
            row[path], row[path + "_lo"], row[path + "_hi"] = node["mean"], node["lo"], node["hi"]
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
    walk(summary["metrics"], "")
    return row


class Results:
    """A run: what `simulate` returns and what `load_results` reads back from a folder.

    The summary and scenario are always there; the per-request and time-series tables are
    built from the replications' compact records (or read from the folder's Parquet files)
    only when first asked for. `write` streams the requests to Parquet one replication at
    a time, so writing a large run never holds the whole table."""

    def __init__(self, scenario: sc.Scenario | None, summary: dict,
                 replications: list[Replication] | None, folder: Path | None = None):
        self._scenario, self.summary, self.replications = scenario, summary, replications
        self.folder = Path(folder) if folder is not None else None
        self._requests: pa.Table | None = None
        self._timeseries: pa.Table | None = None

    @property
    def scenario(self) -> sc.Scenario:
        """The effective scenario (for a loaded folder, validated from summary.json on first use)."""
        if self._scenario is None:
            from .loader import validate
            self._scenario = validate(self.summary["scenario"], str(self._file("summary.json")))
        return self._scenario

    @scenario.setter
    def scenario(self, value: sc.Scenario) -> None:
        self._scenario = value

    @property
    def name(self) -> str:
        return self.summary["scenario"]["name"]

    def __repr__(self) -> str:
        s, m = self.summary, self.summary.get("metrics", {})
        p99s = [f"e2e {_fmt_ci(_at(m, 'e2e', 'p99_ms'))}"]
        p99s += [f"{k} {_fmt_ci(v.get('p99_ms'), False)}" for k, v in m.get("stages", {}).items()]
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return (f"Results({self.name!r}, {s.get('replications')} replications, "
                f"{s.get('requests', {}).get('measured', 0):,} measured requests, "
                f"P99 ms: {', '.join(p99s)}{where})")

    @property
    def requests(self) -> pa.Table:
        """One row per request (the table of requests.parquet, its metadata included)."""
        if self._requests is None:
            self._requests = (self._read("requests.parquet") if self.replications is None else
                              self._described(requests_table(self.scenario, self.replications), "requests"))
        return self._requests

    @property
    def timeseries(self) -> pa.Table:
        """The sampled queues and occupancy (the table of timeseries.parquet)."""
        if self._timeseries is None:
            self._timeseries = (self._read("timeseries.parquet") if self.replications is None else
                                self._described(timeseries_table(self.scenario, self.replications),
                                                "timeseries"))
        return self._timeseries

    def _described(self, table: pa.Table, kind: str) -> pa.Table:
        return table.replace_schema_metadata(parquet_metadata(self.summary, kind, table.schema.names))

    def metric(self, *path: str) -> dict:
        """e.g. results.metric("e2e", "p99_ms") or metric("e2e.p99_ms") -> {"mean", "lo",
        "hi", "replications"}; a wrong path is one InputError naming the closest paths."""
        return find_metric(self.summary["metrics"], path, self._source())

    def write(self, out_dir: str | Path, report: bool = False) -> Path:
        """Write the results folder atomically (a temp folder renamed into place), with
        plots and report.html if `report`."""
        if self.replications is None:
            raise InputError("was loaded from a folder: copy that folder instead of rewriting it",
                             str(self.folder))
        with atomic_folder(out_dir, report) as tmp:
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
            write_requests(self.scenario, self.replications, tmp / "requests.parquet", self.summary)
            pq.write_table(self._described(self.timeseries, "timeseries"), tmp / "timeseries.parquet")
        return Path(out_dir)

    def _file(self, name: str) -> Path | str:
        return self.folder / name if self.folder is not None else name

    def _source(self) -> str | None:
        return str(self.folder / "summary.json") if self.folder is not None else None

    def _read(self, name: str) -> pa.Table:
        return read_table(self.folder / name)


def read_table(path: Path) -> pa.Table:
    """A Parquet table of a results folder; missing or unreadable is one InputError."""
    if not path.is_file():
        raise InputError(f"missing {path.name}", str(path.parent))
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file ({e})".replace("\n", " "), str(path)) from None


def _at(node, *keys):
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _fmt_ci(m: dict | None, ci: bool = True) -> str:
    if not isinstance(m, dict) or m.get("mean") is None:
        return "unbounded" if isinstance(m, dict) else "?"
    if not ci or m.get("lo") is None:
        return f"{m['mean']:.4g}"
    return f"{m['mean']:.4g} [{m['lo']:.4g}, {m['hi']:.4g}]"


def metric_paths(metrics: dict) -> list[str]:
    """Every path `metric()` accepts (a figure or a group of them), dotted."""
    out = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if path:
            out.append(path)
        if "mean" in node and "replications" in node:
            return
        for k, v in node.items():
            walk(v, f"{path}.{k}" if path else str(k))
    walk(metrics, "")
    return out


def find_metric(metrics: dict, path: tuple[str, ...], source: str | None):
    """Walk `metrics` by dotted keys (names holding a '.' are matched whole first)."""
    tokens = ".".join(path).split(".") if path else []
    node, i = metrics, 0
    while i < len(tokens):
        key = next((".".join(tokens[i:j]) for j in range(len(tokens), i, -1)
                    if isinstance(node, dict) and ".".join(tokens[i:j]) in node), None)
        if key is None:
            raise unknown_metric(".".join(tokens), metric_paths(metrics), source)
        node, i = node[key], i + len(key.split("."))
    return node


def unknown_metric(name: str, known: list[str], source: str | None, what: str = "metric") -> InputError:
    """One line: the unknown name and the closest known ones."""
    import difflib
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if not close:       # a wrong last part: the names beside it
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        close = [k for k in known if parent and k.startswith(parent + ".")][:5]
    hint = (f"; did you mean {', '.join(close)}?" if close else
            f" (e.g. {', '.join(known[:4])})" if known else "")
    return InputError(f"unknown {what} {name!r}{hint}", source, "metrics" if what == "metric" else None)


def cost_tables(scenario_data: dict) -> dict[str, dict]:
    """The cost tables a scenario (as data) uses, per stage, with their content hashes. A
    kernels service's entry is its kernel table (name, label, the kernels file's path and
    sha256), every kernels file its lookups read and the phase tables its overhead is fitted on."""
    from simrec.calibration.table import load_table
    from simrec.kernel_model import _kernels_present, load_kernels, load_kernels_manifest
    tables = {}
    for name, stage in scenario_data["stages"].items():
        service = stage["service"]
        if service["kind"] in ("table", "gr"):
            t = load_table(service["table"])
            tables[name] = {"table": t.manifest.name, "label": t.manifest.label, "sha256": t.sha256,
                            "phase": service.get("phase", "gr phases"),
                            "condition": service["condition"]}
        elif service["kind"] == "kernels":
            kernels, fitted = [], []
            for ref in (service["table"], *service.get("overhead_from", [])):
                if _kernels_present(ref):
                    path = load_kernels(ref).path
                    kernels.append({"path": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()})
                if load_kernels_manifest(ref).get("table_file"):
                    t = load_table(ref)
                    fitted.append({"table": t.manifest.name, "sha256": t.sha256})
            m = load_kernels_manifest(service["table"])
            first = kernels[0] if kernels else {}
            tables[name] = {"table": m.get("name"), "label": m.get("label"), "phase": "kernel model (gr phases)",
                            "condition": "isolated", "path": first.get("path"), "sha256": first.get("sha256"),
                            "kernels": kernels, "overhead_from": fitted}
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
    metrics = _merge(per_rep)
    pooled_percentiles(scenario, reps, metrics)
    engine = engine_info(scenario, reps, engine)
    length = replication_length([measured_latency(scenario, r) for r in reps])
    warnings = [w for w in [settling_warning(scenario, reps), short_replication_warning(length),
                            unbounded_warning(metrics, len(reps))] if w]
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
        "ci": {"level": CI_LEVEL, "method": CI_METHOD_PER_METRIC},
        "interval_methods": interval_methods(),
        "time_unit": "ms",
        "cost_tables": tables,
        "requests": {"created": sum(c["created"] for c in counts),
                     "completed": sum(c["completed"] for c in counts),
                     "measured": sum(c["measured"] for c in counts),
                     "warmup_ms": [c["warmup_ms"] for c in counts]},
        "replication_length": length,
        "extrapolated_lookups": {name: sum(r.extrapolated[name] for r in reps) for name in scenario.stages},
        "warnings": warnings,
        "engine": engine,
        "metrics": metrics,
    }
    return Results(scenario, summary, reps)


# Units of the Parquet columns, by name (then by suffix); recorded in each file's metadata.
UNITS = {"replication": "index", "request_id": "index", "user_id": "id", "history_len": "tokens",
         "candidates": "items", "warmup": "bool", "within_slo": "bool", "pre_infer": "label",
         "stage": "label", "node": "index", "queue_len": "requests", "in_service": "requests",
         "busy_fraction": "fraction"}
_SUFFIX_UNITS = (("_ms", "ms"), ("_bytes", "bytes"), ("_node", "index"), ("_batch", "requests"),
                 ("_rate", "fraction"), ("_fraction", "fraction"), ("_prefix", "label"),
                 ("_ids", "ids"), ("_misses", "ids"))


def column_unit(name: str) -> str:
    """The unit of a requests/timeseries column ("" when it has none)."""
    return UNITS.get(name) or next((u for suffix, u in _SUFFIX_UNITS if name.endswith(suffix)), "")


def parquet_metadata(summary: dict, kind: str, columns: list[str]) -> dict[bytes, bytes]:
    """Key-value metadata of requests.parquet / timeseries.parquet: what the file is, the
    effective scenario's sha256 (as in summary.json, so a table can be matched to its run),
    the simrec version and each column's unit. Nothing varies between runs of one scenario
    and seed, so the files stay byte-identical."""
    ident = summary.get("effective_scenario", {})
    meta = {"simrec.table": kind, "simrec.version": summary.get("simrec_version", VERSION),
            "simrec.scenario_sha256": ident.get("sha256", ""), "simrec.run_id": ident.get("run_id", ""),
            "simrec.units": json.dumps({c: column_unit(c) for c in columns}, separators=(",", ":"))}
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def requests_table(scenario: sc.Scenario, reps: list[Replication]) -> pa.Table:
    return pa.concat_tables([requests_part(scenario, rep) for rep in reps])


ROW_GROUP = 1 << 18      # requests.parquet is written this many rows at a time


def write_requests(scenario: sc.Scenario, reps: list[Replication], path: Path,
                   summary: dict | None = None) -> None:
    """requests.parquet, a row group at a time (never the whole table in memory), with
    `parquet_metadata` when the summary is given."""
    writer = None
    try:
        for rep in reps:
            for lo in range(0, max(len(rep.requests), 1), ROW_GROUP):
                part = requests_part(scenario, rep, slice(lo, lo + ROW_GROUP))
                if writer is None:
                    schema = part.schema
                    if summary is not None:
                        schema = schema.with_metadata(parquet_metadata(summary, "requests", schema.names))
                    writer = pq.ParquetWriter(path, schema)
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
        "within_slo": None,                                 # filled below, once the stages are known
    }
    sojourns = {}
    for name in rep.stages:
        rec = rep.columns(name, rows)
        cols[f"{name}_node"] = rec["node"]
        cols[f"{name}_wait_ms"] = wait = rec["start_ms"] - rec["enter_ms"]
        sojourns[name] = stage_sojourn(wait, rec["service_ms"])
        cols[f"{name}_service_ms"] = rec["service_ms"]
        cols[f"{name}_batch"] = rec["batch"]
        cols[f"{name}_hop_ms"] = rec["hop_ms"]
    if rep.relay is not None:
        name = rep.relay.stage_name
        cols[f"{name}_prefix"] = _labels(rep.relay.prefix[rows], PREFIX_OUTCOMES)
        cols["pre_infer"] = _labels(rep.relay.pre[rows], PRE_OUTCOMES)
        if rep.relay.hbm is not None:
            hbm = rep.relay.hbm
            cols[f"{name}_emb_ids"] = hbm.ids[rows]
            cols[f"{name}_emb_misses"] = hbm.misses[rows]
            cols[f"{name}_emb_ms"] = hbm.emb_ms[rows]
    cols.update(history_store.columns(rep, rows))         # stages with a history store
    cols["within_slo"] = within_slo(scenario.slo, latency, sojourns)
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


# ------------------------------------------------------------------ sweeps, capacity, loading
class PointsResults:
    """The points of a sweep or a capacity search: `points` (one row per point: its
    parameters and each figure with `_lo`/`_hi`), and, when run from Python, each point's
    full summary in `summaries`."""

    marker = ""

    def __init__(self, record: dict, points, summaries: list[dict] | None = None,
                 folder: Path | None = None):
        self.record, self._points, self.summaries = record, points, summaries
        self.folder = Path(folder) if folder is not None else None

    @property
    def points(self):
        """A pandas DataFrame (read from points.parquet on first use for a loaded folder)."""
        if self._points is None:
            self._points = read_table(self.folder / "points.parquet").to_pandas()
        return self._points

    def lead(self) -> list[str]:
        """The columns that say which point a row is (its parameters)."""
        cols = list(self.points.columns)
        return cols[:cols.index("replications")] if "replications" in cols else ["point"]

    def metric(self, name: str):
        """One figure per point: the lead columns with `mean`, `lo` and `hi`; a name no
        point has is one InputError naming the closest ones."""
        pts = self.points
        known = [c for c in pts.columns if c + "_lo" in pts.columns]
        if name not in known:
            source = str(self.folder / "points.parquet") if self.folder is not None else None
            raise unknown_metric(name, known, source)
        out = pts[self.lead()].copy()
        out["mean"], out["lo"], out["hi"] = pts[name], pts[name + "_lo"], pts[name + "_hi"]
        return out

    def _refuse_loaded(self) -> None:
        if self.summaries is None:
            raise InputError("was loaded from a folder: copy that folder instead of rewriting it",
                             str(self.folder))


class SweepResults(PointsResults):
    """What `simrec.sweep` returns and `load_results` reads from a sweep folder; `record`
    is sweep.json (the base scenario, grid, variants, set, x, metric, slo_p99_ms)."""

    marker = "sweep.json"

    def __repr__(self) -> str:
        r, pts = self.record, self.points
        m = r.get("metric", "e2e.p99_ms")
        span = ""
        if m in pts and pts[m].notna().any():
            span = f", {m} {pts[m].min():.4g}..{pts[m].max():.4g}"
        variants = pts["variant"].nunique() if "variant" in pts else 1
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return (f"SweepResults({(r.get('base') or {}).get('name')!r}, {len(pts)} points, "
                f"{variants} variants, x={r.get('x')!r}{span}{where})")

    def write(self, out: str | Path, report: bool = False) -> Path:
        """The sweep folder, as `simrec sweep` writes it (sweep.json, points.parquet)."""
        self._refuse_loaded()
        with atomic_folder(out, report) as tmp:
            (tmp / "sweep.json").write_text(json.dumps(self.record, indent=2) + "\n")
            self.points.to_parquet(tmp / "points.parquet", index=False)
        return Path(out)


class CapacityResults(PointsResults):
    """What `simrec.capacity` returns and `load_results` reads from a capacity folder;
    `record` is capacity.json (parameter, metric, slo_ms, bracket, points with verdicts)."""

    marker = "capacity.json"

    def __init__(self, record: dict, points, summaries=None, folder=None, search=None):
        super().__init__(record, points, summaries, folder)
        self.search = search          # the capacity.Capacity the search built (Python runs)

    @property
    def bracket(self) -> tuple:
        """(largest passing value, smallest failing value); None where none was found."""
        lo, hi = (list(self.record.get("bracket") or []) + [None, None])[:2]
        return lo, hi

    def __repr__(self) -> str:
        r = self.record
        lo, hi = self.bracket
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return (f"CapacityResults({r.get('parameter')!r}: passing {lo}, failing {hi}, "
                f"{r.get('evaluations', len(r.get('points', [])))} evaluations, "
                f"{r.get('metric')} vs {r.get('slo_ms')} ms{where})")

    def write(self, out: str | Path, report: bool = False) -> Path:
        """The capacity folder, as `simrec capacity` writes it (the same writer)."""
        self._refuse_loaded()
        from .capacity import write_capacity
        write_capacity(self.search, self.summaries, Path(out), report)
        return Path(out)


def load_results(folder: str | Path) -> Results | SweepResults | CapacityResults:
    """A results folder read back: a run (summary.json), a sweep (sweep.json) or a capacity
    search (capacity.json). Only the JSON is read now; the Parquet tables when first used."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("no such results folder", str(folder))
    kinds = {"capacity.json": CapacityResults, "sweep.json": SweepResults, "summary.json": Results}
    marker = next((m for m in kinds if (folder / m).is_file()), None)
    if marker is None:
        raise InputError("not a results folder: expected summary.json (run), sweep.json (sweep) "
                         "or capacity.json (capacity search)", str(folder))
    path = folder / marker
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg}", str(path), line=e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read ({e})", str(path)) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", str(path))
    if marker == "summary.json":
        for key in ("scenario", "metrics"):
            if not isinstance(data.get(key), dict):
                raise InputError(f"missing field {key!r}", str(path))
        return Results(None, data, None, folder)
    return kinds[marker](data, None, None, folder)


def sweep(spec, base: sc.Scenario | str | Path | None = None, *, out: str | Path | None = None,
          executor: str = "local", workers: int | None = None, cache_dir: str | Path | None = None,
          ray_address: str | None = None, progress=None, refresh: bool = False,
          report: bool = False) -> SweepResults:
    """Run a sweep from Python: `spec` is a sweep file, or its fields as a dict (`base`
    then given here, or as a path in the dict). Returns the points and each point's summary;
    with `out`, also writes the folder `simrec sweep` writes (no cache unless `cache_dir`)."""
    from importlib import import_module
    from .executors import run_points
    from .loader import load_scenario
    sw = import_module("simrec.sweep")     # (`from . import sweep` would give this function)
    if isinstance(spec, (str, Path)):
        spec_obj, loaded = sw.load_spec(Path(spec))
        base = loaded if base is None else base
    else:
        data = spec.model_dump() if isinstance(spec, sw.SweepSpec) else dict(spec)
        if base is not None and not data.get("base"):
            data["base"] = base.name if isinstance(base, sc.Scenario) else str(base)
        spec_obj = sw.build_spec(data, "sweep")
        base = spec_obj.base if base is None else base
    if not isinstance(base, sc.Scenario):
        base = load_scenario(Path(base))
    points = sw.expand(base, spec_obj)
    x = spec_obj.x or (next(iter(spec_obj.grid)) if spec_obj.grid else None)
    if x is not None and x not in spec_obj.grid and x != "variant":
        raise InputError(f"must be a grid parameter or 'variant' (got {x!r}; grid: "
                         f"{', '.join(spec_obj.grid) or 'none'})", "sweep", "x")
    sw.check_metric(spec_obj.metric, [s for _, s in points], "sweep", "metric")
    summaries = run_points([s.model_dump(mode="json") for _, s in points], executor, workers,
                           Path(cache_dir) if cache_dir is not None else None, ray_address,
                           progress, refresh)
    record = {"base": base.model_dump(mode="json"), "grid": spec_obj.grid,
              "variants": spec_obj.variants, "set": spec_obj.set, "x": x, "metric": spec_obj.metric,
              "slo_p99_ms": spec_obj.slo_ms or sw.slo_for(base, spec_obj.metric)}
    result = SweepResults(record, sw.points_table([p for p, _ in points], summaries), summaries)
    if out is not None:
        result.write(out, report)
    return result


def capacity(scenario: sc.Scenario | str | Path, param: str = "workload.rate_qps", *,
             metric: str = "e2e.p99_ms", slo_ms: float | None = None, start: float | None = None,
             fewest: bool = False, integer: bool | None = None, rel_tol: float = 0.02,
             max_evals: int = 20, bounds: tuple[float | None, float | None] = (None, None),
             overrides: list[str] = (), out: str | Path | None = None, executor: str = "local",
             workers: int | None = None, cache_dir: str | Path | None = None,
             ray_address: str | None = None, progress=None, refresh: bool = False,
             report: bool = False) -> CapacityResults:
    """Capacity search from Python, with `simrec capacity`'s defaults: start at the
    parameter's current value, the scenario's SLO for `metric`, an integer search for an
    integer field. `fewest` searches the fewest (e.g. instances) instead of the most."""
    from .capacity import search
    from .loader import get_path, load_scenario, with_overrides
    from .sweep import points_table, slo_for
    if not isinstance(scenario, sc.Scenario):
        scenario = load_scenario(Path(scenario), list(overrides))
    elif overrides:
        from .loader import parse_override
        scenario = with_overrides(scenario, {".".join(k): v for k, v in map(parse_override, overrides)})
    current = get_path(scenario.model_dump(mode="json"), param.split("."), "param")
    first = start if start is not None else current
    if not isinstance(first, (int, float)) or isinstance(first, bool):
        raise InputError(f"{param} is not a number (got {first!r}); give start", "param")
    cap, summaries = search(scenario, param, metric, slo_ms if slo_ms is not None else slo_for(scenario, metric),
                            first, worse_when_higher=not fewest,
                            integer=integer if integer is not None else isinstance(current, int),
                            rel_tol=rel_tol, max_evals=max_evals,
                            cache_dir=Path(cache_dir) if cache_dir is not None else None,
                            bounds=bounds, progress=progress, refresh=refresh, executor=executor,
                            workers=workers, ray_address=ray_address)
    params = [{"variant": "capacity", cap.parameter: p["value"]} for p in cap.points]
    result = CapacityResults(cap.as_dict(), points_table(params, summaries), summaries, search=cap)
    if out is not None:
        result.write(out, report)
    return result
