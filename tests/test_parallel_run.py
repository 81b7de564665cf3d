"""Replications of one run on a process pool: the same bytes as serial (issue 17).

A replication depends only on the scenario and its index; the pool returns each one's
records (its relay reduced to plain arrays) and metrics, and the stopping rule takes them
in index order, so every output file matches the serial run's byte for byte."""

from __future__ import annotations

import pickle

import pytest

import simrec
from simrec.cascade import RelayRecords, run_replication
from simrec.simulate import simulate

CASES = {
    "mmc": ("scenarios/mmc.yaml", ["run.requests=3000", "run.replications=3"]),
    # relay with an HBM pool: the relay's and the embedding cache's request columns
    "helm": ("scenarios/helm.yaml", ["run.replications=2", "run.duration_s=4", "run.warmup_s=1"]),
    # the stopping rule: the pool runs replications ahead, the unused ones are dropped
    "stopping": ("scenarios/mmc.yaml", ["run.requests=1500", "run.replications=2",
                                        "run.p99_halfwidth_rel=0.02", "run.max_replications=7"]),
}


def _files(results, folder):
    results.write(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pool_writes_the_serial_bytes(case, tmp_path):
    path, overrides = CASES[case]
    sc = simrec.load_scenario(path, overrides)
    serial = simulate(sc)
    pooled = simulate(sc, executor="local", workers=2)
    a, b = _files(serial, tmp_path / "serial"), _files(pooled, tmp_path / "pool")
    assert set(a) == set(b) and {"summary.json", "requests.parquet", "timeseries.parquet"} <= set(a)
    for name in a:
        assert a[name] == b[name], name
    if case == "stopping":
        # the rule added replications (and stopped below its cap)
        assert sc.run.replications < serial.summary["replications"] <= 7


def test_a_detached_relay_replication_pickles_and_keeps_its_columns():
    sc = simrec.load_scenario("scenarios/helm.yaml", ["run.replications=1", "run.duration_s=3",
                                                      "run.warmup_s=1"])
    rep = run_replication(sc, 0)
    with pytest.raises(Exception):
        pickle.dumps(rep)                       # the live relay holds SimPy processes
    prefix, emb = rep.relay.prefix.copy(), rep.relay.hbm.emb_ms.copy()
    back = pickle.loads(pickle.dumps(rep.detached()))
    assert isinstance(back.relay, RelayRecords) and back.relay.stage_name == sc.relay.stage
    assert (back.relay.prefix == prefix).all() and (back.relay.hbm.emb_ms == emb).all()
