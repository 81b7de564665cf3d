"""The ranking stage's architecture follows from its cost table (issue 16): the phases each
request costs, VISTA's flat cost and its summary store, STCA with and without RLB, and the
one-line errors of bad architecture/table combinations."""

from __future__ import annotations

import pytest

import simrec
from simrec.calibration.table import load_table
from simrec.errors import InputError
from simrec.loader import with_overrides


def scenario(table: str, L: int, *sets, **service):
    sc = simrec.load_scenario("scenarios/archs.yaml", ["run.duration_s=4", "run.replications=2",
                                                       f"workload.users.history_len.value={L}", *sets])
    return with_overrides(sc, {"stages.ranking.service": {"kind": "gr", "table": table, **service}})


def mean_service(sc) -> float:
    return simrec.simulate(sc).summary["metrics"]["stages"]["ranking"]["mean_service_ms"]["mean"]


def test_vista_cost_is_independent_of_L_in_table_and_simulation():
    t = load_table("h200_vista")
    rank = t.curve("vista_rank_summary")
    assert list(rank.history_len) == [0]                    # the table has no L axis for it
    assert rank.median_ms(512, 256) == rank.median_ms(10**6, 256)
    a, b = mean_service(scenario("h200_vista", 512)), mean_service(scenario("h200_vista", 32768))
    assert a == b                                           # same draws, nothing depends on L


def test_stca_costs_its_serving_path():
    """With RLB: history_encode(L) + target_attend(L, M); without: per_target(L, M)."""
    t = load_table("h200_stca")
    L, M = 2048, 256
    enc, att, per = (t.curve(p).median_ms(L, M) for p in
                     ("stca_history_encode", "stca_target_attend", "stca_per_target"))
    rlb = mean_service(scenario("h200_stca", L, "workload.rate_qps=5"))
    no_rlb = mean_service(scenario("h200_stca", L, "workload.rate_qps=1", rlb=False))
    assert rlb == pytest.approx(enc + att, rel=0.05)        # draws around the medians
    assert no_rlb == pytest.approx(per, rel=0.05)
    assert no_rlb > 10 * rlb


def test_vista_stale_summaries_on_the_critical_path_cost_a_summarize():
    base = scenario("h200_vista", 4096)
    fresh = mean_service(with_overrides(base, {"stages.ranking.service.summary":
                                               {"refresh_s": 1e6, "on_stale": "nearline"}}))
    stale = mean_service(with_overrides(base, {"stages.ranking.service.summary":
                                               {"refresh_s": 0.001, "on_stale": "critical_path"}}))
    summarize = load_table("h200_vista").curve("vista_summarize").median_ms(4096, 0)
    assert stale - fresh == pytest.approx(summarize, rel=0.1)
    res = simrec.simulate(with_overrides(base, {"stages.ranking.service.summary":
                                                {"on_stale": "critical_path"}}))
    assert res.summary["engine"]["used"] == ["simpy"]       # per-user state: the reference engine


@pytest.mark.parametrize("service,message", [
    ({"kind": "gr", "table": "h200_vista", "arch": "stca"},
     "stages.ranking.service.arch: arch 'stca' does not match the table's model arch 'vista'"),
])
def test_bad_arch_table_combinations_get_one_line(service, message):
    sc = with_overrides(simrec.load_scenario("scenarios/archs.yaml", ["run.duration_s=1"]),
                        {"stages.ranking.service": service})
    with pytest.raises(InputError) as e:
        simrec.simulate(sc)
    assert str(e.value).endswith(message) and "\n" not in str(e.value)


def test_relay_on_an_architecture_without_prefix_phases_is_refused():
    sc = simrec.load_scenario("scenarios/relay.yaml", ["run.duration_s=1"])
    sc = with_overrides(sc, {"stages.ranking.service": {"kind": "gr", "table": "h200_stca"},
                             "relay.cache.hbm_bytes": 10**10})
    with pytest.raises(InputError) as e:
        simrec.simulate(sc)
    assert "relay needs a transformer or hstu table" in str(e.value)
