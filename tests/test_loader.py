"""Scenario loading: overrides, line numbers, and property tests on the validator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simrec
from simrec.errors import InputError
from simrec.loader import parse_override, validate, with_overrides


def test_overrides_reach_any_field_and_are_validated_after_merge():
    sc = simrec.load_scenario("scenarios/default.yaml",
                              ["stages.ranking.nodes.count=8", "workload.rate_qps=2000",
                               "workload.users.history_len={kind: constant, value: 1024}"])
    assert sc.stages["ranking"].nodes.count == 8
    assert sc.workload.rate_qps == 2000
    assert sc.workload.users.history_len.value == 1024
    with pytest.raises(InputError) as e:
        simrec.load_scenario("scenarios/default.yaml", ["workload.arrivals.kind=lunar"])
    assert str(e.value).startswith("--set workload.arrivals: kind must be one of")


def test_with_overrides_derives_a_new_scenario():
    base = simrec.load_scenario("scenarios/mmc.yaml")
    derived = with_overrides(base, {"workload.rate_qps": 100.0})
    assert derived.workload.rate_qps == 100.0 and base.workload.rate_qps == 240.0


def test_stage_order_is_the_file_order():
    sc = simrec.load_scenario("scenarios/default.yaml")
    assert list(sc.stages) == ["retrieval", "preprocess", "ranking"]


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
def test_rate_accepted_iff_positive(rate):
    data = {"name": "x", "workload": {"rate_qps": rate},
            "stages": {"a": {"service": {"kind": "constant", "ms": 1}}},
            "slo": {"p99_ms": 10}, "run": {"requests": 10}}
    if rate > 0:
        assert validate(data).workload.rate_qps == rate
    else:
        with pytest.raises(InputError, match=r"workload.rate_qps: must be > 0"):
            validate(data)


@given(st.lists(st.text(alphabet="abcxyz_", min_size=1, max_size=6), min_size=1, max_size=4),
       st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                 st.text(alphabet="abc", min_size=1)))
@settings(max_examples=200)
def test_parse_override_round_trips(keys, value):
    keys_out, parsed = parse_override(".".join(keys) + "=" + str(value).lower()
                                      if isinstance(value, bool) else ".".join(keys) + "=" + repr(value)
                                      if isinstance(value, (int, float)) else ".".join(keys) + "=" + value)
    assert keys_out == keys
    if isinstance(value, (bool, int, float)):
        assert parsed == value


@given(st.sampled_from(["workload", "stages", "slo", "run"]), st.text(alphabet="qwrtz", min_size=3,
                                                                       max_size=8))
def test_unknown_keys_always_rejected(section, key):
    data = {"name": "x", "workload": {"rate_qps": 1.0},
            "stages": {"a": {"service": {"kind": "constant", "ms": 1}}},
            "slo": {"p99_ms": 10}, "run": {"requests": 10}}
    target = data[section]["a"] if section == "stages" else data[section]
    target[key] = 1
    with pytest.raises(InputError, match="unknown key"):
        validate(data)
