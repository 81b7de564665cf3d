"""The library entry point: scenario in, Results out. Never prints or touches the disk."""

from __future__ import annotations

from typing import Callable

from .cascade import Prepared, run_replication
from .results import Results, replication_metrics, summarise
from .scenario import Scenario
from .stats import interval


def simulate(scenario: Scenario, progress: Callable[[int, int], None] | None = None,
             adjust: Callable[[Prepared, int], None] | None = None,
             engine: str | None = None) -> Results:
    """Run the scenario's replications and summarise them.

    `adjust(prepared, index)`, if given, may change each replication's runtime objects
    before it runs (e.g. swap a stage's cost model, as `simrec fidelity` does).
    `engine` (simpy | fast | auto) overrides `run.engine` (see cascade.run_replication).

    With `run.p99_halfwidth_rel` set, replications are added one at a time until the
    end-to-end P99's confidence half-width is under that fraction of the P99, or
    `run.max_replications` is reached. `progress(done, planned)` is called after each.

    Each replication's metrics are taken as soon as it finishes; what is kept of it is its
    compact records (the requests table is built from them when asked for).
    """
    run = scenario.run
    reps, per_rep = [], []
    planned = run.replications
    while len(reps) < planned:
        rep = run_replication(scenario, len(reps), adjust, engine)
        reps.append(rep)
        per_rep.append(replication_metrics(scenario, rep))
        if progress is not None:
            progress(len(reps), planned)
        if run.p99_halfwidth_rel is not None:
            p99s = [m["e2e"]["p99_ms"] for m in per_rep]
            if len(reps) == planned and planned < run.max_replications and not _precise(p99s, run):
                planned += 1
    return summarise(scenario, reps, per_rep, engine)


def _precise(p99s: list[float], run) -> bool:
    p99 = interval(p99s)
    if p99["lo"] is None or not p99["mean"]:
        return False
    return (p99["hi"] - p99["lo"]) / 2 <= run.p99_halfwidth_rel * p99["mean"]
