"""Replications of one run on the local process pool against serial, paired.

    python benchmarks/parallel_run.py [--scenario default] [--pairs 5] [--workers N]

Each pair runs `simulate` serially and on the pool back to back (the order alternating), on
the same scenario; the table gives the median wall-time ratio (serial / pool) and the CPU
time of both (this process and its children: the pool's work included). The outputs are
checked byte for byte in tests/test_parallel_run.py; here only their summaries are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--set", action="append", default=["run.replications=4"])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    import simrec
    from simrec.cli import _scenario_arg
    from simrec.simulate import simulate
    sc = simrec.load_scenario(str(_scenario_arg(a.scenario)), a.set)
    ratios, cpu = [], {"serial": [], "local": []}
    for i in range(a.pairs):
        wall, summaries = {}, {}
        for ex in (("serial", "local") if i % 2 == 0 else ("local", "serial")):
            c0, t0 = cpu_s(), time.perf_counter()
            r = simulate(sc, executor=ex, workers=a.workers)
            wall[ex] = time.perf_counter() - t0
            cpu[ex].append(cpu_s() - c0)
            summaries[ex] = json.dumps(r.summary, sort_keys=True, default=str)
        if summaries["serial"] != summaries["local"]:
            raise SystemExit("pool and serial summaries differ")
        ratios.append(wall["serial"] / wall["local"])
    print(f"{a.scenario} {' '.join(a.set)}: {a.pairs} pairs, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"wall serial / pool: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"CPU s per run: serial median {statistics.median(cpu['serial']):.2f}, pool median "
          f"{statistics.median(cpu['local']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
