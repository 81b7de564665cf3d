"""Arrival traces: CSV or Parquet files with one request per row.

Columns: arrival_ms (non-decreasing, >= 0), user_id (int >= 0), history_len (int >= 1),
candidates (int >= 1). A bad row is reported with its line (CSV) or row index (Parquet).
Values have upper bounds (MAX) so that none wraps when it becomes an int64 or overflows
the model's byte counts.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError
from .scenario import MAX_CANDIDATES, MAX_HISTORY_LEN, MAX_TIME_MS
from .tabular import numeric, read_frame, row_error

COLUMNS = ("arrival_ms", "user_id", "history_len", "candidates")
MIN = {"arrival_ms": 0, "user_id": 0, "history_len": 1, "candidates": 1}
MAX = {"arrival_ms": MAX_TIME_MS, "user_id": 2**53, "history_len": MAX_HISTORY_LEN,
       "candidates": MAX_CANDIDATES}


def read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_ms, user_id, history_len, candidates); cached per file version, do not mutate."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        raise InputError("trace file not found", path) from None
    return _read(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, ...]:
    """Keyed by modification time and size too, so an edited trace is read again."""
    p = Path(path)
    frame = read_frame(p, COLUMNS, "trace file")
    if len(frame) == 0:
        raise InputError("trace has no rows", path)
    cols = {c: numeric(frame, p, c, integer=(c != "arrival_ms")) for c in COLUMNS}
    for c in COLUMNS:
        under = np.flatnonzero(cols[c] < MIN[c])
        if len(under):
            raise row_error(p, int(under[0]), f"{c} must be >= {MIN[c]} (got {cols[c][under[0]]:g})")
        over = np.flatnonzero(cols[c] > MAX[c])
        if len(over):
            raise row_error(p, int(over[0]), f"{c} must be <= {MAX[c]:g} (got {cols[c][over[0]]:g})")
    back = np.flatnonzero(np.diff(cols["arrival_ms"]) < 0)
    if len(back):
        raise row_error(p, int(back[0]) + 1, "arrival_ms must be non-decreasing")
    return (cols["arrival_ms"], cols["user_id"].astype(np.int64),
            cols["history_len"].astype(np.int64), cols["candidates"].astype(np.int64))
