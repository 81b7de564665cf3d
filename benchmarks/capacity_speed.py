"""Wall time of `simrec capacity scenarios/default.yaml --param workload.rate_qps`: serial
rounds against the local process pool, side by side.

Each repeat runs the CLI twice in fresh processes, alternating which goes first: once
with `--executor serial`, once with `--executor local` (the default), each with its own
empty point cache and results folder (cold: nothing is answered from a cache). Both use
the same rounds of candidates, so their capacity.json files must be byte-identical; that
is checked. Reports the median wall and CPU time of each and their ratio.

    python benchmarks/capacity_speed.py [--repeats 5] [--workers N] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "default.yaml"


def timed(executor: str, workers: int | None, report: bool) -> tuple[float, float, bytes, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["simrec", "capacity", str(SCENARIO), "--param", "workload.rate_qps",
               "--executor", executor, "--out", f"{tmp}/out", "--cache", f"{tmp}/cache"]
        cmd += [] if report else ["--no-report"]
        cmd += ["--workers", str(workers)] if workers and executor == "local" else []
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()[-400:]}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        data = (Path(tmp) / "out" / "capacity.json").read_bytes()
        return wall, cpu, data, json.loads(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--report", action="store_true", help="draw the report too (the CLI's default)")
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"serial": [], "local": []}
    outputs = set()
    for r in range(args.repeats):
        for ex in (("serial", "local") if r % 2 == 0 else ("local", "serial")):
            wall, cpu, data, cap = timed(ex, args.workers, args.report)
            runs[ex].append((wall, cpu))
            outputs.add(data)
            print(f"repeat {r + 1} {ex:6s}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, "
                  f"{cap['evaluations']} simulations, bracket {cap['bracket']}", flush=True)
    assert len(outputs) == 1, "serial and pooled capacity.json differ"
    med = {ex: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for ex, v in runs.items()}
    print(f"\n{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}, "
          f"{args.repeats} alternating repeats (medians), capacity.json byte-identical:")
    print(f"  serial rounds : {med['serial'][0]:6.1f} s wall  {med['serial'][1]:6.1f} s CPU")
    print(f"  process pool  : {med['local'][0]:6.1f} s wall  {med['local'][1]:6.1f} s CPU")
    print(f"  speed-up      : {med['serial'][0] / med['local'][0]:.2f}x wall")


if __name__ == "__main__":
    main()
