"""Serving logs (simrec.serving_log): the format of calibration/FORMAT.md, one-line errors
naming file, row and column, atomic writing, and the conversion of the older testbed runs
(calibration/convert_runs.py)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from simrec.errors import InputError
from simrec.serving_log import JOB_COLUMNS, ServingLog, find_logs, load_log, write_log

REPO = Path(__file__).resolve().parents[1]
TESTBED_RUN = REPO / "calibration" / "testbed_runs" / "h200_eager" / "relay_u30"

# The example of FORMAT.md: a relay log, lead 2 ms; row 3 is a skipped signal.
CSV = """\
kind,request_id,user_id,history_len,candidates,arrival_ms,start_ms,end_ms,outcome
pre,0,7,8192,128,0.0,0.0,3.0,computed
rank,0,7,8192,128,2.0,3.0,4.0,hit
pre,1,8,4096,128,5.0,,,skipped
rank,1,8,4096,128,7.0,7.0,9.0,miss
rank,2,9,1024,128,8.0,9.0,10.0,miss
"""
RUN = {"device": "cpu", "table": "cpu_gr_small",
       "policy": {"kind": "relay", "min_history_len": 4096, "cache_bytes": 1 << 30},
       "lead_ms": 2.0, "warmup_s": 0.0, "meta": {"pilot": False}}
# yaml.safe_dump(RUN, sort_keys=False) puts: device 1, table 2, policy 3, kind 4,
# min_history_len 5, cache_bytes 6, lead_ms 7, warmup_s 8, meta 9


def jobs_frame() -> pd.DataFrame:
    from io import StringIO
    return pd.read_csv(StringIO(CSV))


def make_log(folder: Path, jobs: pd.DataFrame | None = None, run: dict | None = None,
             fmt: str = "parquet") -> Path:
    """A log written directly (no validation), so that bad logs can be built."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = jobs_frame() if jobs is None else jobs
    if fmt == "csv":
        jobs.to_csv(folder / "jobs.csv", index=False)
    else:
        jobs.to_parquet(folder / "jobs.parquet", index=False)
    (folder / "run.yaml").write_text(yaml.safe_dump(RUN if run is None else run, sort_keys=False))
    return folder


def error_of(folder: Path) -> str:
    with pytest.raises(InputError) as e:
        load_log(folder)
    text = str(e.value)
    assert "\n" not in text
    return text


def where(folder: Path, fmt: str, row: int | None, column: str) -> str:
    """The expected location prefix: `file row N column C` (Parquet), `file:LINE row N column
    C` (CSV, LINE = N + 1)."""
    f = folder / f"jobs.{fmt}"
    if row is None:
        return f"{f}{':1' if fmt == 'csv' else ''} column {column}"
    return f"{f}{f':{row + 1}' if fmt == 'csv' else ''} row {row} column {column}"


# ----------------------------------------------------------------------------- valid logs

@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_load_valid_log(tmp_path, fmt):
    folder = make_log(tmp_path / "run_a", fmt=fmt)
    log = load_log(folder)
    assert isinstance(log, ServingLog)
    assert log.name == "run_a" and log.folder == folder
    assert list(log.jobs.columns) == list(JOB_COLUMNS)
    assert list(log.jobs.index) == [0, 1, 2, 3, 4]
    for c in ("request_id", "user_id", "history_len", "candidates"):
        assert log.jobs[c].dtype == np.int64
    for c in ("arrival_ms", "start_ms", "end_ms"):
        assert log.jobs[c].dtype == np.float64
    assert log.jobs["kind"].tolist() == ["pre", "rank", "pre", "rank", "rank"]
    assert log.jobs["outcome"].tolist() == ["computed", "hit", "skipped", "miss", "miss"]
    assert np.isnan(log.jobs["start_ms"][2])
    assert log.device == "cpu" and log.table == "cpu_gr_small"     # built-in name kept
    assert log.policy == {"kind": "relay", "min_history_len": 4096, "cache_bytes": 1 << 30,
                          "pin": "until_ranked"}
    assert log.lead_ms == 2.0 and log.warmup_s == 0.0
    assert log.extra == {"meta": {"pilot": False}}


def test_parquet_and_csv_agree(tmp_path):
    a = load_log(make_log(tmp_path / "a", fmt="parquet")).jobs
    b = load_log(make_log(tmp_path / "b", fmt="csv")).jobs
    pd.testing.assert_frame_equal(a, b)


