"""Issue 14, class 5: the sweep and point cache never answers with a stale result.

The key covers the scenario, the bytes of every file it references (trace, cost table
manifest and table file, roofline `fit_from`, serving profile), the version and the
package source. `--refresh` recomputes; an unreadable cache entry is recomputed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

import simrec
from simrec import executors
from simrec.calibration.table import TABLES_DIR
from simrec.cli import app

REPO = Path(__file__).resolve().parent.parent
TRACED = """\
name: traced
workload:
  arrivals: {kind: trace, path: t.csv}
stages:
  only:
    nodes: {count: 1, device: cpu}
    router: shared
    service: {kind: constant, ms: 1}
slo:
  p99_ms: 50
run:
  replications: 2
"""


def trace_text(gap_ms: float, n: int = 400) -> str:
    return "arrival_ms,user_id,history_len,candidates\n" + "".join(
        f"{i * gap_ms:g},{i % 7},100,10\n" for i in range(n))


def data_with(tmp_path: Path, **service) -> dict:
    """A scenario as data (as the executors see it) whose one stage has these service keys."""
    sc = simrec.load_scenario(REPO / "scenarios" / "mmc.yaml")
    data = sc.model_dump(mode="json")
    data["stages"]["server"]["service"] = service
    return data


def test_key_covers_trace_bytes(tmp_path):
    (tmp_path / "s.yaml").write_text(TRACED)
    (tmp_path / "t.csv").write_text(trace_text(5.0))
    data = simrec.load_scenario(tmp_path / "s.yaml").model_dump(mode="json")
    before = executors.point_key(data)
    (tmp_path / "t.csv").write_text(trace_text(5.0).replace("\n5,", "\n6,", 1))   # one row
    assert executors.point_key(data) != before


def test_key_covers_table_manifest_table_file_and_fit_from(tmp_path):
    table = tmp_path / "tab"
    shutil.copytree(TABLES_DIR / "illustrative_gr", table)
    keys = set()
    for key in ("table", "fit_from"):
        service = {"kind": "gr" if key == "table" else "roofline", key: str(table)}
        data = data_with(tmp_path, **service)
        keys.add(executors.point_key(data))
        manifest = json.loads((table / "manifest.json").read_text())
        manifest["date"] += "x"                                        # the manifest alone
        (table / "manifest.json").write_text(json.dumps(manifest))
        keys.add(executors.point_key(data))
        tfile = table / manifest["table_file"]
        tfile.write_bytes(tfile.read_bytes() + b"\0")                  # the table file alone
        keys.add(executors.point_key(data))
    assert len(keys) == 6


def test_key_covers_profile_version_and_source(tmp_path, monkeypatch):
    prof = tmp_path / "p.json"
    prof.write_text('{"a": 1}')
    data = data_with(tmp_path, kind="table", table="illustrative_gr", phase="full_forward",
                     profile=str(prof))
    first = executors.point_key(data)
    prof.write_text('{"a": 2}')
    second = executors.point_key(data)
    monkeypatch.setattr("simrec.results.VERSION", "9.9.9")
    third = executors.point_key(data)
    monkeypatch.setattr(executors, "source_hash", lambda: "edited")
    fourth = executors.point_key(data)
    assert len({first, second, third, fourth}) == 4
    other = copy.deepcopy(data)
    other["run"]["seed"] += 1
    assert executors.point_key(other) != fourth


def test_source_hash_reads_the_code(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "simulator", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    hash_now = executors.hash_sources.__wrapped__          # memoised per process otherwise
    a = hash_now((pkg,))
    with open(pkg / "stage.py", "a") as f:
        f.write("\n# one more line\n")
    assert hash_now((pkg,)) != a
    assert executors.source_hash() == executors.hash_sources(
        (REPO / "simulator", REPO / "calibration"))


def _sweep(folder: Path, *extra) -> pd.DataFrame:
    r = CliRunner().invoke(app, ["sweep", str(folder / "s.yaml"), "--variant", "one:run.seed=1",
                                 "--executor", "serial", "--out", str(folder / "sw"), "--no-report",
                                 *extra])
    assert r.exit_code == 0, r.stderr
    return pd.read_parquet(folder / "sw" / "points.parquet")


def test_edited_trace_is_not_answered_from_the_cache(tmp_path):
    (tmp_path / "s.yaml").write_text(TRACED)
    (tmp_path / "t.csv").write_text(trace_text(5.0))                   # light load
    light = _sweep(tmp_path)["e2e.p99_ms"].iloc[0]
    (tmp_path / "t.csv").write_text(trace_text(0.9))                   # overload: queues grow
    heavy = _sweep(tmp_path)["e2e.p99_ms"].iloc[0]
    fresh = simrec.simulate(simrec.load_scenario(tmp_path / "s.yaml")).summary
    assert heavy == fresh["metrics"]["e2e"]["p99_ms"]["mean"] and heavy > 10 * light


def test_refresh_and_unreadable_entries_recompute(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(TRACED)
    (tmp_path / "t.csv").write_text(trace_text(5.0))
    calls = []
    real = executors.summary_of
    monkeypatch.setattr(executors, "summary_of", lambda d: calls.append(1) or real(d))
    first = _sweep(tmp_path)
    _sweep(tmp_path)
    assert len(calls) == 1                                             # cached
    _sweep(tmp_path, "--refresh")
    assert len(calls) == 2
    for entry in (tmp_path / ".simrec-cache").glob("*.json"):
        entry.write_text(entry.read_text()[:100])                      # a truncated write
    again = _sweep(tmp_path)
    assert len(calls) == 3
    pd.testing.assert_frame_equal(first, again)
