"""Serving logs: what one serving instance did, in a documented format (calibration/FORMAT.md,
"Serving-log format (version 1)").

A serving log is a folder with ``jobs.parquet`` (or ``jobs.csv``), one row per job that
arrived at the instance, in the order the jobs were started, and ``run.yaml``, the device,
the cost table calibrated for it and the cache policy it served with. `load_log` validates
both and fails with one `InputError` whose text is one line naming the file, the row and
the column:

    <folder>/jobs.parquet row 3 column end_ms: end_ms < start_ms (4.0 < 5.0)
    <folder>/jobs.csv:4 row 3 column end_ms: end_ms < start_ms (4.0 < 5.0)
    <folder>/run.yaml:5 policy.cache_bytes: must be an integer > 0 (got str '16GiB')

Rows are 1-based data rows as in the file (for CSV the header is line 1, so data row N is
line N + 1). Files are read through `read_regular_file`, which refuses anything that is not
a regular file (a directory, a FIFO, a device) without opening it for a blocking read.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .errors import InputError
from .folders import atomic_folder

JOB_COLUMNS = ("kind", "request_id", "user_id", "history_len", "candidates",
               "arrival_ms", "start_ms", "end_ms", "outcome")
INT_COLUMNS = ("request_id", "user_id", "history_len", "candidates")
TIME_COLUMNS = ("arrival_ms", "start_ms", "end_ms")
KINDS = ("rank", "pre")
OUTCOMES = {"rank": ("hit", "miss", "none"), "pre": ("computed", "skipped", "rejected", "cancelled")}
NOT_RUN = ("skipped", "rejected")            # pre outcomes of a signal that made no job
POLICY_KINDS = ("full", "relay")
POLICY_FIELDS = ("kind", "min_history_len", "cache_bytes", "pin")
PINS = ("until_ranked", "none")
RUN_FIELDS = ("device", "table", "policy", "lead_ms", "warmup_s")
START_SLACK_MS = 1e-6                        # start_ms may precede arrival_ms by this much
MAX_YAML_BYTES = 1 << 20
MAX_JOBS_BYTES = 1 << 32
JOBS_FILES = ("jobs.parquet", "jobs.csv")
RUN_FILE = "run.yaml"


# ----------------------------------------------------------------------------- the log

@dataclass
class ServingLog:
    """One validated serving log (see the module docstring and FORMAT.md)."""

    name: str
    folder: Path
    jobs: pd.DataFrame
    device: str
    table: str
    policy: dict
    lead_ms: float
    warmup_s: float
    extra: dict = field(default_factory=dict)

    def ranking(self) -> pd.DataFrame:
        """Ranking jobs, one row per request, sorted by request_id (index 0..n-1), with
        latency_ms = end_ms - arrival_ms."""
        r = self.jobs[self.jobs["kind"] == "rank"].sort_values("request_id", kind="stable")
        r = r.reset_index(drop=True)
        return r.assign(latency_ms=r["end_ms"] - r["arrival_ms"])

    def ran(self) -> pd.DataFrame:
        """Jobs that ran, in start order (index 0..n-1), with service_ms = end - start,
        overhead_ms = start - max(arrival, prev_end), busy_ms = service_ms + overhead_ms and
        idle_ms = max(arrival - prev_end, 0), where prev_end is the end of the previously
        started job (0 before the first; the first job's idle_ms is inf)."""
        j = self.jobs[self.jobs["start_ms"].notna()].sort_values("start_ms", kind="stable")
        j = j.reset_index(drop=True)
        start, end, arrival = (j[c].to_numpy(float) for c in ("start_ms", "end_ms", "arrival_ms"))
        prev_end = np.concatenate([[0.0], end[:-1]])
        service = end - start
        overhead = start - np.maximum(arrival, prev_end)
        idle = np.maximum(arrival - prev_end, 0.0)
        if len(idle):
            idle[0] = np.inf
        return j.assign(service_ms=service, overhead_ms=overhead, busy_ms=service + overhead,
                        idle_ms=idle)

    def run_dict(self) -> dict:
        """The run.yaml content (table as resolved here), e.g. for `write_log`."""
        return {"device": self.device, "table": self.table, "policy": dict(self.policy),
                "lead_ms": self.lead_ms, "warmup_s": self.warmup_s, **self.extra}


def find_logs(paths: list[Path]) -> list[Path]:
    """Serving-log folders: each given folder that holds run.yaml, else its immediate
    sub-folders that do (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / RUN_FILE).exists():
            out.append(p)
        elif p.is_dir():
            out += sorted(d for d in p.iterdir() if d.is_dir() and (d / RUN_FILE).exists())
        else:
            raise InputError("not a serving-log folder (no run.yaml) nor a folder of them", str(p))
    if not out:
        raise InputError("no serving logs found (folders holding run.yaml)",
                         ", ".join(map(str, paths)) or None)
    return out


def load_log(folder: str | Path) -> ServingLog:
    """Read and validate a serving-log folder; the first problem is one InputError line."""
    folder = Path(folder)
    if not folder.is_dir():
        why = "no such folder" if not folder.exists() else "not a folder"
        raise InputError(f"not a serving-log folder ({why})", str(folder))
    run_path = folder / RUN_FILE
    if not os.path.lexists(run_path):
        raise InputError(f"file not found (a serving-log folder holds {RUN_FILE} and "
                         f"jobs.parquet or jobs.csv)", str(run_path))
    data, root = _read_yaml(run_path)
    run = validate_run(data, str(run_path), root)
    jobs_path = _jobs_file(folder)
    jobs = validate_jobs(_read_jobs(jobs_path), str(jobs_path), csv=jobs_path.suffix == ".csv")
    return ServingLog(name=folder.name, folder=folder, jobs=jobs, device=run["device"],
                      table=resolve_table(run["table"], folder), policy=run["policy"],
                      lead_ms=run["lead_ms"], warmup_s=run["warmup_s"], extra=run["extra"])


def resolve_table(table: str, folder: Path) -> str:
    """A table folder path (relative to the log folder) -> absolute path string; a bare
    name without '/' that is no existing folder is a built-in table name, kept as given."""
    p = Path(table).expanduser()
    if not p.is_absolute():
        p = folder / p
    if "/" in table or p.is_dir():
        return str(p.resolve())
    return table


def write_log(folder: str | Path, jobs: pd.DataFrame, run: dict) -> Path:
    """Validate and write jobs.parquet + run.yaml into `folder`, atomically: both go into a
    temp folder beside it, renamed into place when complete. An existing folder is
    replaced only if it is a serving log (holds run.yaml)."""
    folder = Path(folder)
    if os.path.lexists(folder):
        if not folder.is_dir():
            raise InputError("exists and is not a folder: refusing to replace it", str(folder))
        if not (folder / RUN_FILE).exists():
            raise InputError(f"exists and is not a serving log (no {RUN_FILE}): refusing to replace it",
                             str(folder))
    if not isinstance(run, dict):
        raise InputError(f"run must be a mapping (got {type(run).__name__})", str(folder / RUN_FILE))
    checked = validate_run(run, str(folder / RUN_FILE))
    frame = validate_jobs(jobs, str(folder / "jobs.parquet"), csv=False)
    doc = {"device": checked["device"], "table": checked["table"], "policy": checked["policy"],
           "lead_ms": checked["lead_ms"], "warmup_s": checked["warmup_s"], **checked["extra"]}
    try:
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as e:
        raise InputError(f"cannot write as YAML (plain str/int/float/bool/list/dict only): "
                         f"{str(e).splitlines()[0]}", str(folder / RUN_FILE)) from None
    with atomic_folder(folder, replaces=_is_log_folder) as tmp:
        os.chmod(tmp, 0o777 & ~_umask())          # mkdtemp makes it 0700
        write_jobs_parquet(frame, tmp / "jobs.parquet")
        (tmp / RUN_FILE).write_text(text, encoding="utf-8")
    return folder


def _is_log_folder(path: Path) -> bool:
    """What write_log may replace: an empty folder, or a serving log and nothing else (no
    other simrec writer may: folders.is_simrec_folder leaves logs out)."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return not names or (RUN_FILE in names and names <= {RUN_FILE, *JOBS_FILES})


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_jobs_parquet(frame: pd.DataFrame, path: Path) -> None:
    """zstd (level 19); dictionary pages for the string columns only; delta-encoded ints
    and byte-stream-split floats (times stay float64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = frame.copy()
    for c in TIME_COLUMNS:
        frame[c] = frame[c].astype(np.float64)
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise InputError(f"cannot write as Parquet: {str(e).splitlines()[0]}", str(path)) from None
    dictionary, encoding = [], {}
    for f in table.schema:
        t = f.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            dictionary.append(f.name)
        elif pa.types.is_integer(t):
            encoding[f.name] = "DELTA_BINARY_PACKED"
        elif pa.types.is_floating(t):
            encoding[f.name] = "BYTE_STREAM_SPLIT"
    pq.write_table(table, path, compression="zstd", compression_level=19, use_dictionary=dictionary,
                   column_encoding=encoding or None)


# ----------------------------------------------------------------------------- reading

def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else (missing, a
    directory, a FIFO, a device, too large) is one InputError. Opened non-blocking and
    checked with fstat before reading, so a FIFO or /dev/zero cannot hang or flood."""
    src = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError("file not found", src) from None
    except IsADirectoryError:
        raise InputError("not a regular file (a directory)", src) from None
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror})", src) from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise InputError(f"cannot read file ({e.strerror})", src) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"not a regular file ({_file_kind(st.st_mode)})", src)
    if st.st_size > limit:
        os.close(fd)
        raise InputError(f"file too large ({st.st_size} bytes; at most {limit})", src)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise InputError(f"cannot read file ({e.strerror})", src) from None
    if len(data) > limit:
        raise InputError(f"file too large (more than {limit} bytes)", src)
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    src = str(path)
    raw = read_regular_file(path, MAX_YAML_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                         src, line=line) from None
    from .loader import parse_yaml
    data, root = parse_yaml(text, src)   # the scenario's reader: duplicate keys, depth, aliases
    if not isinstance(data, dict):
        got = "the file is empty" if data is None else f"got {type(data).__name__}"
        raise InputError(f"must be a YAML mapping ({got})", src, line=1)
    return data, root


