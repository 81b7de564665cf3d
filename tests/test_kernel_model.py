"""The kernel cost model (simrec.kernel_model): lookups, bad tables, the eager pipeline and
its fit, the `kernels` service, and `simrec calibrate --model`."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from simrec.cli import app
from simrec import operators as opg
from simrec.errors import InputError
from simrec.kernel_model import (KERNEL_COLUMNS, Costed, KernelCosts, ModelSpec, Overhead,
                                 cost_graph, fit_overhead, load_kernels)

HSTU = "h200_gr_hstu"
MODEL = {"arch": "transformer", "layers": 2, "d_model": 64, "heads": 4, "ffn": 128, "dtype": "bfloat16",
         "short_term_tokens": 4}


def write_kernels(folder, rows, model=MODEL, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=list(KERNEL_COLUMNS) + list(extra or ()))
    frame.to_parquet(folder / "kernels.parquet", index=False)
    (folder / "manifest.json").write_text(json.dumps(
        {"model": model, "device": {"name": "NVIDIA H200", "kind": "cuda"}}))
    load_kernels.cache_clear()
    return str(folder)


def power_law_rows():
    """GEMMs at m in 64..4096 for one (n, k), time = 0.01 (m / 64)^0.7 ms: log-log linear."""
    return [("gemm", m, 256, 64, "isolated", q, 0.01 * (m / 64) ** 0.7 * f, 20)
            for m in (64, 128, 256, 1024, 4096) for q, f in ((0.5, 1.0), (0.9, 1.3))]


# ------------------------------------------------------------------ lookups
def test_lookups_are_exact_at_every_grid_point_of_a_measured_table():
    kt = load_kernels(HSTU)
    costs = KernelCosts([kt])
    n = 0
    for kind, (dims, arch, heads, t) in kt.rows.items():
        for d, a, h, v in zip(dims, arch, heads, t):
            got, how = costs.lookup(kind, d, a, int(h))
            assert (got, how) == (pytest.approx(v, rel=1e-12), "exact")
            n += 1
    assert n == kt.n_shapes > 100


def test_interpolation_is_linear_in_log_log_between_grid_points(tmp_path):
    costs = KernelCosts([load_kernels(write_kernels(tmp_path / "k", power_law_rows()))])
    assert costs.choice["gemm"] == "interpolation"     # exact on a power law, so it wins LOO
    for m in (100, 512, 3000):
        got, how = costs.lookup("gemm", (m, 256, 64), "transformer", 4)
        assert how == "interpolated"
        assert got == pytest.approx(0.01 * (m / 64) ** 0.7, rel=1e-9)
    # outside the grid, or another weight shape: the family's regressor
    assert costs.lookup("gemm", (8192, 256, 64), "transformer", 4)[1] == "regressor"
    assert costs.lookup("gemm", (512, 128, 64), "transformer", 4)[1] == "regressor"


def test_a_family_nobody_measured_is_a_one_line_error(tmp_path):
    costs = KernelCosts([load_kernels(write_kernels(tmp_path / "k", power_law_rows()))])
    with pytest.raises(InputError) as e:
        cost_graph(costs, ModelSpec.from_dict(MODEL), "rank_cached", 64, 8)
    assert str(e.value) == (f"{tmp_path / 'k' / 'kernels.parquet'}: the kernel tables have no memory "
                            "kernels to cost copy [768, 0, 0] (have: gemm)")


@pytest.mark.parametrize("arch, phase, family, op", [
    ("stca", "stca_target_attend", "attn_cross:stca:hd64", "attn_cross [256, 4096, 1024]"),
    ("stca", "stca_per_target", "attn_single:stca:hd64", "attn_single [128, 4096, 1024]"),
    ("vista", "vista_rank_summary", "attn_cross:vista:hd64", "attn_cross [256, 128, 1024]"),
    ("laser", "laser_sta_rank", "attn_segmented:laser:hd64", "attn_segmented [256, 4096, 1024]"),
])
def test_target_arch_graphs_cost_measured_kinds_and_name_an_unmeasured_attention(arch, phase, family, op):
    """A target-attention arch's graph looks its GEMMs and copies up in a GR kernel table as any
    graph's; its own attention kinds, which no table measured, are the one-line error naming
    the family (never the memory regressor's guess)."""
    kt = load_kernels(HSTU)
    costs = KernelCosts([kt])
    spec = ModelSpec.from_dict({"arch": arch, "layers": 4, "d_model": 1024, "heads": 16, "ffn": 2048,
                                "dtype": "bfloat16", "summary_tokens": 128, "segment_len": 128})
    user_side = {"stca": "stca_history_encode", "vista": None, "laser": "laser_history_encode"}[arch]
    if user_side:                  # GEMMs, norms, K/V copies: all costable from the HSTU table
        c = cost_graph(costs, spec, user_side, 4096, 0)
        assert c.device_ms.min() > 0 and len(c.how) == len(opg.ops(opg.graph(spec, user_side, 4096, 0)))
    with pytest.raises(InputError) as e:
        cost_graph(costs, spec, phase, 4096, 256)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{kt.path}: the kernel tables have no {family} kernels to cost {op} (have: ")


# ------------------------------------------------------------------ bad tables
@pytest.mark.parametrize("change, message", [
    (lambda r: r.__setitem__(2, ("gemm", 256, 256, 64, "isolated", 0.5, -1.0, 20)),
     "row 2: time_ms must be > 0 (got -1)"),
    (lambda r: r.__setitem__(1, ("conv", 64, 256, 64, "isolated", 0.9, 1.0, 20)),
     "row 1: kernel: unknown kernel 'conv'"),
    (lambda r: r.__setitem__(3, ("gemm", 256, 256, 64, "isolated", 1.5, 1.0, 20)),
     "row 3: quantile must be in (0, 1) (got 1.5)"),
    (lambda r: r.__setitem__(4, ("gemm", float("nan"), 256, 64, "isolated", 0.5, 1.0, 20)),
     "row 4: dim_a is missing or not a number (got an empty cell)"),
    (lambda r: r.__setitem__(5, ("gemm", 256, 256, 64, "isolated", 0.5, 1.0, 20)),
     "row 5: kernel shape given twice: gemm [256,256,64] q=0.5 (also row 4)"),
    (lambda r: r.__setitem__(0, ("gemm", 64, 256, 64, "isolated", 0.25, 0.01, 20)),
     "row 1: quantile: the median (0.5) of gemm [64,256,64] is missing"),
    (lambda r: r.__setitem__(6, ("gemm", 1024, 256, 0, "isolated", 0.5, 1.0, 20)),
     "row 6: gemm needs dim_a, dim_b, dim_c > 0 (got [1024, 256, 0])"),
])
def test_bad_kernel_table_rows_are_one_line_errors_naming_file_row_and_column(tmp_path, change, message):
    rows = power_law_rows()
    change(rows)
    ref = write_kernels(tmp_path / "k", rows)
    with pytest.raises(InputError) as e:
        load_kernels(ref)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "k" / "kernels.parquet")) and message in text
    assert "\n" not in text


