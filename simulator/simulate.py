"""The library entry point: scenario in, Results out. Never prints or touches the disk."""

from __future__ import annotations

from typing import Callable

from .cascade import run_replication
from .results import Results, summarise
from .scenario import Scenario


def simulate(scenario: Scenario, progress: Callable[[int, int], None] | None = None) -> Results:
    """Run every replication of the scenario and summarise them.

    `progress(done, total)` is called after each replication, for progress bars.
    """
    total = scenario.run.replications
    reps = []
    for i in range(total):
        reps.append(run_replication(scenario, i))
        if progress is not None:
            progress(i + 1, total)
    return summarise(scenario, reps)