def test_ran_and_ranking(tmp_path):
    log = load_log(make_log(tmp_path / "r"))
    ran = log.ran()
    assert ran["kind"].tolist() == ["pre", "rank", "rank", "rank"]
    assert list(ran.index) == [0, 1, 2, 3]
    # starts 0,3,7,9; ends 3,4,9,10; arrivals 0,2,7,8; prev_end 0,3,4,9
    np.testing.assert_array_equal(ran["service_ms"], [3.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(ran["overhead_ms"], [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(ran["busy_ms"], [3.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(ran["idle_ms"], [np.inf, 0.0, 3.0, 0.0])
    rank = log.ranking()
    assert rank["request_id"].tolist() == [0, 1, 2] and list(rank.index) == [0, 1, 2]
    np.testing.assert_array_equal(rank["latency_ms"], [2.0, 2.0, 2.0])


def test_ran_overhead_and_ties(tmp_path):
    j = jobs_frame()
    j.loc[1, ["start_ms", "end_ms"]] = [3.5, 4.5]          # 0.5 ms host time after the pre job
    j.loc[3, ["start_ms", "end_ms"]] = [9.0, 9.0]          # a zero-length job ...
    j.loc[4, ["start_ms", "end_ms"]] = [9.0, 10.0]         # ... and a tie on start: file order kept
    ran = load_log(make_log(tmp_path / "t", j)).ran()
    assert ran["request_id"].tolist() == [0, 0, 1, 2]
    np.testing.assert_array_equal(ran["overhead_ms"], [0.0, 0.5, 9.0 - 7.0, 0.0])
    np.testing.assert_array_equal(ran["busy_ms"], ran["service_ms"] + ran["overhead_ms"])


def test_extra_columns_and_table_paths(tmp_path):
    j = jobs_frame().assign(phase=["prefix_encode", "rank_cached", "none", "full_forward", "full_forward"])
    (tmp_path / "tables" / "mine").mkdir(parents=True)
    (tmp_path / "logs" / "mine").mkdir(parents=True)
    log = load_log(make_log(tmp_path / "logs" / "l1", j, {**RUN, "table": "../../tables/mine"}))
    assert list(log.jobs.columns) == list(JOB_COLUMNS) + ["phase"]
    assert log.jobs["phase"].tolist()[0] == "prefix_encode"
    assert log.table == str((tmp_path / "tables" / "mine").resolve())
    # a bare name that is an existing folder (relative to the log folder) is a path
    (tmp_path / "logs" / "l2" / "local").mkdir(parents=True)
    log = load_log(make_log(tmp_path / "logs" / "l2", None, {**RUN, "table": "local"}))
    assert log.table == str((tmp_path / "logs" / "l2" / "local").resolve())
    log = load_log(make_log(tmp_path / "logs" / "l3", None, {**RUN, "table": "/abs/table"}))
    assert log.table == "/abs/table"


def test_full_policy_defaults(tmp_path):
    j = jobs_frame()
    j = j[j["kind"] == "rank"].assign(outcome="none")
    run = {"device": "NVIDIA H200", "table": "x", "policy": {"kind": "full"}, "warmup_s": 1.5}
    log = load_log(make_log(tmp_path / "f", j, run))
    assert log.policy == {"kind": "full"} and log.lead_ms == 0.0 and log.warmup_s == 1.5
    assert log.extra == {}
    # relay-only fields are ignored under a full policy
    run["policy"] = {"kind": "full", "min_history_len": 4096, "cache_bytes": 1}
    assert load_log(make_log(tmp_path / "g", j, run)).policy == {"kind": "full"}


def test_start_slack(tmp_path):
    j = jobs_frame()
    j.loc[3, "start_ms"] = 7.0 - 1e-7
    load_log(make_log(tmp_path / "s", j))


# ----------------------------------------------------------------------------- bad jobs

def _set(row: int, column: str, value, as_text: bool = False):
    """Mutation: data row `row` (1-based) of `column` := value; as_text: the whole column as
    text first (Parquet then stores a string column)."""
    def f(j: pd.DataFrame) -> pd.DataFrame:
        if as_text:
            j[column] = ["" if pd.isna(v) else str(v) for v in j[column]]
        elif isinstance(value, str) or value is None:
            j[column] = j[column].astype(object)
        elif isinstance(value, float):
            j[column] = j[column].astype(float)
        j.loc[row - 1, column] = value
        return j
    return f


BAD_JOBS = [
    # (id, mutation, row, column, message)
    ("int_not_number", _set(3, "request_id", "x", as_text=True), 3, "request_id",
     "request_id is not an integer (got 'x')"),
    ("int_fraction", _set(2, "user_id", 1.5), 2, "user_id", "user_id is not an integer (got 1.5)"),
    ("int_empty", _set(2, "history_len", np.nan), 2, "history_len", "history_len is empty"),
    ("int_negative", _set(4, "user_id", -1), 4, "user_id", "user_id must be >= 0 (got -1)"),
    ("rank_zero_len", _set(5, "history_len", 0), 5, "history_len",
     "history_len must be > 0 for a rank job (got 0)"),
    ("rank_zero_cands", _set(4, "candidates", 0), 4, "candidates",
     "candidates must be > 0 for a rank job (got 0)"),
    ("kind_empty", _set(2, "kind", None), 2, "kind", "kind is empty"),
    ("kind_unknown", _set(4, "kind", "rerank"), 4, "kind", "unknown kind 'rerank' (expected rank or pre)"),
    ("outcome_empty", _set(5, "outcome", None), 5, "outcome", "outcome is empty"),
    ("outcome_unknown", _set(2, "outcome", "cached"), 2, "outcome",
     "outcome 'cached' is not valid for a rank job (expected hit, miss or none)"),
    ("outcome_other_kind", _set(4, "outcome", "computed"), 4, "outcome",
     "outcome 'computed' is not valid for a rank job (expected hit, miss or none)"),
    ("pre_outcome_other_kind", _set(1, "outcome", "hit"), 1, "outcome",
     "outcome 'hit' is not valid for a pre job (expected computed, skipped, rejected or cancelled)"),
    ("arrival_empty", _set(4, "arrival_ms", np.nan), 4, "arrival_ms", "arrival_ms is empty"),
    ("time_not_number", _set(5, "start_ms", "soon", as_text=True), 5, "start_ms",
     "start_ms is not a number (got 'soon')"),
    ("time_negative", _set(1, "arrival_ms", -1.0), 1, "arrival_ms", "arrival_ms must be >= 0 (got -1.0)"),
    ("time_inf", _set(2, "end_ms", np.inf), 2, "end_ms", "end_ms must be finite (got inf)"),
    ("end_before_start", _set(2, "end_ms", 2.5), 2, "end_ms", "end_ms < start_ms (2.5 < 3.0)"),
    ("start_without_end", _set(4, "end_ms", np.nan), 4, "end_ms", "end_ms is empty but start_ms is set (7.0)"),
    ("end_without_start", _set(4, "start_ms", np.nan), 4, "start_ms",
     "start_ms is empty but end_ms is set (9.0)"),
    ("start_before_arrival", _set(5, "start_ms", 7.5), 5, "start_ms", "start_ms < arrival_ms (7.5 < 8.0)"),
    ("computed_without_start", lambda j: j.assign(start_ms=[np.nan, 3, np.nan, 7, 9],
                                                  end_ms=[np.nan, 4, np.nan, 9, 10]), 1, "start_ms",
     "start_ms is empty for a pre job with outcome 'computed' (a computed job ran)"),
    ("skipped_with_start", lambda j: j.assign(start_ms=[0, 3, 5, 7, 9], end_ms=[3, 4, 6, 9, 10.0]), 3,
     "outcome", "outcome 'skipped' but the job has a start_ms (5.0): skipped and rejected signals did not run"),
    ("rejected_with_start", lambda j: j.assign(start_ms=[0, 3, 5, 7, 9], end_ms=[3, 4, 6, 9, 10.0],
                                               outcome=["computed", "hit", "rejected", "miss", "miss"]), 3,
     "outcome", "outcome 'rejected' but the job has a start_ms (5.0): skipped and rejected signals did not run"),
    ("duplicate_request", _set(5, "request_id", 1), 5, "request_id",
     "duplicate request_id 1 among rank jobs (first at row 4)"),
    ("arrival_order", _set(5, "arrival_ms", 6.5), 5, "arrival_ms",
     "arrival_ms goes back in request_id order among rank jobs: request 2 arrives at 6.5, "
     "before request 1 (7.0, row 4)"),
    ("pre_arrival_order", lambda j: j.assign(request_id=[1, 0, 0, 1, 2]), 1, "arrival_ms",
     "arrival_ms goes back in request_id order among pre jobs: request 1 arrives at 0.0, "
     "before request 0 (5.0, row 3)"),
    ("start_order", lambda j: j.assign(start_ms=[0, 3, np.nan, 9.5, 9.0], end_ms=[3, 4, np.nan, 10, 9.5]), 5,
     "start_ms", "start_ms 9.0 is before the previous started job's (9.5, row 4): the file must list "
                 "jobs in start order"),
]

@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("case", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_jobs(tmp_path, fmt, case):
    _, mutate, row, column, message = case
    folder = make_log(tmp_path / "bad", mutate(jobs_frame()), fmt=fmt)
    assert error_of(folder) == f"{where(folder, fmt, row, column)}: {message}"


def test_bad_jobs_exact_parquet_example(tmp_path):
    """The documented form, spelled out once."""
    j = jobs_frame()
    j.loc[2, ["start_ms", "end_ms"]] = [np.nan, np.nan]
    j.loc[1, "end_ms"] = 2.5
    folder = make_log(tmp_path / "ex", j)
    assert error_of(folder) == f"{folder}/jobs.parquet row 2 column end_ms: end_ms < start_ms (2.5 < 3.0)"
    folder = make_log(tmp_path / "ex_csv", j, fmt="csv")
    assert error_of(folder) == f"{folder}/jobs.csv:3 row 2 column end_ms: end_ms < start_ms (2.5 < 3.0)"


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_missing_column(tmp_path, fmt):
    folder = make_log(tmp_path / "m", jobs_frame().drop(columns=["outcome"]), fmt=fmt)
    assert error_of(folder) == (f"{where(folder, fmt, None, 'outcome')}: missing column (need "
                                f"{', '.join(JOB_COLUMNS)})")
    folder = make_log(tmp_path / "m2", jobs_frame().drop(columns=["user_id", "end_ms"]), fmt=fmt)
    assert error_of(folder) == (f"{where(folder, fmt, None, 'user_id')}: missing column (need "
                                f"{', '.join(JOB_COLUMNS)}; also missing: end_ms)")


def test_csv_blank_line_keeps_line_numbers(tmp_path):
    folder = make_log(tmp_path / "b", fmt="csv")
    lines = CSV.splitlines()
    (folder / "jobs.csv").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    assert error_of(folder) == f"{folder}/jobs.csv:4 row 3 column kind: kind is empty"


def test_no_rows(tmp_path):
    folder = make_log(tmp_path / "e", jobs_frame().iloc[:0])
    assert error_of(folder) == f"{folder}/jobs.parquet: no jobs (the file has no data rows)"


# ----------------------------------------------------------------------------- bad files

def test_missing_files(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert error_of(folder) == (f"{folder}/run.yaml: file not found (a serving-log folder holds run.yaml "
                                f"and jobs.parquet or jobs.csv)")
    (folder / "run.yaml").write_text(yaml.safe_dump(RUN))
    assert error_of(folder) == (f"{folder}: no jobs.parquet or jobs.csv (a serving-log folder holds "
                                f"run.yaml and one of them)")
    assert error_of(tmp_path / "nope") == f"{tmp_path / 'nope'}: not a serving-log folder (no such folder)"
    (tmp_path / "file").write_text("x")
    assert error_of(tmp_path / "file") == f"{tmp_path / 'file'}: not a serving-log folder (not a folder)"


def test_both_jobs_files(tmp_path):
    folder = make_log(tmp_path / "two")
    jobs_frame().to_csv(folder / "jobs.csv", index=False)
    assert error_of(folder) == f"{folder}: both jobs.parquet and jobs.csv are present: keep one"


def test_unreadable_jobs(tmp_path):
    folder = make_log(tmp_path / "u")
    (folder / "jobs.parquet").write_bytes(b"not parquet at all")
    assert error_of(folder).startswith(f"{folder}/jobs.parquet: cannot read file: ")


def test_not_regular_files(tmp_path):
    folder = make_log(tmp_path / "d")
    (folder / "run.yaml").unlink()
    (folder / "run.yaml").mkdir()
    assert error_of(folder) == f"{folder}/run.yaml: not a regular file (a directory)"
    (folder / "run.yaml").rmdir()
    (folder / "run.yaml").symlink_to("/dev/zero")
    assert error_of(folder) == f"{folder}/run.yaml: not a regular file (a character device)"


def test_fifo_does_not_hang(tmp_path):
    folder = make_log(tmp_path / "p")
    (folder / "jobs.parquet").unlink()
    os.mkfifo(folder / "jobs.parquet")
    out: list = []
    t = threading.Thread(target=lambda: out.append(error_of(folder)), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "load_log blocked on a FIFO"
    assert out == [f"{folder}/jobs.parquet: not a regular file (a FIFO)"]


def test_yaml_problems(tmp_path):
    folder = make_log(tmp_path / "y")
    src = folder / "run.yaml"
    src.write_bytes(b"device: \xff\n")
    assert error_of(folder) == f"{src}:1: not UTF-8 text (byte 0xff at offset 8)"
    src.write_text("- a\n- b\n")
    assert error_of(folder) == f"{src}:1: must be a YAML mapping (got list)"
    src.write_text("")
    assert error_of(folder) == f"{src}:1: must be a YAML mapping (the file is empty)"
    src.write_text("device: cpu\ntable: [x\n")
    assert error_of(folder).startswith(f"{src}:3: invalid YAML: ")


def _run_with(**changes):
    run = yaml.safe_load(yaml.safe_dump(RUN, sort_keys=False))
    for path, value in changes.items():
        *head, last = path.split("__")
        d = run
        for k in head:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return run


BAD_RUN = [
    ("device_missing", dict(device=KeyError), "device", None, "required field is missing"),
    ("device_type", dict(device=5), "device", 1, "must be a non-empty string (got int 5)"),
    ("table_type", dict(table=[]), "table", 2,
     "must be a non-empty string: a cost-table folder or a built-in table name (got list [])"),
    ("policy_type", dict(policy="full"), "policy", 3,
     "must be a mapping such as {kind: full} (got str 'full')"),
    ("policy_kind_missing", dict(policy__kind=KeyError), "policy.kind", None, "required field is missing"),
    ("policy_kind", dict(policy__kind="lru"), "policy.kind", 4,
     "unknown policy kind 'lru' (expected full or relay)"),
    ("policy_unknown_field", dict(policy__cache=5), "policy.cache", 7,
     "unknown field (policy fields: kind, min_history_len, cache_bytes, pin)"),
    ("cache_bytes_missing", dict(policy__cache_bytes=KeyError), "policy.cache_bytes", None,
     "required field is missing"),
    ("cache_bytes_type", dict(policy__cache_bytes="16GiB"), "policy.cache_bytes", 6,
     "must be an integer > 0 (got str '16GiB')"),
    ("cache_bytes_float", dict(policy__cache_bytes=1.5e9), "policy.cache_bytes", 6,
     "must be an integer > 0 (got float 1500000000.0)"),
    ("min_len_zero", dict(policy__min_history_len=0), "policy.min_history_len", 5,
     "must be an integer > 0 (got int 0)"),
    ("min_len_bool", dict(policy__min_history_len=True), "policy.min_history_len", 5,
     "must be an integer > 0 (got bool True)"),
    ("pin", dict(policy__pin="always"), "policy.pin", 7, "unknown pin 'always' (expected until_ranked or none)"),
    ("lead_missing", dict(lead_ms=KeyError), "lead_ms", None,
     "required for a relay policy (how long a pre-infer signal precedes its ranking request)"),
    ("lead_type", dict(lead_ms="fast"), "lead_ms", 7, "must be a finite number (got str 'fast')"),
    ("lead_zero", dict(lead_ms=0), "lead_ms", 7, "must be > 0 for a relay policy (got 0.0)"),
    ("warmup_missing", dict(warmup_s=KeyError), "warmup_s", None, "required field is missing"),
    ("warmup_negative", dict(warmup_s=-1), "warmup_s", 8, "must be >= 0 (got -1.0)"),
    ("warmup_inf", dict(warmup_s=float("inf")), "warmup_s", 8, "must be a finite number (got float inf)"),
]


@pytest.mark.parametrize("case", BAD_RUN, ids=[c[0] for c in BAD_RUN])
def test_bad_run_yaml(tmp_path, case):
    _, changes, path, line, message = case
    folder = make_log(tmp_path / "r", run=_run_with(**changes))
    src = f"{folder}/run.yaml" + (f":{line}" if line else "")
    assert error_of(folder) == f"{src} {path}: {message}"


def test_pin_none_and_full_lead(tmp_path):
    log = load_log(make_log(tmp_path / "a", run=_run_with(policy__pin="none")))
    assert log.policy["pin"] == "none"
    j = jobs_frame()
    j = j[j["kind"] == "rank"].assign(outcome="none")
    log = load_log(make_log(tmp_path / "b", j, _run_with(policy={"kind": "full"}, lead_ms=0)))
    assert log.lead_ms == 0.0


# ----------------------------------------------------------------------------- writing, finding

def test_write_load_round_trip(tmp_path):
    j = jobs_frame().assign(phase=["prefix_encode", "rank_cached", "none", "full_forward", "full_forward"])
    folder = write_log(tmp_path / "out" / "w", j, RUN)
    assert sorted(p.name for p in folder.iterdir()) == ["jobs.parquet", "run.yaml"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]     # no temp left
    mask = os.umask(0o022)
    os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask          # not mkdtemp's 0700
    log = load_log(folder)
    expected = load_log(make_log(tmp_path / "direct", j))
    pd.testing.assert_frame_equal(log.jobs, expected.jobs)
    assert (log.policy, log.lead_ms, log.warmup_s, log.extra, log.device, log.table) == (
        expected.policy, expected.lead_ms, expected.warmup_s, expected.extra, expected.device, expected.table)
    # a log's own run_dict writes it back identically; an existing log is replaced
    folder2 = write_log(folder, log.jobs, log.run_dict())
    again = load_log(folder2)
    pd.testing.assert_frame_equal(again.jobs, log.jobs)
    assert again.run_dict() == log.run_dict()
    import pyarrow.parquet as pq
    md = pq.ParquetFile(folder / "jobs.parquet").metadata.row_group(0)
    cols = {md.column(i).path_in_schema: md.column(i) for i in range(md.num_columns)}
    assert all(c.compression == "ZSTD" for c in cols.values())
    assert "RLE_DICTIONARY" in cols["kind"].encodings and "RLE_DICTIONARY" in cols["phase"].encodings
    assert "RLE_DICTIONARY" not in cols["user_id"].encodings
    assert "RLE_DICTIONARY" not in cols["arrival_ms"].encodings


def test_write_refuses_and_validates(tmp_path):
    other = tmp_path / "not_a_log"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(InputError) as e:
        write_log(other, jobs_frame(), RUN)
    assert str(e.value) == f"{other}: exists and is not a serving log (no run.yaml): refusing to replace it"
    assert (other / "keep.txt").exists()
    bad = jobs_frame()
    bad.loc[1, "end_ms"] = 2.5
    with pytest.raises(InputError) as e:
        write_log(tmp_path / "w", bad, RUN)
    assert str(e.value) == f"{tmp_path / 'w'}/jobs.parquet row 2 column end_ms: end_ms < start_ms (2.5 < 3.0)"
    with pytest.raises(InputError) as e:
        write_log(tmp_path / "w", jobs_frame(), _run_with(policy__kind="lru"))
    assert str(e.value) == f"{tmp_path / 'w'}/run.yaml policy.kind: unknown policy kind 'lru' (expected full or relay)"
    assert not (tmp_path / "w").exists()


def test_find_logs(tmp_path):
    a = make_log(tmp_path / "logs" / "b_run")
    b = make_log(tmp_path / "logs" / "a_run")
    (tmp_path / "logs" / "table").mkdir()
    assert find_logs([tmp_path / "logs"]) == [b, a]
    assert find_logs([a]) == [a]
    with pytest.raises(InputError) as e:
        find_logs([tmp_path / "logs" / "table"])
    assert str(e.value) == f"{tmp_path / 'logs' / 'table'}: no serving logs found (folders holding run.yaml)"
    with pytest.raises(InputError) as e:
        find_logs([tmp_path / "missing"])
    assert str(e.value) == f"{tmp_path / 'missing'}: not a serving-log folder (no run.yaml) nor a folder of them"


# ----------------------------------------------------------------------------- conversion

@pytest.fixture
def testbed_copy(tmp_path):
    if not TESTBED_RUN.joinpath("trace.parquet").exists():
        pytest.skip("the committed testbed run is already converted")
    dst = tmp_path / "h200_eager" / TESTBED_RUN.name
    shutil.copytree(TESTBED_RUN, dst)
    return dst


def test_convert_testbed_run(testbed_copy):
    from simrec.calibration import convert_runs as cv
    old = cv.load_run(testbed_copy)
    info = cv.convert(testbed_copy)
    assert info["jobs"] == len(old.jobs) and info["meta"] == "run.yaml"
    assert sorted(p.name for p in testbed_copy.iterdir()) == ["jobs.parquet", "run.yaml"]
    assert sorted(p.name for p in testbed_copy.parent.iterdir()) == [testbed_copy.name]
    log = load_log(testbed_copy)
    for c in ("arrival_ms", "start_ms", "end_ms", "user_id", "history_len", "candidates", "request_id"):
        assert np.array_equal(log.jobs[c].to_numpy(), old.jobs[c].to_numpy(), equal_nan=True), c
    assert (log.jobs["kind"].to_numpy(str) == old.jobs["kind"].to_numpy(str)).all()
    assert (log.jobs["phase"].to_numpy(str) == old.jobs["phase"].to_numpy(str)).all()
    ran_old = old.jobs[old.jobs["start_ms"].notna()]
    assert np.array_equal(log.ran()["overhead_ms"].to_numpy(), ran_old["overhead_ms"].to_numpy())
    meta = old.meta
    assert log.device == meta["device"] == "NVIDIA H200"
    assert log.policy == {**meta["policy"], "pin": "until_ranked"}
    assert log.lead_ms == meta["workload"]["lead_ms"] and log.warmup_s == meta["warmup_s"]
    assert log.table == str((testbed_copy.parent / "h200_eager_h").resolve())
    run_yaml = yaml.safe_load((testbed_copy / "run.yaml").read_text())
    assert run_yaml["table"] == "../h200_eager_h"
    assert run_yaml["meta"]["summary"] == meta["summary"]
    assert "stored_columns" not in run_yaml["meta"] and "lead_ms" not in run_yaml["meta"]["workload"]
    # the old reader, independently: stored columns + the trace give the same arrivals
    trace = pd.read_parquet(TESTBED_RUN / "trace.parquet")
    stored = pd.read_parquet(TESTBED_RUN / "jobs.parquet")
    sig = trace["arrival_ms"].to_numpy()[stored["request_id"].to_numpy()]
    want = np.where(stored["kind"].astype(str) == "rank", sig + meta["workload"]["lead_ms"], sig)
    assert np.array_equal(log.jobs["arrival_ms"].to_numpy(), want)
    with pytest.raises(InputError):
        cv.find_old_runs([testbed_copy])      # already converted


def test_convert_maps_pending_and_dry_run(testbed_copy):
    from simrec.calibration import convert_runs as cv
    stored = pd.read_parquet(testbed_copy / "jobs.parquet")
    out = stored["outcome"].astype(str).to_numpy().copy()
    i = int(np.flatnonzero(out == "miss")[0])
    out[i] = "pending"
    stored["outcome"] = pd.Categorical(out)
    stored.to_parquet(testbed_copy / "jobs.parquet", index=False)
    before = sorted(p.name for p in testbed_copy.iterdir())
    info = cv.convert(testbed_copy, dry_run=True)
    assert info["pending_to_miss"] == 1
    assert sorted(p.name for p in testbed_copy.iterdir()) == before
    assert sorted(p.name for p in testbed_copy.parent.iterdir()) == [testbed_copy.name]
    assert cv.main([str(testbed_copy.parent)]) == 0
    log = load_log(testbed_copy)
    assert log.jobs["outcome"].iloc[i] == "miss"
    assert log.extra["meta"]["converted"]["rank_pending_to_miss"] == 1


def _old_layout_run(folder: Path) -> Path:
    """A tiny testbed run in the older layout, written by hand (so the conversion stays
    tested once the committed runs are converted)."""
    folder.mkdir(parents=True)
    pd.DataFrame({"arrival_ms": [0.0, 5.0, 6.1, 9.3], "user_id": [7, 8, 9, 7],
                  "history_len": [8192, 4096, 1024, 8192], "candidates": [128, 128, 64, 128]}
                 ).to_parquet(folder / "trace.parquet", index=False)
    nan = np.nan
    pd.DataFrame({
        "kind": pd.Categorical(["pre", "rank", "pre", "rank", "rank", "pre", "rank"]),
        "request_id": [0, 0, 1, 1, 2, 3, 3],
        "start_ms": [0.0, 3.0, nan, 7.0, 9.0, 10.0, 11.3],
        "end_ms": [3.0, 4.0, nan, 9.0, 10.0, 11.0, 12.0],
        "outcome": pd.Categorical(["computed", "hit", "skipped", "pending", "miss", "computed", "hit"]),
        "phase": pd.Categorical(["prefix_encode", "rank_cached", "", "full_forward", "full_forward",
                                 "prefix_encode", "rank_cached"]),
    }).to_parquet(folder / "jobs.parquet", index=False)
    policy = {"kind": "relay", "min_history_len": 4096, "cache_bytes": 1 << 30}
    scen = {"name": folder.name, "workload": {"arrivals": {"kind": "trace", "path": "trace.parquet"}},
            "stages": {"upstream": {"nodes": {"count": 1, "device": "cpu"}, "router": "delay",
                                    "service": {"kind": "constant", "ms": 2.0}},
                       "ranking": {"nodes": {"count": 1, "device": "cpu"}, "router": "round_robin",
                                   "queue": "fifo", "service": {"kind": "gr", "table": "../tbl"}}},
            "slo": {"p99_ms": 100.0}, "run": {"replications": 1, "seed": 1, "warmup_s": 0.005},
            "relay": {"stage": "ranking", "signal_after": "arrival", "signal_ms": 0.0,
                      "trigger": {"kind": "length", "min_history_len": 4096}, "queue": "fifo",
                      "cache": {"hbm_bytes": 1 << 30}}}
    (folder / "scenario.yaml").write_text(yaml.safe_dump(scen, sort_keys=False))
    meta = {"name": folder.name, "policy": policy, "workload": {"lead_ms": 2.0, "requests": 4},
            "table": {"path": "../tbl", "name": "tbl"}, "device": "cpu-test", "warmup_s": 0.005,
            "pilot": True, "stored_columns": ["kind", "request_id", "start_ms", "end_ms", "outcome", "phase"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "notes.txt").write_text("kept")
    return folder


def test_convert_hand_written_old_run(tmp_path):
    from simrec.calibration import convert_runs as cv
    folder = _old_layout_run(tmp_path / "runs" / "relay_tiny")
    info = cv.convert(folder)
    assert info["pending_to_miss"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["jobs.parquet", "notes.txt", "run.yaml"]
    log = load_log(folder)
    j = log.jobs
    np.testing.assert_array_equal(j["arrival_ms"], [0.0, 2.0, 5.0, 7.0, 8.1, 9.3, 11.3])
    assert j["outcome"].tolist() == ["computed", "hit", "skipped", "miss", "miss", "computed", "hit"]
    assert j["user_id"].tolist() == [7, 7, 8, 8, 9, 7, 7]
    assert j["candidates"].tolist() == [128, 128, 128, 128, 64, 128, 128]
    assert j["phase"].tolist()[2] == ""
    assert log.table == str((tmp_path / "runs" / "tbl").resolve())
    assert (log.device, log.lead_ms, log.warmup_s) == ("cpu-test", 2.0, 0.005)
    assert log.extra["meta"] == {"name": "relay_tiny", "workload": {"requests": 4}, "table": {"name": "tbl"},
                                 "pilot": True,
                                 "converted": {"by": "calibration/convert_runs.py",
                                               "from": "testbed layout: jobs.parquet, trace.parquet, "
                                                       "scenario.yaml, meta.json",
                                               "rank_pending_to_miss": 1}}
    np.testing.assert_allclose(log.ran()["overhead_ms"], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_convert_refuses_disagreeing_meta(tmp_path):
    from simrec.calibration import convert_runs as cv
    folder = _old_layout_run(tmp_path / "runs" / "bad")
    meta = json.loads((folder / "meta.json").read_text())
    meta["warmup_s"] = 1.0
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as e:
        cv.convert(folder)
    assert str(e.value) == f"{folder}: meta.json and scenario.yaml disagree: warmup_s 0.005 vs meta 1.0"
    assert sorted(p.name for p in folder.iterdir()) == ["jobs.parquet", "meta.json", "notes.txt",
                                                        "scenario.yaml", "trace.parquet"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["bad"]