def test_bad_manifest_and_missing_columns_are_one_line_errors(tmp_path):
    ref = write_kernels(tmp_path / "k", power_law_rows(), model={k: v for k, v in MODEL.items() if k != "heads"})
    with pytest.raises(InputError, match=r"manifest.json model.heads: the model has no heads"):
        load_kernels(ref)
    folder = tmp_path / "c"
    write_kernels(folder, power_law_rows())
    pd.DataFrame(power_law_rows(), columns=KERNEL_COLUMNS).drop(columns="time_ms").to_parquet(
        folder / "kernels.parquet")
    load_kernels.cache_clear()
    with pytest.raises(InputError, match=r"kernels.parquet: missing column\(s\): time_ms"):
        load_kernels(str(folder))


def test_graph_rows_are_device_time_and_host_rows_the_host_side(tmp_path):
    """A table with graph and host rows is costed from them: lookups give the graph median,
    the isolated floor e is not taken off, and the host side is the measured host time."""
    rows = power_law_rows() + [(k, m, n, kk, c, q, t * f, n_) for k, m, n, kk, _, q, t, n_ in power_law_rows()
                               for c, f in (("graph", 0.5), ("host", 0.2))]
    costs = KernelCosts([load_kernels(write_kernels(tmp_path / "k", rows))])
    assert costs.timing == "graph" and costs.host.timing == "host"
    assert costs.lookup("gemm", (256, 256, 64), "transformer", 4)[0] == pytest.approx(0.5 * 0.01 * 4 ** 0.7)
    assert costs.host.lookup("gemm", (256, 256, 64), "transformer", 4)[0] == pytest.approx(0.2 * 0.01 * 4 ** 0.7)
    c = Costed(np.ones(3), np.full(3, 1.0), ("exact",) * 3, True, np.full(3, 0.1))
    assert c.time_ms(Overhead(0.0, 0.5, 0.0, 2.0, 0.05)) == pytest.approx(0.25 + 3.0)    # e ignored
    tiny = Costed(np.ones(3), np.full(3, 0.001), ("exact",) * 3, True, np.full(3, 0.1))
    assert tiny.host_bound(Overhead(0.0, 0.0, 0.0, 1.0, 0.0))
    assert tiny.time_ms(Overhead(0.0, 0.0, 0.0, 2.0, 0.05)) == pytest.approx(3 * 0.25 + 0.001)


