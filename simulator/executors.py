"""Run many scenarios: serially, on a local process pool (default), or on Ray.

Work items are scenario dicts (validated JSON form), results are summary dicts, so
everything crossing a process boundary is plain data. Finished points are cached on disk
by a hash of the scenario (seed included) and the cost tables it uses, so an interrupted
sweep resumes and a repeated one is free.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    """Hash of the scenario (seed included), the simrec version and its tables' contents."""
    from .results import VERSION, table_hashes
    blob = json.dumps({"scenario": scenario_data, "version": VERSION,
                       "tables": table_hashes(scenario_data)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_points(points: list[dict], executor: str = "local", workers: int | None = None,
               cache_dir: Path | None = None, ray_address: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Summaries for the given scenario dicts, in order; cached ones are not recomputed."""
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor {executor!r} (choose {', '.join(EXECUTORS)})", "--executor")
    keys = [point_key(p) for p in points]
    results: list[dict | None] = [None] * len(points)
    todo = []
    for i, key in enumerate(keys):
        cached = cache_dir / f"{key}.json" if cache_dir else None
        if cached is not None and cached.exists():
            results[i] = json.loads(cached.read_text())
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

    if executor == "serial" or len(todo) <= 1:
        for i in todo:
            finish(i, summary_of(points[i]))
    elif executor == "local":
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            futures = {pool.submit(summary_of, points[i]): i for i in todo}
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
    else:
        _run_ray(points, todo, finish, ray_address)
    return results


def _run_ray(points, todo, finish, address):
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
        remote = ray.remote(summary_of)
        refs = {remote.remote(points[i]): i for i in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                finish(refs[ref], ray.get(ref))
    finally:
        if started:
            ray.shutdown()
