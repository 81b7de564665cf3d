"""Reading user-supplied tables (traces, cost tables) with row-precise errors.

CSV is read with blank lines kept, so data row i is always physical line i + 2 (the
header is line 1); Parquet rows are reported by index.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError


def read_frame(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame with the required columns present."""
    csv = path.suffix.lower() == ".csv"
    try:
        frame = pd.read_csv(path, skip_blank_lines=False) if csv else pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types; all mean "not readable"
        raise InputError(f"cannot read file: {str(e).splitlines()[0]}", str(path)) from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)} (need {', '.join(required)})",
                         str(path), line=1 if csv else None)
    return frame


def row_error(path: Path, i: int, message: str) -> InputError:
    csv = path.suffix.lower() == ".csv"
    return InputError(message, str(path), f"row {i}", line=i + 2 if csv else None)


def numeric(frame: pd.DataFrame, path: Path, column: str, integer: bool = False) -> np.ndarray:
    """A column as finite floats; the first bad cell is reported with its row."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(float)
    inf = np.flatnonzero(np.isinf(values))
    if len(inf):
        raise row_error(path, int(inf[0]), f"{column} must be finite (got {values[inf[0]]:g})")
    bad = np.flatnonzero(np.isnan(values))
    if len(bad):
        raw = frame[column].iloc[bad[0]]
        shown = "an empty cell" if raw is None or (isinstance(raw, float) and math.isnan(raw)) else repr(raw)
        raise row_error(path, int(bad[0]), f"{column} is missing or not a number (got {shown})")
    if integer:
        frac = np.flatnonzero(values != np.round(values))
        if len(frac):
            raise row_error(path, int(frac[0]), f"{column} must be an integer (got {values[frac[0]]:g})")
    return values
