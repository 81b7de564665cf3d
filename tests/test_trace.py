"""Arrival traces (simrec.trace.read_trace) and their replay through a whole simulation.

read_trace is cached by path, so every test writes its own file (tmp_path is per test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import simrec
from simrec.calibration.table import COLUMNS as TABLE_COLUMNS
from simrec.calibration.table import write_table
from simrec.errors import InputError
from simrec.loader import validate
from simrec.trace import read_trace

NEED = "(need arrival_ms, user_id, history_len, candidates)"


def trace_frame(n: int = 200, seed: int = 5, min_gap_ms: float = 0.0) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    gaps = min_gap_ms + g.exponential(2.0, n)
    return pd.DataFrame({
        "arrival_ms": np.round(np.cumsum(gaps), 3),
        "user_id": g.integers(0, 50, n),
        "history_len": g.integers(64, 8192, n),
        "candidates": g.integers(8, 512, n),
    })


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def csv_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error(path: Path) -> str:
    with pytest.raises(InputError) as e:
        read_trace(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- valid traces
@pytest.mark.parametrize("name", ["ok.csv", "ok.parquet"])
def test_valid_trace_loads_with_int_dtypes(tmp_path, name):
    f = trace_frame()
    path = write(f, tmp_path / name)
    arrival, user, L, M = read_trace(str(path))
    assert arrival.dtype == np.float64
    assert user.dtype == L.dtype == M.dtype == np.int64
    np.testing.assert_array_equal(arrival, f["arrival_ms"].to_numpy(float))
    np.testing.assert_array_equal(user, f["user_id"])
    np.testing.assert_array_equal(L, f["history_len"])
    np.testing.assert_array_equal(M, f["candidates"])


def test_integral_floats_and_ties_are_accepted(tmp_path):
    # 3.0 is an integer; equal arrival times are non-decreasing; extra columns are ignored
    path = csv_text(tmp_path / "floats.csv", "arrival_ms,user_id,history_len,candidates,note\n"
                    "0,1,10.0,3,a\n5.5,2,20,4.0,b\n5.5,0,1,1,c\n")
    arrival, user, L, M = read_trace(str(path))
    np.testing.assert_array_equal(arrival, [0, 5.5, 5.5])
    np.testing.assert_array_equal(L, [10, 20, 1])
    np.testing.assert_array_equal(M, [3, 4, 1])
    assert L.dtype == np.int64


# ---------------------------------------------------------------- malformed traces
HEADER = "arrival_ms,user_id,history_len,candidates\n"


def test_missing_column_csv(tmp_path):
    path = csv_text(tmp_path / "nocol.csv", "arrival_ms,user_id,candidates\n0,1,5\n")
    assert error(path) == f"{path}:1: missing column(s): history_len {NEED}"


def test_missing_column_parquet(tmp_path):
    path = write(trace_frame().drop(columns=["user_id", "candidates"]), tmp_path / "nocol.parquet")
    assert error(path) == f"{path}: missing column(s): user_id, candidates {NEED}"


def test_non_numeric_history_len_csv_reports_line(tmp_path):
    # data row 3 is line 5 (header is line 1)
    path = csv_text(tmp_path / "text.csv", HEADER + "0,1,10,5\n1,2,10,5\n2,3,10,5\n3,4,abc,5\n4,5,10,5\n")
    assert error(path) == f"{path}:5 row 3: history_len is missing or not a number (got 'abc')"


def test_non_numeric_history_len_parquet_reports_row(tmp_path):
    f = trace_frame(10).astype({"history_len": object})
    f.loc[6, "history_len"] = "long"
    path = write(f.astype({"history_len": str}), tmp_path / "text.parquet")
    assert error(path) == f"{path} row 6: history_len is missing or not a number (got 'long')"


def test_empty_cell_message(tmp_path):
    path = csv_text(tmp_path / "hole.csv", HEADER + "0,1,10,5\n1,2,,5\n")
    assert error(path) == f"{path}:3 row 1: history_len is missing or not a number (got an empty cell)"


def test_empty_cell_is_rejected_at_its_line(tmp_path):
    path = csv_text(tmp_path / "hole2.csv", HEADER + "0,1,10,5\n1,2,,5\n")
    with pytest.raises(InputError) as e:
        read_trace(str(path))
    assert (e.value.line, e.value.path) == (3, "row 1")
    assert e.value.message.startswith("history_len is missing or not a number")


def test_negative_user_id(tmp_path):
    path = csv_text(tmp_path / "neg.csv", HEADER + "0,1,10,5\n1,-3,10,5\n")
    assert error(path) == f"{path}:3 row 1: user_id must be >= 0 (got -3)"


def test_negative_user_id_parquet(tmp_path):
    f = trace_frame(20)
    f.loc[11, "user_id"] = -7
    path = write(f, tmp_path / "neg.parquet")
    assert error(path) == f"{path} row 11: user_id must be >= 0 (got -7)"


def test_zero_history_len(tmp_path):
    path = csv_text(tmp_path / "zero.csv", HEADER + "0,1,0,5\n")
    assert error(path) == f"{path}:2 row 0: history_len must be >= 1 (got 0)"


def test_negative_arrival(tmp_path):
    path = csv_text(tmp_path / "early.csv", HEADER + "-1.5,1,10,5\n")
    assert error(path) == f"{path}:2 row 0: arrival_ms must be >= 0 (got -1.5)"


def test_decreasing_arrival_reports_the_row_that_goes_back(tmp_path):
    path = csv_text(tmp_path / "back.csv", HEADER + "0,1,10,5\n10,1,10,5\n20,1,10,5\n15,1,10,5\n30,1,10,5\n")
    assert error(path) == f"{path}:5 row 3: arrival_ms must be non-decreasing"


def test_fractional_candidates(tmp_path):
    path = csv_text(tmp_path / "frac.csv", HEADER + "0,1,10,5\n1,3,10,2.5\n")
    assert error(path) == f"{path}:3 row 1: candidates must be an integer (got 2.5)"


def test_empty_file(tmp_path):
    path = csv_text(tmp_path / "empty.csv", "")
    assert error(path) == f"{path}: cannot read file: No columns to parse from file"


def test_header_only_file(tmp_path):
    path = csv_text(tmp_path / "header.csv", HEADER)
    assert error(path) == f"{path}: trace has no rows"


def test_empty_parquet(tmp_path):
    path = write(trace_frame(0), tmp_path / "empty.parquet")
    assert error(path) == f"{path}: trace has no rows"


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet")
    assert error(path).startswith(f"{path}: cannot read file: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.csv"
    assert error(path) == f"{path}: trace file not found"


def test_blank_line_is_reported_at_its_physical_line(tmp_path):
    # Blank lines are kept as rows, so line numbers stay physical; the blank row is itself bad.
    path = csv_text(tmp_path / "blank.csv", HEADER + "0,1,10,5\n\n1,2,abc,5\n")
    with pytest.raises(InputError) as e:
        read_trace(str(path))
    assert e.value.line == 3 and "got an empty cell" in e.value.message


# ---------------------------------------------------------------- replay
def replay_scenario(trace: Path, service: dict | None = None, **run) -> simrec.Scenario:
    return validate({
        "name": "replay",
        "workload": {"arrivals": {"kind": "trace", "path": str(trace)}},
        "stages": {"rank": {"nodes": {"count": 1, "device": "cpu"}, "router": "shared",
                            "service": service or {"kind": "constant", "ms": 1.0}}},
        "slo": {"p99_ms": 50.0},
        "run": {"replications": 1, "seed": 3, **run},
    })


@pytest.mark.parametrize("name", ["replay.csv", "replay.parquet"])
def test_trace_replays_exactly(tmp_path, name):
    # Gaps >= 1.5 ms and a 1 ms constant service: nobody ever waits, so each request's
    # latency is exactly its service time and the simulated clock must follow the trace.
    f = trace_frame(300, seed=8, min_gap_ms=1.5)
    path = write(f, tmp_path / name)
    res = simrec.simulate(replay_scenario(path))
    req = res.requests.to_pandas()
    assert len(req) == len(f) and res.summary["requests"]["created"] == len(f)
    assert res.summary["requests"]["completed"] == len(f)
    np.testing.assert_array_equal(req["arrival_ms"], f["arrival_ms"].to_numpy(float))
    np.testing.assert_array_equal(req["user_id"], f["user_id"])
    np.testing.assert_array_equal(req["history_len"], f["history_len"])
    np.testing.assert_array_equal(req["candidates"], f["candidates"])
    np.testing.assert_allclose(req["rank_wait_ms"], 0.0, atol=1e-9)
    np.testing.assert_allclose(req["latency_ms"], 1.0, rtol=1e-9)
    np.testing.assert_allclose(req["completion_ms"], f["arrival_ms"] + 1.0, rtol=0, atol=1e-9)


def test_replay_with_queueing_and_ties(tmp_path):
    # Three requests at the same instant and one later, on one FIFO server of 2 ms:
    # completions at 2, 4, 6 and (arrival 5 waits until 6) 8.
    path = csv_text(tmp_path / "ties.csv", HEADER + "0,1,10,5\n0,2,20,6\n0,3,30,7\n5,1,10,8\n")
    res = simrec.simulate(replay_scenario(path, {"kind": "constant", "ms": 2.0}))
    req = res.requests.to_pandas()
    np.testing.assert_allclose(req["completion_ms"], [2, 4, 6, 8], atol=1e-9)
    np.testing.assert_allclose(req["rank_wait_ms"], [0, 2, 4, 1], atol=1e-9)
    np.testing.assert_array_equal(req["user_id"], [1, 2, 3, 1])


def test_replay_feeds_trace_shapes_to_the_cost_table(tmp_path):
    # A one-quantile table of t = 0.001 L^0.5 M^0.8 makes service a deterministic function
    # of the request's shape; log-log interpolation is exact for a power law.
    Ls, Ms = [64, 512, 8192], [8, 64, 512]
    rows = [("rank_cached", "isolated", L, M, 0.5, 0.001 * L**0.5 * M**0.8, 10) for L in Ls for M in Ms]
    folder = tmp_path / "table"
    write_table(pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), folder, {
        "format_version": 1, "name": "t", "label": "illustrative", "table_file": "table.parquet",
        "sha256": "0" * 64, "device": {"name": "none"}, "date": "2026-01-01", "model": {},
        "grid": {"history_len": Ls, "candidates": Ms}})
    f = trace_frame(100, seed=9)
    path = write(f, tmp_path / "shapes.parquet")
    res = simrec.simulate(replay_scenario(path, {"kind": "table", "table": str(folder),
                                                 "phase": "rank_cached"}))
    req = res.requests.to_pandas()
    expected = 0.001 * f["history_len"] ** 0.5 * f["candidates"] ** 0.8
    np.testing.assert_allclose(req["rank_service_ms"], expected, rtol=1e-9)
    assert res.summary["extrapolated_lookups"]["rank"] == 0


def test_replay_is_cut_by_run_length(tmp_path):
    f = trace_frame(100, seed=10, min_gap_ms=1.5)
    path = write(f, tmp_path / "cut.csv")
    by_count = simrec.simulate(replay_scenario(path, requests=40)).requests.to_pandas()
    np.testing.assert_array_equal(by_count["arrival_ms"], f["arrival_ms"][:40])
    horizon_ms = float(f["arrival_ms"][60]) + 0.0005   # trace times are rounded to 0.001 ms
    by_time = simrec.simulate(replay_scenario(path, duration_s=horizon_ms / 1000)).requests.to_pandas()
    np.testing.assert_array_equal(by_time["arrival_ms"], f["arrival_ms"][:61])


def test_trace_path_in_yaml_is_relative_to_the_scenario(tmp_path):
    f = trace_frame(30, seed=11, min_gap_ms=1.5)
    (tmp_path / "data").mkdir()
    write(f, tmp_path / "data" / "rel.csv")
    (tmp_path / "s.yaml").write_text(
        "name: rel\nworkload:\n  arrivals: {kind: trace, path: data/rel.csv}\n"
        "stages:\n  rank:\n    nodes: {device: cpu}\n    service: {kind: constant, ms: 1}\n"
        "slo: {p99_ms: 10}\nrun: {replications: 1}\n")
    scen = simrec.load_scenario(tmp_path / "s.yaml")
    assert scen.workload.arrivals.path == str((tmp_path / "data" / "rel.csv").resolve())
    req = simrec.simulate(scen).requests.to_pandas()
    np.testing.assert_array_equal(req["arrival_ms"], f["arrival_ms"])


def test_bad_trace_surfaces_as_input_error_from_simulate(tmp_path):
    path = csv_text(tmp_path / "bad_in_run.csv", HEADER + "0,1,10,5\n1,-3,10,5\n")
    with pytest.raises(InputError) as e:
        simrec.simulate(replay_scenario(path))
    assert str(e.value) == f"{path}:3 row 1: user_id must be >= 0 (got -3)"


def test_trace_with_rate_is_rejected(tmp_path):
    with pytest.raises(InputError) as e:
        validate({"name": "x", "workload": {"rate_qps": 10, "arrivals": {"kind": "trace", "path": "/t.csv"}},
                  "stages": {"s": {"service": {"kind": "constant", "ms": 1}}}, "slo": {"p99_ms": 1}})
    assert "rate_qps must not be set with trace arrivals" in str(e.value)
