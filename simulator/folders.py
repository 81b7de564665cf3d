"""Atomic output folders: everything is written into a temp folder beside the target,
which is swapped into place only when complete.

A target is replaced only if it is an earlier folder simrec wrote (`is_simrec_folder`);
a file, a link or a folder holding anything else is refused, so a mistyped `--out` never
deletes a user's files. The swap is one atomic exchange (Linux renameat2) where the file
system offers it, else two renames; it runs under a lock on the parent folder with SIGINT
and SIGTERM held back until it is done. Temp folders carry their process id: those of a
process that died (SIGKILL) are removed by the next writer, and an old folder left
between the two renames is put back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .errors import InputError

# What simrec writes into its output folders (results, sweep, capacity, fidelity, compare).
# A serving log (run.yaml, jobs.parquet) is not among them: it is measured data, which only
# serving_log.write_log may replace (a run or fidelity report at its path deleted it).
WRITES = frozenset({"summary.json", "requests.parquet", "timeseries.parquet", "report.html", "plots",
                    "sweep.json", "points.parquet", "capacity.json", "fidelity.csv",
                    "fidelity_detail.csv", "fidelity.md", "fidelity.json", "fidelity.png", "profiles",
                    "compare.csv"})
MAIN_FILES = ("summary.json", "sweep.json", "capacity.json", "fidelity.json", "compare.csv")
SUBFOLDERS = {"plots": ".png", "profiles": ".json"}
_LEFT = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]{8}$")


def is_simrec_folder(path: Path) -> bool:
    """An empty folder, or one holding only what simrec writes, with one of its main files.
    Anything else in it makes it the user's folder."""
    try:
        names = set(os.listdir(path))
        if not names:
            return True
        if not names <= WRITES:
            return False
        if not any(n in names for n in MAIN_FILES):
            return False
        return all(e.endswith(suffix) for sub, suffix in SUBFOLDERS.items() if sub in names
                   for e in os.listdir(path / sub))
    except FileNotFoundError:     # gone meanwhile (another writer's swap): nothing to lose
        return True
    except OSError:               # unreadable, or plots/ is not a folder
        return False


def safe_name(name: str, fallback: str = "results") -> str:
    """A folder name from a scenario's name: letters, digits, '.', '_' and '-' only, no
    leading dot, so `../x`, `/abs`, `.` or `""` stay one level below `results/`."""
    cleaned = re.sub(r"[^\w.-]+", "-", name).lstrip(".-")[:100].rstrip(".-")
    return cleaned or fallback


def check_target(out: Path, replaces: Callable[[Path], bool] = is_simrec_folder) -> None:
    """Refuse, in one line, an output path that simrec must not write or replace."""
    out = Path(out)
    shown = str(out)
    if out.name in ("", ".", "..") or shown in ("", ".") or "\0" in shown:
        raise InputError("not a folder simrec can write its results to; name a new folder, or "
                         "an earlier results folder to replace", shown if shown != "." else "'.'")
    try:
        mode = os.lstat(out).st_mode            # one look: another writer may be swapping it
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise InputError(f"cannot write here ({e.strerror})", shown) from None
    if mode is not None and stat.S_ISLNK(mode):
        raise InputError("is a symbolic link: refusing to replace it", shown)
    if mode is not None and not stat.S_ISDIR(mode):
        raise InputError("exists and is not a folder: refusing to replace it", shown)
    if mode is not None and not replaces(out):
        raise InputError("exists and is not a simrec results folder (it holds other files): "
                         "refusing to replace it; choose another folder", shown)
    for parent in out.parents:
        if os.path.lexists(parent) and not parent.is_dir():
            raise InputError(f"cannot create the folder: {parent} is not a folder", shown)
        if parent.is_dir():
            # Inside an earlier results folder, the new folder would make it a folder of the
            # user's (never replaced again), and change what `compare` or `report` read there.
            if os.listdir(parent) and is_simrec_folder(parent):
                raise InputError(f"is inside the results folder {parent}: refusing to write into "
                                 f"it; choose a folder outside it", shown)
            break


@contextmanager
def atomic_folder(out: str | Path, report: bool = False,
                  replaces: Callable[[Path], bool] = is_simrec_folder):
    """Yield a temp folder; on success it becomes `out`, on error it is removed.

    With `report`, the plots and report.html are built inside it before the swap, so the
    folder appears complete or not at all. `replaces` says which existing folder may be
    replaced. Write errors (a full disk, a read-only folder) become one InputError."""
    out = Path(out)
    try:
        check_target(out, replaces)
    except InputError:
        if not out.parent.is_dir():
            raise
        with _locked(out.parent):          # another writer may have been mid-swap: look again, steadily
            check_target(out, replaces)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _locked(out.parent):
            clean_stale(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~umask())    # mkdtemp's 0700 would hide the results from others
    except OSError as e:
        raise InputError(f"cannot write here ({e.strerror})", str(out)) from None
    try:
        try:
            yield tmp
            if report:
                build_report(tmp)
            _swap_in(tmp, out, replaces)
        except InputError as e:
            raise _renamed(e, tmp, out) from None
        except OSError as e:
            raise InputError(f"cannot write the results ({e.strerror})", str(out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def build_report(folder: Path) -> list[Path]:
    """The report, with matplotlib's math text off: a `$` in a name is drawn as itself."""
    import matplotlib

    from simrec.reports import build_report as build
    with matplotlib.rc_context({"text.parse_math": False}):
        return build(folder)


def _renamed(e: InputError, tmp: Path, out: Path) -> InputError:
    """An error about a file inside the temp folder names the target instead (the temp
    folder is gone once the error is shown)."""
    def fix(text: str | None) -> str | None:
        return text.replace(str(tmp), str(out)) if text else text
    return InputError(fix(e.message), fix(e.source), e.path, e.line)


def _swap_in(tmp: Path, out: Path, replaces: Callable[[Path], bool]) -> None:
    """Put `tmp` at `out` under the lock, signals held back; the old folder is removed after
    (also when a held-back signal is raised as the block ends)."""
    old = None
    try:
        with _locked(out.parent), _signals_held():
            if not os.path.lexists(out):
                os.replace(tmp, out)
                return
            check_target(out, replaces)        # it may have changed during the run
            if _exchange(tmp, out):
                old = tmp                      # now holds the previous folder
                return
            parked = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, parked / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(parked / out.name, out)     # put the previous folder back
                os.rmdir(parked)
                raise
            old = parked
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(parent: Path) -> None:
    """Remove temp folders of processes that are gone; put back an old folder whose swap
    was cut between its two renames (its target is missing)."""
    for entry in os.scandir(parent):
        m = _LEFT.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or _alive(int(m["pid"])):
            continue
        left, target = Path(entry.path), parent / m["name"]
        if m["kind"] == "old" and (left / m["name"]).is_dir() and not os.path.lexists(target):
            os.replace(left / m["name"], target)
        shutil.rmtree(left, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextmanager
def _locked(folder: Path):
    """An exclusive flock on the folder itself (no lock file is left behind); where the
    file system cannot lock a folder, the swap goes ahead unlocked."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done, then are delivered as usual."""
    got: list[int] = []
    try:
        old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:             # not the main thread: signals go to the main thread anyway
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])


@lru_cache(maxsize=1)
def _renameat2():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (RENAME_EXCHANGE); False where that is not supported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_json_atomic(path: Path, data) -> None:
    """One JSON file, written to a temp name and renamed (for caches read while writing)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise InputError(f"cannot write ({e.strerror})", str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())     # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise InputError(f"cannot write ({e.strerror})", str(path)) from None
        raise
