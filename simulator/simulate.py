"""The library entry point: scenario in, Results out. Never prints or touches the disk."""

from __future__ import annotations

from typing import Callable

from .cascade import Prepared, run_replication
from .progress import board_slot
from .results import Results, measured_latency, replication_metrics, summarise
from .scenario import Scenario
from .stats import pooled_percentile


def simulate(scenario: Scenario, progress: Callable[[int, int], None] | None = None,
             adjust: Callable[[Prepared, int], None] | None = None,
             engine: str | None = None) -> Results:
    """Run the scenario's replications and summarise them.

    `adjust(prepared, index)`, if given, may change each replication's runtime objects
    before it runs (e.g. swap a stage's cost model, as `simrec fidelity` does).
    `engine` (simpy | fast | auto) overrides `run.engine` (see cascade.run_replication).

    With `run.p99_halfwidth_rel` set, replications are added one at a time until the
    end-to-end P99's confidence half-width is under that fraction of the P99, or
    `run.max_replications` is reached. `progress(done, planned)` is called as each
    replication's simulated time passes each 2% of its span (`done` a float: replications
    done, the running one's share included, below the next whole number) and after each
    (`done` whole; the last one once the summary is made). Without it, a progress board
    installed by the caller (simrec.progress, for pool workers) hears it.

    Each replication's metrics are taken as soon as it finishes; what is kept of it is its
    compact records (the requests table is built from them when asked for).
    """
    if progress is None:
        with board_slot() as slot:
            return _simulate(scenario, slot, adjust, engine)
    return _simulate(scenario, progress, adjust, engine)


# A replication's arrivals count for this share of it; the whole number comes once its
# records are summarised (the drain, its metrics and, for the last, the summary take time too).
SIMULATED_SHARE = 0.99


def _simulate(scenario: Scenario, progress, adjust, engine) -> Results:
    run = scenario.run
    reps, per_rep, latency = [], [], []
    planned = run.replications
    while len(reps) < planned:
        within = None
        if progress is not None:
            within = lambda f, done=len(reps), planned=planned: progress(  # noqa: E731
                done + SIMULATED_SHARE * f, planned)
        rep = run_replication(scenario, len(reps), adjust, engine, within)
        reps.append(rep)
        per_rep.append(replication_metrics(scenario, rep))
        if run.p99_halfwidth_rel is not None:
            latency.append(measured_latency(scenario, rep))      # the pooled P99, as summarised
            if len(reps) == planned and planned < run.max_replications and not _precise(latency, run):
                planned += 1
        if progress is not None and len(reps) < planned:
            progress(len(reps), planned)
    results = summarise(scenario, reps, per_rep, engine)
    if progress is not None:
        progress(len(reps), planned)
    return results


def _precise(latency: list, run) -> bool:
    p99 = pooled_percentile(latency, 99.0)
    if p99["lo"] is None or p99["hi"] is None or not p99["mean"]:
        return False
    return (p99["hi"] - p99["lo"]) / 2 <= run.p99_halfwidth_rel * p99["mean"]
