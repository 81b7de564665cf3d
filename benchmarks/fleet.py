"""Fleet scale: 1,000 ranking instances at 100k QPS for 60 s of simulated time, affinity
routing, sharded over 2 workers (`simrec run --shards 2`), on the local process pool and
on a local Ray instance.

The fleet: retrieval as an infinite-server (`delay`) stage, 3 ms lognormal; ranking on
1,000 H100 instances routed by user hash (`affinity`, 64 virtual nodes), 5 ms lognormal
service (50% mean utilisation at 100 QPS each); 1M users, Zipf 0.5 (so no user alone
overloads its instance); 2 replications (the fewest that give a CI). `--scale f` keeps the
per-instance load and multiplies instances and QPS by f (a smaller fleet of the same
shape); `--duration` shortens the simulated time.

Each run is the CLI in a fresh process (no report). Measured: wall time, and peak RSS as
the largest sum over the process tree (the CLI, its pool workers or Ray's processes),
polled every 0.2 s, beside the largest single process.

    python benchmarks/fleet.py [--scale 1] [--duration 60] [--executors local,ray] [--unsharded]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml


def scenario(scale: float, duration_s: float) -> dict:
    nodes = max(2, round(1000 * scale))
    return {"name": f"fleet-{nodes}",
            "description": "Affinity-routed ranking fleet for the sharding benchmark.",
            "workload": {"rate_qps": 100.0 * nodes, "arrivals": {"kind": "poisson"},
                         "users": {"count": 1_000_000, "zipf_s": 0.5},
                         "candidates": {"kind": "constant", "value": 256}},
            "stages": {"retrieval": {"nodes": {"count": 8, "device": "cpu"}, "router": "delay",
                                     "service": {"kind": "lognormal", "mean_ms": 3.0, "cv": 0.5},
                                     "hop_ms": 0.3},
                       "ranking": {"nodes": {"count": nodes, "device": "h100"}, "router": "affinity",
                                   "service": {"kind": "lognormal", "mean_ms": 5.0, "cv": 0.5}}},
            "slo": {"p99_ms": 60},
            "run": {"duration_s": duration_s, "replications": 2, "seed": 1}}


def tree_rss(root: int) -> tuple[int, int]:
    """(sum, max) of resident bytes over a process and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    todo, seen = [root], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    vals = [rss.get(p, 0) for p in seen]
    return sum(vals), max(vals)


def timed(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_sum = peak_max = 0
    while proc.poll() is None:
        s, m = tree_rss(proc.pid)
        peak_sum, peak_max = max(peak_sum, s), max(peak_max, m)
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip()[-600:]}")
    return {"wall_s": wall, "peak_tree_rss_mb": peak_sum / 2**20, "peak_process_rss_mb": peak_max / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--unsharded", action="store_true", help="also run it unsharded (one process)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.yaml"
        sc = scenario(args.scale, args.duration)
        path.write_text(yaml.safe_dump(sc, sort_keys=False))
        nodes, rate = sc["stages"]["ranking"]["nodes"]["count"], sc["workload"]["rate_qps"]
        print(f"{nodes} ranking instances, {rate:,.0f} QPS, {args.duration:g} s simulated, "
              f"2 replications, {os.cpu_count()} cores", flush=True)
        runs = [(ex, ["--shards", "2", "--executor", ex, "--workers", "2"]) for ex in args.executors.split(",")]
        if args.unsharded:
            runs.append(("unsharded", []))
        for name, extra in runs:
            out = Path(tmp) / name
            r = timed(["simrec", "run", str(path), "--no-report", "--out", str(out), *extra])
            s = json.loads((out / "summary.json").read_text())
            m = s["metrics"]
            created = s["requests"]["created"]
            print(f"{name:9s}: {r['wall_s']:7.1f} s wall, peak RSS {r['peak_tree_rss_mb']:7.0f} MB "
                  f"(process tree; largest process {r['peak_process_rss_mb']:.0f} MB), "
                  f"{created:,} requests ({created / r['wall_s']:,.0f}/s wall), "
                  f"e2e P99 {m['e2e']['p99_ms']['mean']:.2f} ms [{m['e2e']['p99_ms']['lo']:.2f}, "
                  f"{m['e2e']['p99_ms']['hi']:.2f}], ranking util {m['utilisation']['ranking']['stage']['mean']:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
