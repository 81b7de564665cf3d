"""simrec: a discrete-event simulator of multi-stage recommendation serving cascades.

    import simrec
    scenario = simrec.load_scenario("scenarios/default.yaml", ["workload.rate_qps=500"])
    results = simrec.simulate(scenario)
    results.metric("e2e", "p99_ms")

Simulated times are milliseconds everywhere.
"""

from .errors import InputError
from .loader import load_scenario, with_overrides
from .results import Results
from .scenario import Scenario
from .simulate import simulate

__all__ = ["InputError", "Results", "Scenario", "load_scenario", "simulate", "with_overrides"]
