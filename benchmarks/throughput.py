"""Simulated requests per CPU second: the fast engine, the SimPy engine and a bare SimPy tandem.

All three run in this process, side by side, in alternating order, each repeat cold: the
runtime objects (cost models and their lookup memos, routers, streams) are built anew, so
no lookup is served from an earlier run (a parsed cost table is kept, as in any process
that runs more than one simulation; --reload-tables parses it again every time). Rates are
CPU time (time.process_time), medians over the repeats, and the ratios are of those medians.

The bare tandem is the cheapest honest SimPy model of the same system: one process per
request, one `simpy.Resource(capacity=c)` per stage, the same arrival times and the same
service-time objects (so table interpolation costs the same on both sides). It records
nothing. `--tandem-routed` adds a bare tandem with least-loaded routing to per-node
resources (a scan of the nodes per request, as SimPy users would write it).

    python benchmarks/throughput.py [--repeats 5] [--scenario scenarios/default.yaml]
    python benchmarks/throughput.py --scenario scenarios/relay.yaml --set run.duration_s=10
    python benchmarks/throughput.py --scenario scenarios/helm.yaml --set run.duration_s=20 --no-tandem
"""

from __future__ import annotations

import argparse
import statistics
import time

import simpy

import simrec
from simrec.calibration.table import load_table
from simrec.cascade import prepare, run_replication


def bare_tandem(scenario: simrec.Scenario) -> int:
    """One shared Resource per stage (capacity = its nodes): the M/M/c tandem in bare SimPy."""
    return _bare(scenario, lambda env, s: [simpy.Resource(env, capacity=len(s.nodes))])


def bare_tandem_routed(scenario: simrec.Scenario) -> int:
    """Per-node Resources, least-loaded routing by a scan of the stage's nodes."""
    return _bare(scenario, lambda env, s: [simpy.Resource(env, capacity=1) for _ in s.nodes])


def _bare(scenario: simrec.Scenario, resources) -> int:
    """The scenario's stages as bare SimPy Resources (`resources(env, stage)` per stage; with
    several, the least loaded is taken), costed by simrec's own service models."""
    prep = prepare(scenario, 0)
    reqs, stages = prep.requests, prep.stages
    env = simpy.Environment()
    pools = [resources(env, s) for s in stages]
    samplers = [(s.service.sample, s.candidates, s.hop_ms) for s in stages]

    def request(env, L, M):
        for nodes, (sample, cand, hop) in zip(pools, samplers):
            res = nodes[0] if len(nodes) == 1 else min(nodes, key=lambda r: r.count + len(r.queue))
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


def cpu_rate(fn, reload_tables: bool = False) -> float:
    if reload_tables:
        load_table.cache_clear()
    t0 = time.process_time()
    n = fn()
    return n / (time.process_time() - t0)


def engine(name):
    def run(sc):
        rep = run_replication(sc, 0, engine=name)
        if rep.engine != name:
            raise SystemExit(f"the {name} engine declined this scenario: {rep.engine_note}")
        return len(rep.requests)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="scenarios/default.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-tandem", action="store_true", help="skip the bare tandems (relay, HBM)")
    ap.add_argument("--tandem-routed", action="store_true")
    ap.add_argument("--reload-tables", action="store_true", help="parse cost tables in every run")
    args = ap.parse_args()
    sc = simrec.load_scenario(args.scenario, ["run.replications=1", *args.set])
    runs = {"fast engine": engine("fast"), "SimPy engine": engine("simpy")}
    if not args.no_tandem:
        runs["bare SimPy tandem"] = bare_tandem
        if args.tandem_routed:
            runs["bare tandem, least-loaded"] = bare_tandem_routed
    rates: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for k in names:                           # untimed: imports, the tables' first parse
        runs[k](sc)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]      # alternate who goes first
        for k in order:
            rates[k].append(cpu_rate(lambda: runs[k](sc), args.reload_tables))
    n = len(prepare(sc, 0).requests)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"scenario: {args.scenario} {' '.join(args.set)}, {n} requests per run, "
          f"{args.repeats} alternating cold repeats, CPU time")
    for k, v in rates.items():
        print(f"  {k:<26}: median {med[k]:>9,.0f} req/s   (all: {', '.join(f'{x:,.0f}' for x in v)})")
    base = med.get("bare SimPy tandem")
    print(f"  fast / SimPy engine       : {med['fast engine'] / med['SimPy engine']:.2f}")
    if base:
        print(f"  fast / bare tandem        : {med['fast engine'] / base:.2f}")
        print(f"  SimPy engine / bare tandem: {med['SimPy engine'] / base:.2f}")


if __name__ == "__main__":
    main()
