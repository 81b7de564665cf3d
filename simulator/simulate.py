"""The library entry point: scenario in, Results out. Never prints or touches the disk."""

from __future__ import annotations

from typing import Callable

from .cascade import Prepared, run_replication
from .progress import board_slot
from .results import (FEW_TAIL_SAMPLES, Results, measured_latency, replication_length,
                      replication_metrics, summarise)
from .scenario import Scenario
from .stats import pooled_percentile


def simulate(scenario: Scenario, progress: Callable[[int, int], None] | None = None,
             adjust: Callable[[Prepared, int], None] | None = None,
             engine: str | None = None, executor: str = "serial",
             workers: int | None = None) -> Results:
    """Run the scenario's replications and summarise them.

    `adjust(prepared, index)`, if given, may change each replication's runtime objects
    before it runs (e.g. swap a stage's cost model, as `simrec fidelity` does).
    `engine` (simpy | fast | auto) overrides `run.engine` (see cascade.run_replication).

    With `run.p99_halfwidth_rel` set, replications are added one at a time until the
    end-to-end P99's confidence half-width is under that fraction of the P99 (judged from
    MIN_RULE_REPLICATIONS or more, with enough tail samples), or `run.max_replications`
    is reached. `progress(done, planned)` is called as each
    replication's simulated time passes each 2% of its span (`done` a float: replications
    done, the running one's share included, below the next whole number) and after each
    (`done` whole; the last one once the summary is made). Without it, a progress board
    installed by the caller (simrec.progress, for pool workers) hears it.

    Each replication's metrics are taken as soon as it finishes; what is kept of it is its
    compact records (the requests table is built from them when asked for).

    `executor` local or ray runs the replications in parallel (`workers` processes for
    local; the CLI's `run` does so by default). A replication depends only on the scenario
    and its index, and the stopping rule takes them in index order, so the results are
    byte-identical to serial ones; replications run ahead for the rule and not needed are
    dropped. With `adjust` (a closure, not picklable) they run serially.
    """
    if progress is None:
        with board_slot() as slot:
            return _simulate(scenario, slot, adjust, engine, executor, workers)
    return _simulate(scenario, progress, adjust, engine, executor, workers)


# The stopping rule judges the P99's precision from at least this many replications: from
# fewer, their spread is too noisy, and a rule that stops when it looks small by chance
# stops where the estimate is low (M/M/3 at rho 0.8: 34 of 40 seeds covered stopping from
# 3, 37 from 10, 38 at a fixed 30; tests/test_theory.py).
MIN_RULE_REPLICATIONS = 10

# A replication's arrivals count for this share of it; the whole number comes once its
# records are summarised (the drain, its metrics and, for the last, the summary take time too).
SIMULATED_SHARE = 0.99


def _simulate(scenario: Scenario, progress, adjust, engine, executor="serial", workers=None) -> Results:
    run = scenario.run
    reps, per_rep, latency = [], [], []
    planned = run.replications
    ahead = None if executor == "serial" or adjust is not None else \
        _Ahead(scenario, engine, executor, workers, progress)
    while len(reps) < planned:
        if ahead is not None:
            rep, metrics = ahead.get(len(reps), planned)
        else:
            within = None
            if progress is not None:
                within = lambda f, done=len(reps), planned=planned: progress(  # noqa: E731
                    done + SIMULATED_SHARE * f, planned)
            rep = run_replication(scenario, len(reps), adjust, engine, within)
            metrics = replication_metrics(scenario, rep)
        reps.append(rep)
        per_rep.append(metrics)
        if run.p99_halfwidth_rel is not None:
            latency.append(measured_latency(scenario, rep))      # the pooled P99, as summarised
            if len(reps) == planned and planned < run.max_replications and not (
                    len(reps) >= MIN_RULE_REPLICATIONS and _precise(latency, run)):
                planned += 1
        if progress is not None and len(reps) < planned:
            progress(len(reps), planned)
    results = summarise(scenario, reps, per_rep, engine)
    if progress is not None:
        progress(len(reps), planned)
    return results


class _Ahead:
    """Replications computed on an executor, a wave at a time, handed out by index: the
    first wave is the planned ones (with the stopping rule, at least the
    MIN_RULE_REPLICATIONS it always runs, or a replication per worker if more), each later
    one a replication per worker."""

    def __init__(self, scenario: Scenario, engine, executor: str, workers, progress):
        import os
        self.data = scenario.model_dump(mode="json")
        self.engine, self.executor, self.progress = engine, executor, progress
        self.workers = workers or os.cpu_count() or 1
        run = scenario.run
        rule = run.p99_halfwidth_rel is not None
        self.cap = run.max_replications if rule else run.replications
        self.floor = min(self.cap, MIN_RULE_REPLICATIONS) if rule else 0
        self.done: dict[int, tuple] = {}

    def get(self, index: int, planned: int) -> tuple:
        if index not in self.done:
            from .executors import execute
            wave = list(range(index, min(self.cap, max(planned, index + self.workers, self.floor))))
            items = {i: (self.data, i, self.engine) for i in wave}

            def finish(i, result):
                self.done[i] = result
                if self.progress is not None:
                    self.progress(index + sum(j in self.done for j in wave), max(planned, index + 1))
            execute(replication_task, items, wave, finish, self.executor, self.workers)
        return self.done.pop(index)


def replication_task(item: tuple) -> tuple:
    """One replication in a pool worker: its records (detached: picklable) and metrics.
    Reports its share done into the installed progress board (simrec.progress)."""
    from .loader import validate
    data, index, engine = item
    scenario = validate(data, "<replication>")
    with board_slot() as slot:
        within = (lambda f: slot(SIMULATED_SHARE * f, 1)) if slot is not None else None  # noqa: E731
        rep = run_replication(scenario, index, None, engine, within)
    metrics = replication_metrics(scenario, rep)
    return rep.detached(), metrics


def _precise(latency: list, run) -> bool:
    """The pooled P99's interval is within the rule's half-width and the run long enough
    for that interval to be trusted (results.FEW_TAIL_SAMPLES)."""
    p99 = pooled_percentile(latency, 99.0)
    if p99["lo"] is None or p99["hi"] is None or not p99["mean"]:
        return False
    length = replication_length(latency)
    if length is not None and length["p99_tail_samples"] < FEW_TAIL_SAMPLES:
        return False
    return (p99["hi"] - p99["lo"]) / 2 <= run.p99_halfwidth_rel * p99["mean"]
