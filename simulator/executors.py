"""Run many scenarios: serially, on a local process pool (default), or on Ray.

`execute` is the one way work reaches those executors (sweep points, capacity rounds,
fleet shards); `kept_pool` keeps one local pool across several calls (a capacity search's
rounds), so its workers start once and keep what they loaded.

Work items are scenario dicts (validated JSON form), results are summary dicts, so
everything crossing a process boundary is plain data. Finished points are cached on disk
by a key over everything that can change a result: the scenario (seed included), the
bytes of every file it references (trace, cost tables, roofline `fit_from` tables, serving
profiles) and the simrec source itself, so an interrupted sweep resumes, a repeated one is
free, and an edited input or a new commit is never answered from the cache. A cache
entry that cannot be read (a truncated write) is recomputed.

Pool workers ignore SIGINT (the parent handles it and stops them) and get SIGKILL when the
parent dies, so a killed sweep leaves no orphan holding the terminal.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .errors import InputError
from .folders import write_json_atomic

EXECUTORS = ("local", "serial", "ray")


def summary_of(scenario_data: dict) -> dict:
    """Simulate one scenario given as data; returns its summary (runs in workers)."""
    from .loader import validate
    from .simulate import simulate
    return simulate(validate(scenario_data, "<point>")).summary


def point_key(scenario_data: dict) -> str:
    """Hash of the scenario (seed included), the simrec version and source, and the bytes
    of every file the scenario references."""
    from .results import VERSION
    blob = json.dumps({"scenario": scenario_data, "version": VERSION, "source": source_hash(),
                       "files": input_hashes(scenario_data)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def source_hash() -> str:
    """The simrec and simrec.calibration .py files (the version string is the same on every
    commit, the code is not)."""
    import simrec.calibration
    return hash_sources(tuple(dict.fromkeys([Path(__file__).parent,
                                             *map(Path, simrec.calibration.__path__)])))


@lru_cache(maxsize=4)
def hash_sources(folders: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def input_files(scenario_data: dict) -> dict[str, Path]:
    """Field path -> file, for every file a scenario (as data) reads."""
    from simrec.calibration.table import resolve
    files: dict[str, Path] = {}
    arrivals = scenario_data["workload"]["arrivals"]
    if arrivals.get("kind") == "trace":
        files["workload.arrivals.path"] = Path(arrivals["path"])
    for name, stage in scenario_data["stages"].items():
        service = stage["service"]
        for key in ("table", "fit_from"):
            if service.get(key):
                manifest = resolve(service[key])
                files[f"stages.{name}.service.{key}"] = manifest
                table_file = _manifest_field(manifest, "table_file")
                if isinstance(table_file, str):
                    files[f"stages.{name}.service.{key}.table_file"] = manifest.parent / table_file
        if service.get("profile"):
            files[f"stages.{name}.service.profile"] = Path(service["profile"])
        if service.get("kind") == "kernels":          # kernel tables (and their phase tables)
            for i, ref in enumerate([service["table"], *service.get("overhead_from", ())]):
                folder = resolve(ref).parent
                for f in ("kernels.parquet", "table.parquet"):
                    if (folder / f).exists():
                        files[f"stages.{name}.service.kernels.{i}.{f}"] = folder / f
    return files


def input_hashes(scenario_data: dict) -> dict[str, str]:
    return {k: file_hash(str(p)) for k, p in input_files(scenario_data).items()}


def file_hash(path: str) -> str:
    """sha256 of a file's bytes ('missing' if it cannot be read), memoised per version."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return "missing"
    return _hash(path, st.st_mtime_ns, st.st_size) if os.path.isfile(path) else "not a file"