def _jobs_file(folder: Path) -> Path:
    present = [folder / f for f in JOBS_FILES if os.path.lexists(folder / f)]
    if not present:
        raise InputError("no jobs.parquet or jobs.csv (a serving-log folder holds run.yaml and one of them)",
                         str(folder))
    if len(present) > 1:
        raise InputError("both jobs.parquet and jobs.csv are present: keep one", str(folder))
    return present[0]


def _read_jobs(path: Path) -> pd.DataFrame:
    raw = read_regular_file(path, MAX_JOBS_BYTES)
    try:
        if path.suffix == ".csv":
            # blank lines kept (they fail as empty cells) so data row N stays line N + 1
            return pd.read_csv(BytesIO(raw), skip_blank_lines=False, encoding="utf-8")
        return pd.read_parquet(BytesIO(raw))
    except Exception as e:  # pandas/pyarrow raise many types; all mean "not readable"
        msg = str(e).strip().splitlines()
        raise InputError(f"cannot read file: {msg[0] if msg else type(e).__name__}", str(path)) from None


# ----------------------------------------------------------------------------- jobs

def validate_jobs(frame: pd.DataFrame, source: str, csv: bool = False) -> pd.DataFrame:
    """Check a jobs table; return it normalised (kind/outcome str, ints int64, times
    float64, documented columns first, extra columns kept, index 0..n-1)."""

    def err(i: int, column: str, message: str) -> InputError:
        n = int(i) + 1
        return InputError(message, source, f"row {n} column {column}", line=n + 1 if csv else None)

    missing = [c for c in JOB_COLUMNS if c not in frame.columns]
    if missing:
        more = f"; also missing: {', '.join(missing[1:])}" if len(missing) > 1 else ""
        raise InputError(f"missing column (need {', '.join(JOB_COLUMNS)}{more})", source,
                         f"column {missing[0]}", line=1 if csv else None)
    if len(frame) == 0:
        raise InputError("no jobs (the file has no data rows)", source)
    frame = frame.reset_index(drop=True)

    kind = _strings(frame, "kind", err)
    bad = np.flatnonzero(~np.isin(kind, KINDS))
    if len(bad):
        raise err(bad[0], "kind", f"unknown kind {kind[bad[0]]!r} (expected rank or pre)")
    rank = kind == "rank"

    ints = {}
    for c in INT_COLUMNS:
        v = _integers(frame, c, err)
        low = np.where(rank, 1, 0) if c in ("history_len", "candidates") else np.zeros(len(v), np.int64)
        bad = np.flatnonzero(v < low)
        if len(bad):
            i = bad[0]
            need = f"> 0 for a {kind[i]} job" if low[i] else ">= 0"
            raise err(i, c, f"{c} must be {need} (got {v[i]})")
        ints[c] = v

    times = {c: _floats(frame, c, err, required=(c == "arrival_ms")) for c in TIME_COLUMNS}

    outcome = _strings(frame, "outcome", err)
    for k in KINDS:
        bad = np.flatnonzero((kind == k) & ~np.isin(outcome, OUTCOMES[k]))
        if len(bad):
            i = bad[0]
            allowed = ", ".join(OUTCOMES[k][:-1]) + " or " + OUTCOMES[k][-1]
            raise err(i, "outcome", f"outcome {outcome[i]!r} is not valid for a {k} job (expected {allowed})")

    # per row: the earliest row with a problem; ties go to the first check listed
    a, s, e = times["arrival_ms"], times["start_ms"], times["end_ms"]
    has_s, has_e = ~np.isnan(s), ~np.isnan(e)
    with np.errstate(invalid="ignore"):
        checks = [
            (has_s & ~has_e, "end_ms", lambda i: f"end_ms is empty but start_ms is set ({_num(s[i])})"),
            (~has_s & has_e, "start_ms", lambda i: f"start_ms is empty but end_ms is set ({_num(e[i])})"),
            (has_s & has_e & (e < s), "end_ms", lambda i: f"end_ms < start_ms ({_num(e[i])} < {_num(s[i])})"),
            (has_s & (s < a - START_SLACK_MS), "start_ms",
             lambda i: f"start_ms < arrival_ms ({_num(s[i])} < {_num(a[i])})"),
            ((kind == "pre") & (outcome == "computed") & ~has_s, "start_ms",
             lambda i: "start_ms is empty for a pre job with outcome 'computed' (a computed job ran)"),
            (np.isin(outcome, NOT_RUN) & has_s, "outcome",
             lambda i: f"outcome {outcome[i]!r} but the job has a start_ms ({_num(s[i])}): "
                       f"skipped and rejected signals did not run"),
        ]
    first = [(int(np.argmax(m)), k) for k, (m, _, _) in enumerate(checks) if m.any()]
    if first:
        i, k = min(first)
        raise err(i, checks[k][1], checks[k][2](i))

    rid = ints["request_id"]
    later = pd.DataFrame({"k": kind, "r": rid}).duplicated(keep="first").to_numpy()
    if later.any():
        i = int(np.argmax(later))
        first = int(np.flatnonzero((kind == kind[i]) & (rid == rid[i]))[0])
        raise err(i, "request_id", f"duplicate request_id {rid[i]} among {kind[i]} jobs "
                                   f"(first at row {first + 1})")

    worst = None
    for k in KINDS:
        rows = np.flatnonzero(kind == k)
        order = rows[np.argsort(rid[rows], kind="stable")]
        back = np.flatnonzero(np.diff(a[order]) < 0)
        if len(back):
            i, p = order[back[0] + 1], order[back[0]]
            if worst is None or i < worst[0]:
                worst = (i, p, k)
    if worst:
        i, p, k = worst
        raise err(i, "arrival_ms", f"arrival_ms goes back in request_id order among {k} jobs: request "
                                   f"{rid[i]} arrives at {_num(a[i])}, before request {rid[p]} "
                                   f"({_num(a[p])}, row {p + 1})")

    ran = np.flatnonzero(has_s)
    back = np.flatnonzero(np.diff(s[ran]) < 0)
    if len(back):
        i, p = ran[back[0] + 1], ran[back[0]]
        raise err(i, "start_ms", f"start_ms {_num(s[i])} is before the previous started job's "
                                 f"({_num(s[p])}, row {p + 1}): the file must list jobs in start order")

    out = pd.DataFrame({"kind": pd.array(kind, dtype=str), **ints, **times,
                        "outcome": pd.array(outcome, dtype=str)})
    out = out[list(JOB_COLUMNS)]
    for c in frame.columns:
        if c not in JOB_COLUMNS:
            out[c] = frame[c]
    return out


