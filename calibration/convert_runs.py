"""Convert testbed runs from the older layout to the serving-log format (FORMAT.md,
"Serving-log format (version 1)").

The older layout (``calibration/testbed.py``): ``jobs.parquet`` with the measured columns
only (kind, request_id, start_ms, end_ms, outcome, phase), ``trace.parquet`` (per request:
arrival_ms = pre-infer signal time, user_id, history_len, candidates), ``scenario.yaml`` and
``meta.json``. Per run folder this writes

- ``jobs.parquet``: the documented columns rebuilt exactly as ``load_run`` rebuilds them
  (``calibration/legacy_run.py``, formerly ``simrec.fidelity.load_run``): user_id,
  history_len, candidates from the trace; arrival_ms = signal time, + lead_ms for ranking
  jobs; in the order the testbed logged the jobs (its execution /
  decision order: started jobs are already in start order), plus ``phase``; the rank
  outcome ``pending`` (the prefix was still being computed, so the job ran full_forward) is
  written as ``miss``;
- ``run.yaml``: device, table (meta's relative path), policy (relay: pin until_ranked),
  lead_ms, warmup_s, and the rest of meta.json under ``meta`` when it is small
  (``META_LIMIT``); otherwise meta.json stays beside it.

Before anything is replaced, ``load_log`` of the new folder must reproduce arrival_ms,
start_ms, end_ms, user_id, history_len and candidates (and kind, request_id, outcome,
phase, service_ms, overhead_ms, latency_ms) of ``load_run`` of the old one exactly, and
meta.json must agree with scenario.yaml (table, warm-up, lead, policy). The new folder is
built beside the old one and swapped in by rename (checked again in place); trace.parquet
and scenario.yaml (and meta.json when embedded) are then gone. Other files in a run folder
are carried over.

    python -m calibration.convert_runs calibration/testbed_runs/h200_eager/relay_u30 ...
    python -m calibration.convert_runs --dry-run calibration/testbed_runs/eager   # check only
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from simrec.calibration.legacy_run import Run as OldRun, load_run
from simrec.errors import InputError
from simrec.serving_log import JOB_COLUMNS, RUN_FILE, ServingLog, load_log, write_log

OLD_FILES = ("jobs.parquet", "trace.parquet", "scenario.yaml", "meta.json")
META_LIMIT = 16 * 1024          # bytes of YAML: larger metadata stays in meta.json
OUTCOME_MAP = {("rank", "pending"): "miss"}
EXACT = ("arrival_ms", "start_ms", "end_ms", "user_id", "history_len", "candidates",
         "request_id")
DERIVED = ("service_ms", "overhead_ms", "latency_ms")   # ServingLog.ran / ranking compute them


def is_old_run(folder: Path) -> bool:
    return all((folder / f).is_file() for f in OLD_FILES) and not (folder / RUN_FILE).exists()


def find_old_runs(paths: list[Path]) -> list[Path]:
    """The given run folders, or the old-layout run folders directly under the given folders."""
    out = []
    for p in map(Path, paths):
        if is_old_run(p):
            out.append(p)
        elif (p / RUN_FILE).exists():
            raise InputError("already a serving log (holds run.yaml)", str(p))
        elif p.is_dir():
            out += sorted(d for d in p.iterdir() if d.is_dir() and is_old_run(d))
        else:
            raise InputError("not a folder", str(p))
    if not out:
        raise InputError("no testbed runs in the older layout found (folders holding "
                         + ", ".join(OLD_FILES) + ")", ", ".join(map(str, paths)) or None)
    return out


def converted(run: OldRun) -> tuple[pd.DataFrame, dict, dict, int]:
    """(jobs in the new format, run.yaml mapping without meta, remaining meta, pending count)."""
    meta = run.meta
    jobs = run.jobs
    kind = jobs["kind"].astype(str).to_numpy()
    outcome = jobs["outcome"].astype(str).to_numpy().copy()
    pending = 0
    for (k, old), new in OUTCOME_MAP.items():
        m = (kind == k) & (outcome == old)
        pending += int(m.sum())
        outcome[m] = new
    new = pd.DataFrame({c: jobs[c].to_numpy() for c in JOB_COLUMNS})
    new["kind"] = pd.array(kind, dtype=str)
    new["outcome"] = pd.array(outcome, dtype=str)
    new["phase"] = pd.array(jobs["phase"].astype(str).to_numpy(), dtype=str)
    for c in jobs.columns:               # anything else an older run stored
        if c not in new and c not in DERIVED:
            new[c] = jobs[c].to_numpy()

    pol = meta["policy"]
    if pol["kind"] == "relay":
        policy = {"kind": "relay", "min_history_len": int(pol["min_history_len"]),
                  "cache_bytes": int(pol["cache_bytes"]), "pin": "until_ranked"}
    else:
        policy = {"kind": pol["kind"]}
    lead_ms = float(meta["workload"]["lead_ms"])
    warmup_s = float(meta["warmup_s"])
    table = meta["table"]["path"]
    _agree(run, policy, lead_ms, warmup_s, table)
    doc = {"device": meta["device"], "table": table, "policy": policy, "lead_ms": lead_ms,
           "warmup_s": warmup_s}

    rest = copy.deepcopy(meta)
    for k in ("policy", "device", "warmup_s", "stored_columns"):   # stored_columns: the old layout
        rest.pop(k, None)
    rest["workload"].pop("lead_ms", None)
    rest["table"].pop("path", None)
    rest["converted"] = {"by": "calibration/convert_runs.py",
                         "from": "testbed layout: " + ", ".join(OLD_FILES),
                         "rank_pending_to_miss": pending}
    return new, doc, rest, pending


def _agree(run: OldRun, policy: dict, lead_ms: float, warmup_s: float, table: str) -> None:
    """meta.json and scenario.yaml (as written, not as validated) must describe the same system."""
    scen = yaml.safe_load((run.folder / "scenario.yaml").read_text())
    problems = []
    if float((scen.get("run") or {}).get("warmup_s") or 0.0) != warmup_s:
        problems.append(f"warmup_s {scen['run'].get('warmup_s')} vs meta {warmup_s}")
    stages = scen.get("stages") or {}
    if stages.get("ranking", {}).get("service", {}).get("table") != table:
        problems.append(f"table {stages.get('ranking', {}).get('service', {}).get('table')} vs meta {table}")
    relay = scen.get("relay")
    if policy["kind"] == "relay":
        if relay is None:
            problems.append("meta says relay, the scenario has no relay block")
        else:
            if relay["trigger"].get("min_history_len") != policy["min_history_len"]:
                problems.append("min_history_len differs")
            if relay["cache"].get("hbm_bytes") != policy["cache_bytes"]:
                problems.append("cache_bytes differs")
    elif relay is not None:
        problems.append("meta says full, the scenario has a relay block")
    ups = [s for name, s in stages.items() if name != "ranking"]
    if len(ups) != 1 or float(ups[0]["service"].get("ms", -1)) != lead_ms:
        problems.append(f"lead_ms {lead_ms} is not the scenario's upstream delay")
    if problems:
        raise InputError("meta.json and scenario.yaml disagree: " + "; ".join(problems), str(run.folder))


def check_same(log: ServingLog, run: OldRun, policy: dict, lead_ms: float, warmup_s: float) -> None:
    """The new log must reproduce the old run's columns bit for bit."""
    problems = []
    new, old = log.jobs, run.jobs
    if len(new) != len(old):
        problems.append(f"{len(new)} jobs vs {len(old)}")
    else:
        for c in EXACT:
            a, b = new[c].to_numpy(), old[c].to_numpy()
            if a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                problems.append(c)
        for c in ("kind", "phase"):
            if not (new[c].to_numpy(str) == old[c].astype(str).to_numpy(str)).all():
                problems.append(c)
        kind, out = old["kind"].astype(str).to_numpy(), old["outcome"].astype(str).to_numpy().copy()
        for (k, o), m in OUTCOME_MAP.items():
            out[(kind == k) & (out == o)] = m
        if not (new["outcome"].to_numpy(str) == out.astype(str)).all():
            problems.append("outcome")
        ran_old = old[old["start_ms"].notna()]        # file order = start order
        ran_new = log.ran()
        for c in ("service_ms", "overhead_ms"):
            if not np.array_equal(ran_new[c].to_numpy(), ran_old[c].to_numpy()):
                problems.append(c)
        old_rank = old[old["kind"] == "rank"].sort_values("request_id", kind="stable")
        if not np.array_equal(log.ranking()["latency_ms"].to_numpy(), old_rank["latency_ms"].to_numpy(),
                              equal_nan=True):
            problems.append("latency_ms")
    if log.policy != policy or log.lead_ms != lead_ms or log.warmup_s != warmup_s:
        problems.append("run.yaml fields")
    if log.table != str((run.folder / run.meta["table"]["path"]).resolve()):
        problems.append("table")
    if problems:
        raise InputError("the converted log does not reproduce the run: " + ", ".join(problems),
                         str(run.folder))


