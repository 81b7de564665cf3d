"""`simrec run` with its replications on the local process pool against serial, paired.

    python benchmarks/parallel_run.py [--scenario default] [--set run.replications=4] [--pairs 5]

Each pair runs `simrec run ... --executor serial` and `--executor local` back to back (the
order alternating), each in a fresh process (cold: no table, memo or bytecode carried from
the other run beyond the file cache), into its own folder. The table gives the median
wall-time ratio (serial / pool) and the CPU time of both (user + system of the command and
the pool's workers). Each pair's requests.parquet must match byte for byte.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCH = "import sys; sys.argv[0] = 'simrec'; from simrec.cli import main; main()"


def run(args: list[str], out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one `simrec run` in its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCH, "run", *args, "--no-report", "--out", str(out)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"simrec run failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--set", action="append", default=None, help="default: run.replications=4")
    ap.add_argument("--pairs", type=int, default=5)
    a = ap.parse_args(argv)
    args = [a.scenario] + [x for s in (a.set or ["run.replications=4"]) for x in ("--set", s)]
    ratios, cpu = [], {"serial": [], "local": []}
    with tempfile.TemporaryDirectory(prefix="simrec-parallel-") as tmp:
        for i in range(a.pairs):
            wall, files = {}, {}
            for ex in (("serial", "local") if i % 2 == 0 else ("local", "serial")):
                out = Path(tmp) / f"{i}-{ex}"
                wall[ex], c = run([*args, "--executor", ex], out)
                cpu[ex].append(c)
                files[ex] = (out / "requests.parquet").read_bytes()
            if files["serial"] != files["local"]:
                raise SystemExit("pool and serial requests.parquet differ")
            ratios.append(wall["serial"] / wall["local"])
    print(f"simrec run {' '.join(args)}: {a.pairs} pairs, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"wall serial / pool: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"CPU s per run: serial median {statistics.median(cpu['serial']):.2f}, pool median "
          f"{statistics.median(cpu['local']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