def test_overhead_fit_recovers_host_scale_and_per_op_cost():
    rng = np.random.default_rng(0)
    pts = [Costed(np.ones(n), rng.uniform(0.001, w, n), ("exact",) * n, True, rng.uniform(0.005, 0.03, n))
           for n, w in ((50, 0.01), (200, 0.02), (100, 0.5), (300, 0.005))]
    truth = Overhead(0.0, 0.0, 0.0, 0.7, 0.008)
    fit = fit_overhead([(c, c.time_ms(truth)) for c in pts])
    assert (fit.host_scale, fit.host_ms_per_op) == pytest.approx((0.7, 0.008), rel=1e-3)


def test_a_copy_kind_the_table_lacks_is_costed_by_the_memory_regressor(tmp_path):
    rows = power_law_rows() + [("copy", n, 0, 0, "isolated", 0.5, 0.002 + n * 1e-9, 20)
                               for n in (1024, 65536, 1 << 20, 1 << 24)]
    costs = KernelCosts([load_kernels(write_kernels(tmp_path / "k", rows))])
    assert costs.lookup("kv_store", (4096, 1024, 0), "transformer", 4)[1] == "memory regressor"


# ------------------------------------------------------------------ the eager pipeline
def test_pipeline_is_host_bound_for_tiny_kernels_and_device_bound_for_large():
    o = Overhead(host_ms_per_launch=0.01, kernel_floor_ms=0.002, call_ms=0.1)
    tiny = Costed(np.ones(100), np.full(100, 0.003), ("exact",) * 100)
    assert tiny.host_bound(o)
    # the last op is issued at 100 x 0.01 ms and then runs 0.001 ms on the device
    assert tiny.time_ms(o) == pytest.approx(100 * 0.01 + 0.001 + 0.1)
    big = Costed(np.ones(100), np.full(100, 1.002), ("exact",) * 100)
    assert not big.host_bound(o)
    assert big.time_ms(o) == pytest.approx(0.01 + 100 * 1.0 + 0.1)   # first issue, then the device


def test_overhead_fit_recovers_known_parameters_on_a_measured_kernel_table():
    from simrec.calibration.table import load_table
    costs = KernelCosts([load_kernels(HSTU)])
    spec = ModelSpec.from_dict(load_table(HSTU).manifest.model)
    pts = [cost_graph(costs, spec, ph, L, M) for ph, L, M in
           [("rank_cached", L, M) for L in (1024, 4096, 16384) for M in (64, 512)]
           + [("prefix_encode", L, 0) for L in (1024, 4096, 16384)]]
    truth = Overhead(0.012, 0.006, 0.0)
    fit = fit_overhead([(c, c.time_ms(truth)) for c in pts])
    assert (fit.host_ms_per_launch, fit.kernel_floor_ms, fit.call_ms) == pytest.approx(
        (0.012, 0.006, 0.0), rel=1e-3)


# ------------------------------------------------------------------ the scenario service
SERVICE = ("stages.ranking.service={kind: kernels, table: h200_gr_hstu, model: {arch: hstu, layers: 24, "
           "d_model: 1024, heads: 4, ffn: 4096, dtype: bfloat16, short_term_tokens: 32}}")


def test_kernels_service_runs_a_relay_scenario_and_answers_the_phases():
    from simrec import load_scenario, simulate
    from simrec.service import build
    sc = load_scenario("scenarios/relay.yaml", ["run.duration_s=2", "run.replications=1", SERVICE])
    svc = build(sc.stages["ranking"].service, np.random.default_rng(0), "stages.ranking.service", relay=True)
    assert svc.prefix_bytes(1000) == 1000 * 24 * 2 * 1024 * 2
    assert svc.check(np.array([10**6]), np.array([5000])) == 0
    for ph in ("prefix_encode", "rank_cached", "full_forward"):
        assert svc.median(ph, 4096, 256) == svc.model.median_ms(ph, 4096, 256) > 0
    assert svc.median("prefix_reload", 8192) > svc.median("prefix_reload", 1024) > 0
    draws = np.array([svc.phase("full_forward", 4096, 256) for _ in range(2000)])
    assert np.median(draws) == pytest.approx(svc.median("full_forward", 4096, 256), rel=0.02)
    res = simulate(sc)
    assert res.summary["metrics"]["stages"]["ranking"]["p99_ms"]["mean"] > 0