def convert(folder: Path, dry_run: bool = False, meta_limit: int = META_LIMIT) -> dict:
    """Convert one run folder in place (or, dry_run, only build and check the new one)."""
    folder = Path(folder)
    run = load_run(folder)
    jobs, doc, rest, pending = converted(run)
    meta_text = yaml.safe_dump({"meta": rest}, sort_keys=False)
    embed = len(meta_text.encode()) <= meta_limit
    if embed:
        doc["meta"] = rest
    parent = folder.parent
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.convert-", dir=parent))
    new = parent / f"{work.name}.new"      # a sibling: the relative table path resolves alike
    try:
        write_log(new, jobs, doc)
        keep = [] if embed else ["meta.json"]
        keep += sorted(p.name for p in folder.iterdir() if p.name not in OLD_FILES)
        for name in keep:
            src = folder / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, new / name)
        check_same(load_log(new), run, doc["policy"], doc["lead_ms"], doc["warmup_s"])
        info = {"run": str(folder), "jobs": len(jobs), "pending_to_miss": pending,
                "meta": "run.yaml" if embed else "meta.json",
                "bytes_before": sum(os.path.getsize(folder / f) for f in OLD_FILES),
                "bytes_after": sum(p.stat().st_size for p in new.iterdir() if p.is_file())}
        if dry_run:
            return info
        old = work / ".old"
        os.replace(folder, old)
        try:
            os.replace(new, folder)
        except BaseException:
            os.replace(old, folder)
            raise
        check_same(load_log(folder), run, doc["policy"], doc["lead_ms"], doc["warmup_s"])
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.convert_runs",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="run folders, or folders of run folders")
    ap.add_argument("--dry-run", action="store_true", help="build and check, change nothing")
    args = ap.parse_args(argv)
    try:
        runs = find_old_runs(args.folders)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = 0
    for f in runs:
        try:
            i = convert(f, dry_run=args.dry_run)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        verb = "checked" if args.dry_run else "converted"
        print(f"{verb} {i['run']}: {i['jobs']} jobs, {i['pending_to_miss']} pending -> miss, meta in "
              f"{i['meta']}, {i['bytes_before'] / 1024:.0f} KiB -> {i['bytes_after'] / 1024:.0f} KiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
