"""Progress by simulated time: reported while a replication runs, and read-only (records
bit for bit the same with and without it, on both engines and every stage loop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import simrec
from simrec import progress as prog
from simrec.cascade import run_replication
from simrec.executors import run_points
from simrec.loader import load_scenario, with_overrides
from simrec.simulate import simulate

from conftest import scenario, station

ROOT = Path(__file__).resolve().parents[1]


def _every_loop() -> simrec.Scenario:
    """A delay stage, a routed stage and a batching shared stage: the fast engine's three
    queue loops (the relay stage's loop is the relay scenario below)."""
    return scenario({"a": station(1, router="delay", hop_ms=0.2),
                     "b": station(3, router="least_loaded", hop_ms=0.1),
                     "c": station(2, {"kind": "lognormal", "mean_ms": 4.0, "cv": 1.0}, "shared",
                                  batch={"max_size": 4, "max_wait_ms": 1.0, "marginal_cost": 0.3})},
                    rate_qps=300, requests=3000, replications=1)


def _relay() -> simrec.Scenario:
    sc = load_scenario(ROOT / "scenarios" / "relay_h100_small.yaml")
    return with_overrides(sc, {"run.replications": 1, "run.duration_s": 4.0})


def _same(a, b) -> None:
    for name in a.stages:
        for col, x in a.columns(name).items():
            np.testing.assert_array_equal(x, b.columns(name)[col], err_msg=f"{name}.{col}")
    np.testing.assert_array_equal(a.completion_ms, b.completion_ms)
    for k, x in a.timeseries.items():
        np.testing.assert_array_equal(x, b.timeseries[k], err_msg=k)
    assert a.stopped_ms == b.stopped_ms


@pytest.mark.parametrize("make", [_every_loop, _relay], ids=["queues", "relay"])
@pytest.mark.parametrize("engine", ["simpy", "fast"])
def test_progress_changes_no_record_and_moves_in_steps(make, engine):
    sc = make()
    seen: list[float] = []
    quiet = run_replication(sc, 0, engine=engine)
    heard = run_replication(sc, 0, engine=engine, progress=seen.append)
    assert heard.engine == quiet.engine == engine
    _same(quiet, heard)
    stages = 1 if engine == "simpy" else len(sc.stages)
    assert seen == sorted(seen) and 0 < seen[0] <= prog.STEP * 1.0001 and seen[-1] <= 1.0
    assert len(seen) >= 0.8 * stages / prog.STEP       # ~every 2% of the span (per stage)
    assert max(np.diff([0.0, *seen])) <= 2.5 * prog.STEP


def test_one_replication_run_reports_before_it_ends():
    sc = _every_loop()
    calls: list[tuple[float, int]] = []
    simulate(sc, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (1, 1)
    partial = [d for d, _ in calls[:-1]]
    assert len(partial) >= 40 and all(0 < d < 1 for d in partial) and partial == sorted(partial)


def test_marks_report_each_step_once_at_the_first_arrival_past_it():
    seen = []
    m = prog.Marks(np.array([0.0, 0.5, 3.0, 3.0, 9.0, 10.0]), 10.0, seen.append, step=0.25)
    # 2.5 -> index 2 (t=3.0), 5.0 and 7.5 -> index 4 (t=9.0: one report, the larger), 10 -> 5
    assert (m._at, m._frac) == ([2, 4, 5], [0.25, 0.75, 1.0])
    k, mk, hits = 0, m.first, []
    for k in range(6):
        if k == mk:
            mk = m(k)
            hits.append(k)
    assert hits == [2, 4, 5] and seen == [0.25, 0.75, 1.0] and mk == prog.NEVER
    assert prog.Marks(np.zeros(0), 10.0, seen.append).first == prog.NEVER
    assert prog.Marks(np.ones(3), 10.0, None).first == prog.NEVER


def test_board_hears_pool_workers_and_frees_its_slots():
    base = _every_loop()
    points = [with_overrides(base, {"run.seed": s}).model_dump(mode="json") for s in (1, 2)]
    board = prog.Board(slots=8)
    with prog.installed(board):
        pooled = run_points(points, "local", workers=2)
    assert board.updates >= 2 * 40          # each worker wrote its point's share, ~50 times
    assert board.running() == 0.0 and board.claim() == 0
    assert pooled == run_points(points, "serial")       # and the summaries are the same