def _missing(s: pd.Series) -> np.ndarray:
    """Empty cells: NA/NaN, or (in a text column) a blank string."""
    na = s.isna().to_numpy()
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        blank = s.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(bool)
        na = na | blank
    return na


def _strings(frame: pd.DataFrame, column: str, err) -> np.ndarray:
    s = frame[column]
    na = _missing(s)
    if na.any():
        raise err(int(np.argmax(na)), column, f"{column} is empty")
    return np.asarray(s.astype(str).to_numpy(), dtype=object)


def _integers(frame: pd.DataFrame, column: str, err) -> np.ndarray:
    s = frame[column]
    if pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype) \
            and not s.isna().any():
        if pd.api.types.is_unsigned_integer_dtype(s.dtype) and len(s) and int(s.max()) > np.iinfo(np.int64).max:
            i = int(np.argmax(s.to_numpy() > np.iinfo(np.int64).max))
            raise err(i, column, f"{column} is too large for int64 (got {s.iloc[i]})")
        return s.to_numpy(np.int64)
    raw = s.to_numpy(object)
    na = _missing(s)
    if pd.api.types.is_bool_dtype(s.dtype):
        num = np.full(len(s), np.nan)
    else:
        num = pd.to_numeric(s, errors="coerce").to_numpy(float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = na | ~np.isfinite(num) | (num != np.round(num)) | (np.abs(num) >= 2.0 ** 63)
    if bad.any():
        i = int(np.argmax(bad))
        if na[i]:
            raise err(i, column, f"{column} is empty")
        raise err(i, column, f"{column} is not an integer (got {_shown(raw[i])})")
    return num.astype(np.int64)


def _floats(frame: pd.DataFrame, column: str, err, required: bool) -> np.ndarray:
    s = frame[column]
    na = _missing(s)
    if pd.api.types.is_bool_dtype(s.dtype):
        num = np.where(na, np.nan, np.inf)
        notnum = ~na
    else:
        num = pd.to_numeric(s, errors="coerce").to_numpy(float, na_value=np.nan)
        notnum = np.isnan(num) & ~na
    checks = [(notnum, lambda i: f"{column} is not a number (got {_shown(s.to_numpy(object)[i])})"),
              (np.isinf(num) & ~notnum, lambda i: f"{column} must be finite (got {_num(num[i])})"),
              (~np.isnan(num) & (num < 0), lambda i: f"{column} must be >= 0 (got {_num(num[i])})")]
    if required:
        checks.insert(0, (na, lambda i: f"{column} is empty"))
    first = [(int(np.argmax(m)), k) for k, (m, _) in enumerate(checks) if m.any()]
    if first:
        i, k = min(first)
        raise err(i, column, checks[k][1](i))
    return num


def _num(x: Any) -> str:
    """A numpy or Python float as Python writes it (4.0, inf, 1e-07)."""
    return repr(float(x))


def _shown(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (bool, np.bool_)):
        return repr(bool(v))
    return repr(v) if isinstance(v, str) else str(v)


# ----------------------------------------------------------------------------- run.yaml

def validate_run(data: dict, source: str, root: yaml.Node | None = None) -> dict:
    """Check a run.yaml mapping; return {device, table, policy (normalised), lead_ms,
    warmup_s, extra}. Errors name the field path (e.g. policy.cache_bytes) and, when the
    YAML node tree is given, its line."""

    def err(path: str, message: str) -> InputError:
        return InputError(message, source, path, _line_of(root, path.split(".")))

    def need(d: dict, key: str, prefix: str = "") -> Any:
        if key not in d:
            raise err(prefix + key, "required field is missing")
        return d[key]

    device = need(data, "device")
    if not isinstance(device, str) or not device.strip():
        raise err("device", f"must be a non-empty string (got {_got(device)})")
    table = need(data, "table")
    if not isinstance(table, str) or not table.strip():
        raise err("table", f"must be a non-empty string: a cost-table folder or a built-in "
                           f"table name (got {_got(table)})")

    pol = need(data, "policy")
    if not isinstance(pol, dict):
        raise err("policy", f"must be a mapping such as {{kind: full}} (got {_got(pol)})")
    for k in pol:
        if k not in POLICY_FIELDS:
            raise err(f"policy.{k}", f"unknown field (policy fields: {', '.join(POLICY_FIELDS)})")
    kind = need(pol, "kind", "policy.")
    if kind not in POLICY_KINDS:
        raise err("policy.kind", f"unknown policy kind {kind!r} (expected full or relay)")
    if kind == "full":
        policy = {"kind": "full"}
    else:
        policy = {"kind": "relay"}
        for k in ("min_history_len", "cache_bytes"):
            v = need(pol, k, "policy.")
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise err(f"policy.{k}", f"must be an integer > 0 (got {_got(v)})")
            policy[k] = int(v)
        pin = pol.get("pin", "until_ranked")
        if pin not in PINS:
            raise err("policy.pin", f"unknown pin {pin!r} (expected until_ranked or none)")
        policy["pin"] = pin

    if "lead_ms" in data:
        lead = _number(data["lead_ms"], "lead_ms", err)
        if kind == "relay" and not lead > 0:
            raise err("lead_ms", f"must be > 0 for a relay policy (got {lead!r})")
        if lead < 0:
            raise err("lead_ms", f"must be >= 0 (got {lead!r})")
    elif kind == "relay":
        raise err("lead_ms", "required for a relay policy (how long a pre-infer signal precedes "
                             "its ranking request)")
    else:
        lead = 0.0
    warmup = _number(need(data, "warmup_s"), "warmup_s", err)
    if warmup < 0:
        raise err("warmup_s", f"must be >= 0 (got {warmup!r})")
    extra = {k: v for k, v in data.items() if k not in RUN_FIELDS}
    return {"device": device, "table": table, "policy": policy, "lead_ms": lead,
            "warmup_s": warmup, "extra": extra}


def _number(v: Any, path: str, err) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise err(path, f"must be a finite number (got {_got(v)})")
    return float(v)


def _got(v: Any) -> str:
    return "nothing" if v is None else f"{type(v).__name__} {v!r}"


def _line_of(root: yaml.Node | None, keys: list[str]) -> int | None:
    """1-based line of the value at `keys` (None without a tree or if it is absent)."""
    node = root
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                node = v
                break
        else:
            return None
    return node.start_mark.line + 1 if node is not None else None
