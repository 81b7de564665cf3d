"""Simulated requests per wall-clock second: simrec vs a bare SimPy tandem.

The bare tandem is the cheapest honest SimPy model of the same system: one process per
request, one `simpy.Resource(capacity=c)` per stage, the same arrival times and the same
service-time objects (so table interpolation costs the same on both sides). It records
nothing. Both run in this process, alternating, and medians over repeats are reported.

    python benchmarks/throughput.py [--repeats 5] [--scenario scenarios/default.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time

import simpy

import simrec
from simrec.cascade import prepare, run_replication


def bare_tandem(scenario: simrec.Scenario) -> int:
    prep = prepare(scenario, 0)
    reqs, stages = prep.requests, prep.stages
    env = simpy.Environment()
    resources = [simpy.Resource(env, capacity=len(s.nodes)) for s in stages]
    samplers = [(s.service.sample, s.candidates, s.hop_ms) for s in stages]

    def request(env, L, M):
        for res, (sample, cand, hop) in zip(resources, samplers):
            with res.request() as req:
                yield req
                yield env.timeout(sample(L, cand or M))
            if hop:
                yield env.timeout(hop)

    def source(env):
        for t, L, M in zip(reqs.arrival_ms.tolist(), reqs.history_len.tolist(), reqs.candidates.tolist()):
            if t > env.now:
                yield env.timeout(t - env.now)
            env.process(request(env, L, M))

    env.process(source(env))
    env.run()
    return len(reqs)


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="scenarios/default.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sc = simrec.load_scenario(args.scenario, ["run.replications=1"])
    ours, bare = [], []
    for _ in range(args.repeats):
        dt, n = timed(lambda: len(run_replication(sc, 0).requests))
        ours.append(n / dt)
        dt, n = timed(lambda: bare_tandem(sc))
        bare.append(n / dt)
    mo, mb = statistics.median(ours), statistics.median(bare)
    print(f"scenario: {args.scenario}, {n} requests per run, {args.repeats} alternating repeats")
    print(f"simrec run_replication : median {mo:,.0f} simulated req/s  (all: {', '.join(f'{x:,.0f}' for x in ours)})")
    print(f"bare SimPy tandem      : median {mb:,.0f} simulated req/s  (all: {', '.join(f'{x:,.0f}' for x in bare)})")
    print(f"ratio simrec / bare    : {mo / mb:.2f}")


if __name__ == "__main__":
    main()
