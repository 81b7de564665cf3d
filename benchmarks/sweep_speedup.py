"""Parallel speed-up of a sweep: the same 20 points serially and on the local process pool.

Both runs happen in this process one after the other, with no point cache, and the
results are checked to be identical. Reports wall times and their ratio.

    python benchmarks/sweep_speedup.py [--points 20] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import time

import simrec
from simrec.executors import run_points
from simrec.loader import with_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    base = simrec.load_scenario("scenarios/default.yaml", ["run.duration_s=4", "run.replications=2"])
    points = [with_overrides(base, {"workload.rate_qps": 500.0 + 50 * i}).model_dump(mode="json")
              for i in range(args.points)]
    t0 = time.perf_counter()
    serial = run_points(points, "serial")
    t1 = time.perf_counter()
    pooled = run_points(points, "local", workers=args.workers)
    t2 = time.perf_counter()
    assert [s["metrics"] for s in serial] == [p["metrics"] for p in pooled]
    print(f"{args.points} points, {os.cpu_count()} cores: serial {t1 - t0:.1f} s, "
          f"process pool {t2 - t1:.1f} s, speed-up {(t1 - t0) / (t2 - t1):.2f}x (results identical)")


if __name__ == "__main__":
    main()
