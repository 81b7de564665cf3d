"""Reading user-supplied files: text (scenarios, sweep files, manifests) and tables
(traces, cost tables) with row-precise errors.

Every file is checked before it is read: a folder, FIFO or device is refused (reading
/dev/zero or a FIFO would never end), and so is a file over the size limit, so a bad path
costs one line, never a hang or a MemoryError. Text must be UTF-8.

CSV is read with blank lines kept, so data row i is always physical line i + 2 (the
header is line 1); Parquet rows are reported by index.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError


MAX_TEXT_BYTES = 4 * 2**20      # a scenario, sweep file or manifest
MAX_TABLE_BYTES = 2**30         # a trace or cost table (CSV or Parquet)


def regular_file(path: Path, what: str, max_bytes: int) -> os.stat_result:
    """The file's stat, if it is a regular file within the size limit; else one InputError."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot read {what} ({e.strerror})", str(path)) from None
    except ValueError:
        raise InputError(f"cannot read {what} (a NUL byte in its path)", repr(str(path))) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"cannot read {what}: it is a folder, not a file", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"cannot read {what}: not a regular file (a FIFO, socket or device)",
                         str(path))
    if st.st_size > max_bytes:
        raise InputError(f"{what} is too large ({st.st_size / 2**20:.0f} MiB; the limit is "
                         f"{max_bytes / 2**20:.0f} MiB)", str(path))
    return st


def read_bytes(path: Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """A regular file's bytes, opened without blocking and read no further than the limit."""
    regular_file(path, what, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):     # swapped since the check
                raise InputError(f"cannot read {what}: not a regular file", str(path))
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise InputError(f"cannot read {what} ({e.strerror})", str(path)) from None
    if len(data) > max_bytes:
        raise InputError(f"{what} is too large (the limit is {max_bytes / 2**20:.0f} MiB)", str(path))
    return data


def read_text(path: Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A regular file as UTF-8 text (a UTF-8 byte-order mark is dropped)."""
    return decode_text(read_bytes(path, what, max_bytes), str(path), what)


def decode_text(data: bytes, source: str, what: str) -> str:
    """UTF-8 text, or one line saying what the bytes are instead (UTF-16, binary)."""
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        raise InputError(f"{what} is UTF-32 text; save it as UTF-8", source)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or _looks_utf16(data):
        raise InputError(f"{what} is UTF-16 text; save it as UTF-8", source)
    if b"\x00" in data:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise InputError(f"{what} is binary, not text (a NUL byte)", source, line=line)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8",
                         source, line=line) from None


def _looks_utf16(data: bytes) -> bool:
    """UTF-16 without a byte-order mark: ASCII text with every other byte NUL."""
    head = data[:4096]
    return len(head) >= 4 and (head[1::2].count(0) > 0.9 * len(head[1::2])
                               or head[0::2].count(0) > 0.9 * len(head[0::2]))


def _sniff_table(path: Path, csv: bool) -> None:
    """Refuse binary data posing as CSV (e.g. a sparse file of NULs) and non-Parquet bytes."""
    with open(path, "rb") as f:
        head = f.read(65536)
    if csv:
        if b"\x00" in head:
            decode_text(head, str(path), "CSV file")     # names UTF-16 or binary
    elif head[:4] != b"PAR1":
        raise InputError("cannot read file: not a Parquet file (no PAR1 header)",
                         str(path))


def read_frame(path: Path, required: tuple[str, ...], what: str = "table file") -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame with the required columns present."""
    csv = path.suffix.lower() == ".csv"
    regular_file(path, what, MAX_TABLE_BYTES)
    try:
        _sniff_table(path, csv)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror})", str(path)) from None
    try:
        frame = pd.read_csv(path, skip_blank_lines=False) if csv else pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types; all mean "not readable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot read file: {first}", str(path)) from None
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