def test_kernels_service_with_a_mismatched_dtype_is_a_one_line_error():
    from simrec import load_scenario, simulate
    sc = load_scenario("scenarios/relay.yaml", ["run.duration_s=1", "run.replications=1",
                                                SERVICE.replace("bfloat16", "float32")])
    with pytest.raises(InputError) as e:
        simulate(sc)
    assert "stages.ranking.service: the model's dtype float32 has 4 bytes, the kernel table's 2" in str(e.value)


# ------------------------------------------------------------------ calibrate --model
NO_RANK = '''
import torch
from torch import nn
from simrec.calibration.gr_models import GRSpec

class Half(nn.Module):
    spec = GRSpec(layers=1, d_model=8, heads=2, ffn=8, dtype="float32", short_term_tokens=1)
    def encode_prefix(self, h): return h
    def full_forward(self, h, s, c): return c.sum(-1)

def build():
    return Half()
'''


def test_calibrate_model_lacking_a_phase_is_a_one_line_error(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "user_half.py").write_text(NO_RANK)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = CliRunner().invoke(app, ["calibrate", "--model", "user_half:build", "--device", "cpu",
                                 "--out", str(tmp_path / "t")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[-1] == ("--model: Half has no rank_cached() (the phase protocol: encode_prefix, "
                         "rank_cached, full_forward; see calibration/examples/tiny_gr.py)")
    assert not (tmp_path / "t").exists()
    sys.modules.pop("user_half", None)


def test_calibrate_the_example_user_model_on_cpu(tmp_path):
    pytest.importorskip("torch")
    from simrec.calibration.table import load_table
    out = tmp_path / "tiny_user"
    r = CliRunner().invoke(app, [
        "calibrate", "--model", "simrec.calibration.examples.tiny_gr:build", "--device", "cpu",
        "--history-lens", "16,32", "--candidates", "4,8", "--conditions", "isolated",
        "--warmup", "1", "--target-s", "0", "--min-samples", "3", "--max-samples", "3",
        "--emb-rows", "1000", "--corpus", "1000", "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = load_table(str(out))
    assert table.manifest.model["user_model"] == "simrec.calibration.examples.tiny_gr:build"
    assert table.manifest.model["d_model"] == 64
    for ph in ("prefix_encode", "rank_cached", "full_forward", "prefix_reload"):
        c = table.curve(ph)
        assert np.all(np.isfinite(c.log_ms)) and math.isfinite(c.median_ms(32, 8 if ph[0] in "rf" else 0))


# ------------------------------------------------------------------ the wide kernel grid
def test_kernel_grid_on_cpu_writes_a_table_the_model_reads_exactly(tmp_path):
    pytest.importorskip("torch")
    from simrec.calibration import kernel_grid
    out = tmp_path / "grid"
    assert kernel_grid.main(["--device", "cpu", "--archs", "transformer", "--d-models", "64",
                             "--heads", "2", "--history-lens", "32", "--candidates", "8",
                             "--short-term", "4", "--min-samples", "3", "--max-samples", "3",
                             "--target-s", "0", "--out", str(out)]) == 0
    load_kernels.cache_clear()
    kt = load_kernels(str(out))
    spec = ModelSpec("transformer", 2, 64, 2, 256, "float32", 4)
    # the grid holds every kernel of this model's phases at (32, 8): each lookup is exact
    costs = KernelCosts([kt])
    for phase in ("prefix_encode", "rank_cached", "full_forward"):
        assert set(cost_graph(costs, spec, phase, 32, 8).how) == {"exact"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["shapes"] == kt.n_shapes and manifest["method"]["shapes_left_out_by_deadline"] == 0


def test_summary_records_a_kernels_services_kernel_and_phase_tables():
    import hashlib

    from simrec import load_scenario
    from simrec.results import cost_tables
    grid = "../calibration/kernel_grids/h200_kernel_grid"
    sc = load_scenario("scenarios/relay.yaml", [SERVICE.replace("table: h200_gr_hstu", f"table: {grid}")[:-1]
                                                + ", overhead_from: [h200_gr_transformer]}"])
    got = cost_tables(sc.model_dump(mode="json"))["ranking"]
    kpath = "calibration/kernel_grids/h200_kernel_grid/kernels.parquet"
    want = hashlib.sha256(open(kpath, "rb").read()).hexdigest()
    assert (got["table"], got["label"], got["sha256"]) == ("h200_kernel_grid", "measured", want)
    assert got["path"].endswith(kpath) and len(got["kernels"]) == 2      # h200_gr_transformer's too
    assert [t["table"] for t in got["overhead_from"]] == ["h200_gr_transformer"]


def test_kernels_service_from_the_h200_grid_with_the_overhead_from_another_table():
    from simrec import load_scenario
    from simrec.service import build
    grid = "../calibration/kernel_grids/h200_kernel_grid"     # relative to the scenario's folder
    sc = load_scenario("scenarios/relay.yaml", [
        "run.duration_s=1", SERVICE.replace("table: h200_gr_hstu", f"table: {grid}")[:-1]
        + ", overhead_from: [h200_gr_transformer]}"])
    svc = build(sc.stages["ranking"].service, np.random.default_rng(0), "stages.ranking.service", relay=True)
    # the grid's graph (device) times; h200_gr_transformer's isolated kernels are not mixed in
    assert [kt.path.split("/")[-2] for kt in svc.model.costs.tables] == ["h200_kernel_grid"]
    assert svc.model.costs.timing == "graph" and svc.model.costs.host is not None
    assert 0 < svc.median("rank_cached", 4096, 256) < svc.median("full_forward", 4096, 256)
    with pytest.raises(InputError, match="none of the tables has a phase table to fit the per-launch overhead"):
        build(load_scenario("scenarios/relay.yaml", [SERVICE.replace("table: h200_gr_hstu", f"table: {grid}")])
              .stages["ranking"].service, np.random.default_rng(0), "stages.ranking.service", relay=True)


def test_merge_rows_replaces_a_kinds_rows_and_records_it(tmp_path):
    """calibration/kernel_grids/merge_rows.py: every row of the kind comes from the extra grid."""
    import hashlib
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("merge_rows", root / "calibration/kernel_grids/merge_rows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def grid(folder, rows, name, lens):
        folder.mkdir()
        pd.DataFrame(rows, columns=["kernel", "dim_a", "dim_b", "dim_c", "condition", "quantile",
                                    "time_ms", "n_samples", "arch", "heads"]).to_parquet(folder / "kernels.parquet")
        (folder / "manifest.json").write_text(json.dumps({
            "name": name, "date": "2026-12-01", "grid": {"history_len": lens},
            "method": {"kernels_sha256": "", "command": f"make {name}"}}))
    grid(tmp_path / "base", [("gemm", 8, 8, 8, "graph", 0.5, 0.01, 5, "", 0),
                             ("attn_causal", 64, 64, 32, "graph", 0.5, 0.02, 5, "hstu", 2)], "base", [64])
    grid(tmp_path / "dense", [("attn_causal", 64, 64, 32, "graph", 0.5, 0.03, 5, "hstu", 2),
                              ("attn_causal", 96, 96, 32, "graph", 0.5, 0.05, 5, "hstu", 2),
                              ("gemm", 8, 8, 8, "graph", 0.5, 9.0, 5, "", 0)], "dense", [64, 96])
    assert mod.merge(tmp_path / "base", tmp_path / "dense", ["attn_causal"]) == 3
    got = pd.read_parquet(tmp_path / "base" / "kernels.parquet")
    assert sorted(got[got.kernel == "attn_causal"].time_ms) == [0.03, 0.05]    # the dense grid's only
    assert got[got.kernel == "gemm"].time_ms.tolist() == [0.01]                 # other kinds kept
    m = json.loads((tmp_path / "base" / "manifest.json").read_text())
    assert m["method"]["replaced_kinds"] == [{"kinds": ["attn_causal"], "from": "dense", "date": "2026-12-01",
                                              "history_len": [64, 96], "rows": 2, "command": "make dense"}]
    assert m["method"]["kernels_sha256"] == hashlib.sha256(
        (tmp_path / "base" / "kernels.parquet").read_bytes()).hexdigest()
