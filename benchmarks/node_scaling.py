"""Node scaling: simulated requests per CPU second and bytes per request at 8 .. 4,096 nodes.

The default cascade with every stage's node count set to N and the arrival rate scaled
with N (1,500 QPS per 8 nodes), so utilisation stays fixed; the simulated duration is
fixed too (but a small pool's run is lengthened to --min-requests, so that fixed costs
such as the user population do not dominate it), so a run holds about N/8 x the requests
of the 8-node run and the time series (one row per node and sample instant) grows like
the requests. Per point:

- requests/s of the fast engine (and of the SimPy engine up to --simpy-max nodes), CPU
  time, medians over --repeats cold repeats, alternating;
- bytes per request: the peak RSS growth of one replication in a fresh process (records,
  the engine's working arrays, the time series), divided by its requests.

    python benchmarks/node_scaling.py [--nodes 8 64 512 4096] [--duration-s 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import simrec
from simrec.cascade import run_replication
from simrec.loader import with_overrides

BASE_NODES, BASE_QPS = 8, 1500.0


def scenario(nodes: int, duration_s: float, min_requests: int = 0) -> simrec.Scenario:
    sc = simrec.load_scenario("scenarios/default.yaml", ["run.replications=1"])
    rate = BASE_QPS * nodes / BASE_NODES
    over = {f"stages.{name}.nodes.count": nodes for name in sc.stages}
    over["workload.rate_qps"] = rate
    over["run.duration_s"] = max(duration_s, min_requests / rate)
    return with_overrides(sc, over)


def rate(sc, engine: str) -> tuple[float, int]:
    t0 = time.process_time()
    rep = run_replication(sc, 0, engine=engine)
    dt = time.process_time() - t0
    if rep.engine != engine:
        raise SystemExit(f"{engine} declined: {rep.engine_note}")
    return len(rep.requests) / dt, len(rep.requests)


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4      # resident pages of 4 KiB


def memory_point(nodes: int, duration_s: float, engine: str, min_requests: int) -> dict:
    """In this (fresh) process: peak RSS growth of one replication per request."""
    import resource
    sc = scenario(nodes, duration_s, min_requests)
    from simrec.cascade import prepare
    prepare(sc, 0)                               # imports, tables
    before = rss_kib()
    rep = run_replication(sc, 0, engine=engine)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = len(rep.requests)
    return {"requests": n, "peak_growth_bytes": (peak - before) * 1024,
            "bytes_per_request": (peak - before) * 1024 / n, "records_bytes_per_request": rep.nbytes / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 64, 512, 4096])
    ap.add_argument("--duration-s", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-requests", type=int, default=20_000,
                    help="lengthen a small pool's run to this many requests (fixed costs aside)")
    ap.add_argument("--simpy-max", type=int, default=512, help="largest N the SimPy engine is timed at")
    ap.add_argument("--memory-point", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_point:
        n, d, e, m = args.memory_point
        print(json.dumps(memory_point(int(n), float(d), e, int(m))))
        return
    rows = []
    for nodes in args.nodes:
        sc = scenario(nodes, args.duration_s, args.min_requests)
        engines = ["fast"] + (["simpy"] if nodes <= args.simpy_max else [])
        for e in engines:
            rate(sc, e)                          # untimed warm-up
        rates = {e: [] for e in engines}
        for r in range(args.repeats):
            for e in (engines if r % 2 == 0 else engines[::-1]):
                x, n = rate(sc, e)
                rates[e].append(x)
        mem = {}
        for e in engines:
            out = subprocess.run([sys.executable, __file__, "--memory-point", str(nodes),
                                  str(args.duration_s), e, str(args.min_requests)],
                                 capture_output=True, text=True, check=True)
            mem[e] = json.loads(out.stdout)
        rows.append((nodes, n, {e: statistics.median(v) for e, v in rates.items()}, mem))
        r = rows[-1]
        print(f"N={nodes:>5}: {n:>9,} requests; fast {r[2]['fast']:>8,.0f} req/s, "
              f"{mem['fast']['bytes_per_request']:>6.0f} B/req (records {mem['fast']['records_bytes_per_request']:.0f})"
              + (f"; SimPy {r[2]['simpy']:>7,.0f} req/s, {mem['simpy']['bytes_per_request']:>6.0f} B/req"
                 if "simpy" in r[2] else ""), flush=True)
    first = rows[0]
    print(f"\nrelative to N={first[0]} (fast engine):")
    for nodes, n, med, mem in rows:
        print(f"  N={nodes:>5}: requests/s x{med['fast'] / first[2]['fast']:.2f}, "
              f"bytes/request x{mem['fast']['bytes_per_request'] / first[3]['fast']['bytes_per_request']:.2f}")


if __name__ == "__main__":
    main()
