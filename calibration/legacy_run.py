"""Testbed run folders of the layout before the serving-log format (jobs.parquet with the
measured columns only, trace.parquet, scenario.yaml, meta.json): read only to convert them
(calibration/convert_runs.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simrec.errors import InputError
from simrec.loader import load_scenario, with_overrides
from simrec.scenario import Scenario

STAGE = "ranking"


@dataclass
class Run:
    """One testbed run folder."""

    name: str
    folder: Path
    meta: dict
    jobs: pd.DataFrame
    trace: pd.DataFrame
    scenario: Scenario

    @property
    def policy(self) -> str:
        return self.meta["policy"]["kind"]

    @property
    def is_pilot(self) -> bool:
        return bool(self.meta.get("pilot"))

    @property
    def table_key(self) -> str:
        """Which calibration (hence which machine) the run belongs to."""
        t = self.meta.get("table", {})
        return str(t.get("sha256") or t.get("name"))

    def warm(self) -> np.ndarray:
        """Per request: past the warm-up cut (the cut the scenario gives the simulator)."""
        cut = (self.scenario.run.warmup_s or 0.0) * 1000.0
        return self.trace["arrival_ms"].to_numpy() >= cut

    def ranking(self) -> pd.DataFrame:
        """Ranking jobs, one row per request, in request order."""
        r = self.jobs[self.jobs["kind"] == "rank"].sort_values("request_id")
        if len(r) != len(self.trace) or (r["request_id"].to_numpy() != np.arange(len(self.trace))).any():
            raise InputError("jobs.parquet does not hold exactly one ranking job per request",
                             str(self.folder / "jobs.parquet"))
        return r.reset_index(drop=True)

    def ran(self) -> pd.DataFrame:
        """Jobs the worker executed, in execution order, with `idle_ms`: how long the device
        had been idle when the job arrived to it (0: it queued behind the previous job)."""
        j = self.jobs[self.jobs["start_ms"].notna()].sort_values("start_ms").reset_index(drop=True)
        prev_end = j["end_ms"].shift(1).to_numpy()
        idle = np.maximum(j["arrival_ms"].to_numpy() - prev_end, 0.0)
        idle[0] = np.inf
        return j.assign(idle_ms=idle, busy_ms=j["service_ms"] + j["overhead_ms"])


def load_run(folder: Path, table: str | None = None) -> Run:
    folder = Path(folder)
    for f in ("jobs.parquet", "trace.parquet", "scenario.yaml", "meta.json"):
        if not (folder / f).exists():
            raise InputError(f"testbed run is missing {f}", str(folder))
    scen = load_scenario(folder / "scenario.yaml")
    if table is not None:
        scen = with_overrides(scen, {f"stages.{STAGE}.service.table": str(Path(table).resolve())})
    trace = pd.read_parquet(folder / "trace.parquet")
    meta = json.loads((folder / "meta.json").read_text())
    jobs = with_derived_columns(pd.read_parquet(folder / "jobs.parquet"), trace, meta["workload"]["lead_ms"])
    for c in ("kind", "outcome", "phase"):
        jobs[c] = jobs[c].astype(str)
    return Run(folder.name, folder, meta, jobs, trace, scen)


def with_derived_columns(jobs: pd.DataFrame, trace: pd.DataFrame, lead_ms: float) -> pd.DataFrame:
    """Add back what the testbed does not store, computed exactly as the testbed computed
    it: the request's user, length and candidates (from the trace); arrival_ms (the signal
    time, + lead_ms for ranking jobs); service_ms = end - start; overhead_ms = start -
    max(arrival, the previous executed job's end); latency_ms = end - arrival (rank jobs).
    Columns an older run stores are kept as stored."""
    rid = jobs["request_id"].to_numpy()
    rank = jobs["kind"].astype(str).to_numpy() == "rank"
    out = jobs.copy()
    for c in ("user_id", "history_len", "candidates"):
        if c not in out:
            out[c] = trace[c].to_numpy()[rid]
    if "arrival_ms" not in out:
        sig = trace["arrival_ms"].to_numpy()
        out["arrival_ms"] = np.where(rank, (sig + lead_ms)[rid], sig[rid])
    start, end, arrival = (out[c].to_numpy() for c in ("start_ms", "end_ms", "arrival_ms"))
    if "service_ms" not in out:
        out["service_ms"] = end - start
    if "overhead_ms" not in out:
        ran = np.flatnonzero(~np.isnan(start))            # executed jobs, logged in order
        prev_end = np.concatenate([[0.0], end[ran][:-1]])
        overhead = np.full(len(out), np.nan)
        overhead[ran] = start[ran] - np.maximum(arrival[ran], prev_end)
        out["overhead_ms"] = overhead
    if "latency_ms" not in out:
        out["latency_ms"] = np.where(rank, end - arrival, np.nan)
    return out


# ----------------------------------------------------------------------------- statistics

