"""Coverage of the pooled P99's 95% interval against the exact M/M/c value, over seeds.

    python benchmarks/p99_coverage.py C LAMBDA REQUESTS REPLICATIONS [--seeds 40]
        [--halfwidth 0.1 --max-replications 30]

M/M/C with 10 ms mean service at LAMBDA req/s, REQUESTS per replication (10% warm-up). Per
seed: is the exact P99 inside the interval, did the run warn that its replications are short
for the P99 (results.short_replication_warning), and its length in latency autocorrelation
times (summary.replication_length). Prints covered / warned / misses the run did not warn of.
The same systems are checked in tests/test_theory.py; this script runs any other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("servers", type=int)
    ap.add_argument("rate", type=float)
    ap.add_argument("requests", type=int)
    ap.add_argument("replications", type=int)
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--halfwidth", type=float, default=None, help="run.p99_halfwidth_rel (the stopping rule)")
    ap.add_argument("--max-replications", type=int, default=40)
    a = ap.parse_args(argv)
    import simrec
    from conftest import scenario, station
    from simrec.results import short_replication_warning
    from test_theory import mmc_sojourn_percentile
    exact = mmc_sojourn_percentile(a.servers, a.rate, 100.0, 99)
    rule = {} if a.halfwidth is None else {"p99_halfwidth_rel": a.halfwidth, "max_replications": a.max_replications}
    covered = warned = silent = 0
    times, reps = [], []
    for seed in range(2000, 2000 + a.seeds):
        res = simrec.simulate(scenario({"q": station(a.servers)}, a.rate, requests=a.requests,
                                       replications=a.replications, seed=seed, **rule))
        m = res.metric("e2e", "p99_ms")
        ok = m["hi"] is not None and m["lo"] <= exact <= m["hi"]
        short = short_replication_warning(res.summary["replication_length"]) is not None
        covered, warned, silent = covered + ok, warned + short, silent + (not ok and not short)
        length = res.summary["replication_length"] or {}
        times.append(length.get("autocorrelation_times", float("nan")))
        reps.append(res.summary["replications"])
    print(f"M/M/{a.servers} at {a.rate:g}/s, {a.requests} requests x {a.replications} replications"
          f"{f', stopping rule {a.halfwidth:g} (replications median {statistics.median(reps):g})' if rule else ''}: "
          f"exact P99 {exact:.2f} ms covered {covered}/{a.seeds}, warned {warned}, unwarned misses {silent}; "
          f"autocorrelation times per replication median {statistics.median(times):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
