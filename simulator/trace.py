"""Arrival traces: CSV or Parquet files with one request per row.

Columns: arrival_ms (non-decreasing, >= 0), user_id (int >= 0), history_len (int >= 1),
candidates (int >= 1). A bad row is reported with its line (CSV) or row index (Parquet).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError
from .tabular import numeric, read_frame, row_error

COLUMNS = ("arrival_ms", "user_id", "history_len", "candidates")


@lru_cache(maxsize=8)
def read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_ms, user_id, history_len, candidates); cached per path, do not mutate."""
    p = Path(path)
    if not p.exists():
        raise InputError("trace file not found", path)
    frame = read_frame(p, COLUMNS)
    if len(frame) == 0:
        raise InputError("trace has no rows", path)
    cols = {c: numeric(frame, p, c, integer=(c != "arrival_ms")) for c in COLUMNS}
    for c, low in (("arrival_ms", 0), ("user_id", 0), ("history_len", 1), ("candidates", 1)):
        under = np.flatnonzero(cols[c] < low)
        if len(under):
            raise row_error(p, int(under[0]), f"{c} must be >= {low} (got {cols[c][under[0]]:g})")
    back = np.flatnonzero(np.diff(cols["arrival_ms"]) < 0)
    if len(back):
        raise row_error(p, int(back[0]) + 1, "arrival_ms must be non-decreasing")
    return (cols["arrival_ms"], cols["user_id"].astype(np.int64),
            cols["history_len"].astype(np.int64), cols["candidates"].astype(np.int64))
