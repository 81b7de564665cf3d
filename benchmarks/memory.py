"""Peak memory of a large run: `simrec run` of the default scenario for N requests.

Runs the CLI under /usr/bin/time -v (a fresh process, no report: the plots would read the
whole requests.parquet back) and reports its peak RSS, wall time and CPU time, then the
bytes per request beyond a 1-second run of the same scenario (imports, tables, workload).
The default scenario has 5 replications at 1,500 QPS, so N requests take N / 7,500 s of
simulated time per replication.

    python benchmarks/memory.py [--requests 10000000] [--engine auto|simpy|fast] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "default.yaml"


def timed_run(duration_s: float, out: Path, engine: str | None) -> dict:
    sets = ["--set", f"run.duration_s={duration_s:g}"]
    if engine:
        sets += ["--set", f"run.engine={engine}"]
    p = subprocess.run(["/usr/bin/time", "-v", "simrec", "run", str(SCENARIO), *sets, "--out", str(out),
                        "--no-report"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    err = p.stderr

    def field(name):
        return re.search(rf"{re.escape(name)}: (.+)", err).group(1).strip()
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(x) for x in wall.split(":")]
    wall_s = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
    return {"peak_rss_bytes": int(field("Maximum resident set size (kbytes)")) * 1024, "wall_s": wall_s,
            "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000_000)
    ap.add_argument("--engine", default=None, help="set run.engine (needs the scenario field)")
    ap.add_argument("--keep", default=None, help="keep the results folder here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="simrec-memory-"))
    try:
        base = timed_run(1.0, tmp / "base", args.engine)
        duration = args.requests / (5 * 1500.0)
        out = Path(args.keep) if args.keep else tmp / "big"
        big = timed_run(duration, out, args.engine)
        import pyarrow.parquet as pq
        n = pq.ParquetFile(out / "requests.parquet").metadata.num_rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gib = 2 ** 30
    print(f"simrec run {SCENARIO.name} --set run.duration_s={duration:g}: {n:,} requests")
    print(f"  peak RSS {big['peak_rss_bytes'] / gib:.2f} GiB ({big['peak_rss_bytes'] / 1e9:.2f} GB), "
          f"wall {big['wall_s']:.0f} s, CPU {big['cpu_s']:.0f} s")
    print(f"  a 1 s run: peak RSS {base['peak_rss_bytes'] / 1e9:.2f} GB; beyond it "
          f"{(big['peak_rss_bytes'] - base['peak_rss_bytes']) / n:.0f} bytes per request")


if __name__ == "__main__":
    main()