@lru_cache(maxsize=256)
def _hash(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "unreadable"
    return h.hexdigest()


def _manifest_field(manifest: Path, key: str):
    try:
        data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def run_points(points: list[dict], executor: str = "local", workers: int | None = None,
               cache_dir: Path | None = None, ray_address: str | None = None,
               progress: Callable[[int, int], None] | None = None,
               refresh: bool = False) -> list[dict]:
    """Summaries for the given scenario dicts, in order; cached ones are not recomputed
    (with `refresh`, all are, and the cache is rewritten)."""
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor {executor!r} (choose {', '.join(EXECUTORS)})", "--executor")
    if workers is not None and not 1 <= workers <= 4096:
        raise InputError(f"must be between 1 and 4096 (got {workers})", "--workers")
    if cache_dir is not None and os.path.lexists(cache_dir) and not Path(cache_dir).is_dir():
        raise InputError("the point cache must be a folder (this is a file)", str(cache_dir))
    keys = [point_key(p) for p in points]
    results: list[dict | None] = [None] * len(points)
    todo = []
    for i, key in enumerate(keys):
        cached = None if refresh or cache_dir is None else _cached(Path(cache_dir) / f"{key}.json")
        if cached is not None:
            results[i] = cached
        else:
            todo.append(i)
    done = len(points) - len(todo)
    if progress:
        progress(done, len(points))

    def finish(i: int, summary: dict) -> None:
        nonlocal done
        results[i] = summary
        if cache_dir is not None:
            write_json_atomic(cache_dir / f"{keys[i]}.json", summary)
        done += 1
        if progress:
            progress(done, len(points))

    execute(summary_of, points, todo, finish, executor, workers, ray_address)
    return results


def execute(fn: Callable, items: list, todo: list[int], finish: Callable[[int, object], None],
            executor: str = "local", workers: int | None = None,
            ray_address: str | None = None) -> None:
    """Run fn(items[i]) for each i in todo on the executor, calling finish(i, result) as
    each ends (in completion order); the one pool and Ray path for sweeps, capacity rounds
    and shards. `fn` must be a module-level function and items plain data (they are pickled)."""
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor {executor!r} (choose {', '.join(EXECUTORS)})", "--executor")
    if executor == "serial" or len(todo) <= 1:
        for i in todo:
            finish(i, fn(items[i]))
    elif executor == "local":
        pool = _kept or ProcessPoolExecutor(max_workers=min(workers or os.cpu_count() or 1, len(todo)),
                                            initializer=_worker_start)
        try:
            futures = {pool.submit(fn, items[i]): i for i in todo}
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
        except BaseException:
            _stop(pool)
            raise
        if pool is not _kept:
            pool.shutdown()
    else:
        _run_ray(fn, items, todo, finish, ray_address)


_kept: ProcessPoolExecutor | None = None


@contextmanager
def kept_pool(executor: str, workers: int | None = None):
    """Within this block, local-executor calls share one pool: for a capacity search's
    rounds, whose workers then start once and keep what they loaded (lazy imports, cost
    tables), as the serial executor's one process does."""
    global _kept
    if executor != "local" or _kept is not None:
        yield
        return
    _kept = ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, initializer=_worker_start)
    try:
        yield
    finally:
        pool, _kept = _kept, None
        pool.shutdown(cancel_futures=True)


def _cached(path: Path) -> dict | None:
    """A cached summary, or None if it is missing or unreadable (then it is recomputed)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "metrics" in data else None


def _worker_start() -> None:
    """In each pool worker: leave Ctrl-C to the parent, end quietly on SIGTERM (not with the
    CLI's handler it inherited), and die with the parent (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:          # the parent died before prctl took effect
        os._exit(1)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel queued points and terminate running workers (shutdown() would wait for them)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(timeout=5)


def _run_ray(fn, points, todo, finish, address):
    try:
        import ray
    except ImportError:
        raise InputError("the ray executor needs the [ray] extra: pip install 'simrec[ray]'",
                         "--executor") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        remote = ray.remote(fn)
        refs = {remote.remote(points[i]): i for i in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                finish(refs[ref], ray.get(ref))
    finally:
        if started:
            ray.shutdown()
