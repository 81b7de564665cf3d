"""Arrival traces: CSV or Parquet files with one request per row.

Columns: arrival_ms (non-decreasing, >= 0), user_id (int >= 0), history_len (int >= 1),
candidates (int >= 1). A bad row is reported with its line (CSV) or row index (Parquet).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

COLUMNS = ("arrival_ms", "user_id", "history_len", "candidates")


@lru_cache(maxsize=8)
def read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_ms, user_id, history_len, candidates); cached per path, do not mutate."""
    p = Path(path)
    if not p.exists():
        raise InputError("trace file not found", path)
    csv = p.suffix.lower() == ".csv"
    try:
        frame = pd.read_csv(p) if csv else pd.read_parquet(p)
    except Exception as e:  # many parser exception types; all mean "not a readable trace"
        raise InputError(f"cannot read trace: {e}".splitlines()[0], path) from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)} "
                         f"(need {', '.join(COLUMNS)})", path, line=1 if csv else None)

    def bad(i: int, msg: str) -> InputError:
        return InputError(msg, path, f"row {i}", line=i + 2 if csv else None)

    cols = {}
    for c in COLUMNS:
        v = pd.to_numeric(frame[c], errors="coerce").to_numpy(float)
        nan = np.flatnonzero(~np.isfinite(v))
        if len(nan):
            raise bad(int(nan[0]), f"{c} is missing or not a number (got {frame[c].iloc[nan[0]]!r})")
        cols[c] = v
    for c, low in (("arrival_ms", 0), ("user_id", 0), ("history_len", 1), ("candidates", 1)):
        under = np.flatnonzero(cols[c] < low)
        if len(under):
            raise bad(int(under[0]), f"{c} must be >= {low} (got {cols[c][under[0]]:g})")
    for c in ("user_id", "history_len", "candidates"):
        frac = np.flatnonzero(cols[c] != np.round(cols[c]))
        if len(frac):
            raise bad(int(frac[0]), f"{c} must be an integer (got {cols[c][frac[0]]:g})")
    back = np.flatnonzero(np.diff(cols["arrival_ms"]) < 0)
    if len(back):
        raise bad(int(back[0]) + 1, "arrival_ms must be non-decreasing")
    if len(frame) == 0:
        raise InputError("trace has no rows", path)
    return (cols["arrival_ms"], cols["user_id"].astype(np.int64),
            cols["history_len"].astype(np.int64), cols["candidates"].astype(np.int64))

