"""Scenario input a newcomer writes: byte sizes with units, YAML 1.2 numbers, every
validation error listed (one line each, in file order), typos named with a suggestion."""

from __future__ import annotations

import pytest

import simrec
from simrec.errors import InputError
from simrec.loader import parse_yaml, with_byte_units

BASE = """name: t
workload: {rate_qps: 100, users: {count: 1000}, candidates: {kind: constant, value: 128}}
stages:
  ranking:
    nodes: {count: 2, device: h100}
    router: affinity
    service: {kind: gr, table: h100_gr_base}
slo: {p99_ms: 100}
relay: {stage: ranking, signal_after: arrival, cache: {hbm_bytes: HBM}}
run: {duration_s: 1}
"""


def load(tmp_path, text, *sets):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return simrec.load_scenario(f, list(sets))


@pytest.mark.parametrize("text,value", [("40GB", 40 * 10**9), ("512MiB", 512 * 2**20),
                                        ("1.5 TB", 1.5e12), ("4e10", 4 * 10**10), ("7", 7),
                                        ("2 kib", 2048)])
def test_byte_sizes_take_units(tmp_path, text, value):
    sc = load(tmp_path, BASE.replace("HBM", "40GB"), f"relay.expander.dram_bytes={text}")
    assert sc.relay.cache.hbm_bytes == 40 * 10**9 and sc.relay.expander.dram_bytes == value


def test_a_bad_byte_size_names_file_line_and_field(tmp_path):
    with pytest.raises(InputError) as e:
        load(tmp_path, BASE.replace("HBM", "40XB"))
    assert str(e.value) == (f"{tmp_path / 's.yaml'}:9 relay.cache.hbm_bytes: '40XB' is not a byte "
                            "size (a number with an optional unit: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    with pytest.raises(InputError) as e:
        load(tmp_path, BASE.replace("HBM", "1GB"), "relay.cache.hbm_bytes=lots")
    assert str(e.value).startswith("--set relay.cache.hbm_bytes: 'lots' is not a byte size")


def test_byte_units_leave_other_strings_alone():
    data = {"name": "40GB", "a": {"dram_bytes": "1KB", "b": ["2MB"]}}
    assert with_byte_units(data) == {"name": "40GB", "a": {"dram_bytes": 1000, "b": ["2MB"]}}
    assert data["a"]["dram_bytes"] == "1KB"            # the input is not modified


def test_yaml_1_2_numbers():
    got = parse_yaml("a: 40e9\nb: 1e-3\nc: -2E+3\nd: 1.5\ne: 12\nf: e9\ng: 1e", "x")[0]
    assert got == {"a": 40e9, "b": 1e-3, "c": -2000.0, "d": 1.5, "e": 12, "f": "e9", "g": "1e"}
    assert isinstance(got["e"], int)


def test_every_error_is_listed_in_file_order(tmp_path):
    text = BASE.replace("HBM", "1GB").replace("    router: affinity\n", "    routr: affinity\n")
    text = text.replace("slo: {p99_ms: 100}", "slo: {p99_ms: -1}").replace(
        "table: h100_gr_base}", "table: h100_gr_base, tabel: 3}")
    with pytest.raises(InputError) as e:
        load(tmp_path, text)
    p = tmp_path / "s.yaml"
    assert str(e.value).splitlines() == [
        f"{p}:6 stages.ranking.routr: unknown key 'routr'; did you mean 'router'?",
        f"{p}:7 stages.ranking.service.tabel: unknown key 'tabel'; did you mean 'table'?",
        f"{p}:8 slo.p99_ms: must be > 0 (got -1)"]


def test_a_misspelt_stage_is_named_as_such(tmp_path):
    with pytest.raises(InputError) as e:
        load(tmp_path, BASE.replace("HBM", "1GB"), "stages.rankng.nodes.count=4")
    assert str(e.value) == "--set stages.rankng: unknown stage 'rankng'; did you mean 'ranking'?"
    with pytest.raises(InputError) as e:
        load(tmp_path, BASE.replace("HBM", "1GB"), "relay.stage=rankin")
    assert str(e.value).endswith("no stage named 'rankin'; did you mean 'ranking'?")


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    with pytest.raises(InputError) as e:
        load(tmp_path, BASE.replace("HBM", "1GB"), "stages.ranking.zzzzzz=1")
    assert str(e.value) == "--set stages.ranking.zzzzzz: unknown key 'zzzzzz'"
