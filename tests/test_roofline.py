"""The roofline cost model: FLOP and byte counts, regimes, fitting on a table, carrying to a device."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

import simrec
from conftest import check_invariants
from simrec.calibration.table import write_table
from simrec.devices import PRESETS
from simrec.errors import InputError
from simrec.loader import validate
from simrec.roofline import Efficiency, ModelShape, Peaks, Roofline, RooflinePhases, fit_table
from simrec.scenario import DeviceSpec, RooflineService

H100 = Peaks.of(PRESETS["h100"])
GR = ModelShape("transformer", layers=8, d_model=512, heads=8, ffn=2048, dtype_bytes=2,
                short_term_tokens=32)


# ------------------------------------------------------------------ FLOPs and bytes
@pytest.mark.parametrize("arch, encode, rank", [
    # N=2, d=4, ffn=8, h=2, s=1, k=5 at L=3, M=2, worked by hand:
    # transformer: c = 8*16 + 4*4*8 = 256; encode = 1*(256*3 + 2*9*4) + 6*16*3 (the last layer's
    # QKV projection, as gr_models runs it); rank = 2*(256*3 + 4*3*4*4) + 2*2*4 (the score head)
    ("transformer", 768 + 72 + 288, 2 * (768 + 192) + 16),
    # hstu: c = 10*16 = 160; the last layer's U/V/Q/K projection 8*16*3
    ("hstu", 480 + 72 + 384, 2 * (480 + 192) + 16),
    # stca (calibration/arch_models.py, SwiGLU width f = ffn = 8): encode = N L (6 d f + 4 d^2)
    # = 2*3*(192 + 64); rank = M [6 d f + N (4 d^2 + 4 L d) + (N-1) 4 d^2] = 2*(192 + 2*(64 + 48) + 64)
    ("stca", 1536, 960),
    # vista: summarize = N [4 L d^2 + 4 k L d + 4 k d^2 + 6 k d f] = 2*(192 + 240 + 320 + 960);
    # rank_summary = N [4 k d^2 + 4 M d^2 + 4 M k d + 6 M d f] = 2*(320 + 128 + 160 + 384)
    ("vista", 3424, 1984),
    # laser (segment_len 128: S = 1, P = 128): encode = 4 L d^2 = 192;
    # sta = M [6 d f + 2 d^2 + 4 P d] + N M [4 d^2 + 4 S d + 6 d f] = 2*(192 + 32 + 2048) + 4*(64 + 16 + 192)
    ("laser", 192, 2 * 2272 + 4 * 272),
])
def test_flops_match_hand_computed_numbers(arch, encode, rank):
    m = ModelShape(arch, layers=2, d_model=4, heads=2, ffn=8, dtype_bytes=2, short_term_tokens=1,
                   summary_tokens=5)
    assert m.flops("prefix_encode", 3, 2) == encode
    assert m.flops("rank_cached", 3, 2) == rank
    assert m.flops("full_forward", 3, 2) == encode + rank


def test_full_pass_is_designs_formula_in_flops_less_the_last_layers_history_rows():
    # DESIGN: N [12 (n+m) d^2 + 2 n^2 d + 4 m n d] in multiply-adds for the d^2 term (ffn = 4d),
    # i.e. 24 (n+m) d^2 FLOPs. The last layer's history rows only run their QKV projection
    # (6 n d^2); the score head adds 2 m d.
    N, d, n, m = 8, 512, 4096, 256
    model = ModelShape("transformer", N, d, 8, 4 * d, 2, short_term_tokens=0)
    design = N * (24 * (n + m) * d * d + 2 * n * n * d + 4 * m * n * d)
    last_layer_history = 24 * n * d * d + 2 * n * n * d - 6 * n * d * d
    assert model.flops("full_forward", n, m) == design - last_layer_history + 2 * m * d


def test_bytes_weights_once_plus_kv():
    m = ModelShape("transformer", layers=2, d_model=4, heads=2, ffn=8, dtype_bytes=2, short_term_tokens=1)
    kv, weights = 2 * 2 * 4 * 2, 2 * (4 * 16 + 2 * 4 * 8) * 2
    assert m.kv_bytes_per_token == kv
    assert m.bytes("prefix_reload", 3, 2) == 3 * kv
    assert m.bytes("prefix_encode", 3, 2) == weights + 2 * 3 * kv            # write + read L
    assert m.bytes("rank_cached", 3, 2) == weights + (3 + 2 * 3) * kv         # read L, write+read s+M
    assert m.bytes("full_forward", 3, 2) == weights + 2 * (3 + 3) * kv


# ------------------------------------------------------------------ regimes
def test_compute_bound_at_long_history_launch_bound_at_short():
    r = Roofline(GR, H100, Efficiency(0.4, 0.7), launches_per_layer=12)
    overhead = r.launches * H100.launch_overhead_us / 1e3
    L, M = 16384, 1024
    compute = GR.flops("full_forward", L, M) / (989e12 * 0.4) * 1e3
    memory = GR.bytes("full_forward", L, M) / (3350e9 * 0.7) * 1e3
    assert compute > 10 * memory and compute > 5 * overhead
    assert r.time_ms("full_forward", L, M) == pytest.approx(compute + overhead)
    short = r.time_ms("full_forward", 16, 1)
    assert overhead / short > 0.95                     # launches are nearly all of it
    # the prefix reload is bandwidth over the host link plus one launch
    assert r.time_ms("prefix_reload", 4096) == pytest.approx(
        4096 * GR.kv_bytes_per_token / (64e9 * 0.7) * 1e3 + 5e-3)


# ------------------------------------------------------------------ fitting
def synthetic_table(folder, eff: Efficiency, device: dict, model: ModelShape = GR,
                    peaks: Peaks = H100, launches_per_layer: int = 12) -> str:
    """A table whose medians are exactly a roofline with efficiencies `eff`."""
    r = Roofline(model, peaks, eff, launches_per_layer)
    Ls, Ms = (256, 1024, 4096, 8192, 16384), (32, 128, 512, 1024)
    rows = []
    for ph in ("full_forward", "rank_cached", "prefix_encode", "prefix_reload"):
        shapes = itertools.product(Ls, Ms) if ph in ("full_forward", "rank_cached") else ((L, 0) for L in Ls)
        for L, M in shapes:
            t = float(r.time_ms(ph, L, M))
            rows += [(ph, "isolated", L, M, q, t * k, 50) for q, k in ((0.1, 0.9), (0.5, 1.0), (0.9, 1.2))]
    frame = pd.DataFrame(rows, columns=["phase", "condition", "history_len", "candidates",
                                        "quantile", "time_ms", "n_samples"])
    write_table(frame, folder, {
        "format_version": 1, "name": folder.name, "label": "illustrative", "device": device,
        "date": "2026-11-23", "grid": {"history_len": list(Ls), "candidates": list(Ms)},
        "model": {"arch": model.arch, "layers": model.layers, "d_model": model.d_model,
                  "heads": model.heads, "ffn": model.ffn, "dtype": "bfloat16",
                  "short_term_tokens": model.short_term_tokens,
                  "kv_bytes_per_token": model.kv_bytes_per_token}})
    return str(folder)


def test_fit_recovers_known_efficiencies(tmp_path):
    truth = Efficiency(compute=0.3, memory=0.6, launch_scale=4.0)
    ref = synthetic_table(tmp_path / "t", truth, {"name": "NVIDIA H100 80GB HBM3", "kind": "cuda"})
    fit = fit_table(ref)
    assert fit.device_source == "h100"
    e = fit.efficiency
    assert (e.compute, e.memory, e.launch_scale) == pytest.approx((0.3, 0.6, 4.0), rel=1e-4)
    assert fit.roofline.per_call_overhead_ms == pytest.approx(96 * 5e-3 * 4.0, rel=1e-4)
    for err in fit.relative_errors().values():
        assert err.max() < 1e-4


def test_fit_uses_peaks_recorded_in_the_manifest(tmp_path):
    npu = Peaks("Acme NPU", 200.0, 1000.0, 16.0, 20.0)
    truth = Efficiency(0.5, 0.8, 2.0)
    device = {"name": "Acme NPU", "kind": "npu", "peak_tflops": 200.0, "hbm_gbps": 1000.0,
              "host_link_gbps": 16.0, "launch_overhead_us": 20.0}
    fit = fit_table(synthetic_table(tmp_path / "t", truth, device, peaks=npu))
    assert fit.device_source == "manifest"
    assert (fit.efficiency.compute, fit.efficiency.memory) == pytest.approx((0.5, 0.8), rel=1e-4)


def test_fit_needs_known_peaks(tmp_path):
    ref = synthetic_table(tmp_path / "t", Efficiency(0.3, 0.6), {"name": "Acme NPU"})
    with pytest.raises(InputError, match="no device preset matches 'Acme NPU'; add peak_tflops"):
        fit_table(ref)


def test_carrying_to_another_device_scales_as_its_peaks_say(tmp_path):
    truth = Efficiency(0.3, 0.6, 4.0)
    ref = synthetic_table(tmp_path / "t", truth, {"name": "NVIDIA H100 80GB HBM3", "kind": "cuda"})
    slow = DeviceSpec(name="half", hbm_bytes=10**11, peak_tflops=989.0 / 2, hbm_gbps=3350.0 / 2,
                      host_link_gbps=16.0, launch_overhead_us=10.0, host_dram_bytes=10**12)
    cfg = RooflineService(kind="roofline", fit_from=ref,
                          model={"layers": 8, "d_model": 512, "heads": 8, "ffn": 2048})
    src = RooflinePhases.from_config(cfg, DeviceSpec(**PRESETS["h100"]), np.random.default_rng(0), "x")
    dst = RooflinePhases.from_config(cfg, slow, np.random.default_rng(0), "x")
    assert dst.roofline.eff == src.roofline.eff == fit_table(ref).efficiency
    o_src, o_dst = src.roofline.per_call_overhead_ms, dst.roofline.per_call_overhead_ms
    assert o_dst == pytest.approx(2 * o_src)                         # launch overhead 5 -> 10 us
    for ph, L, M in (("full_forward", 16384, 1024), ("prefix_encode", 8192, 0)):
        assert dst.median(ph, L, M) - o_dst == pytest.approx(2 * (src.median(ph, L, M) - o_src))
    reload_src = src.median("prefix_reload", 4096) - o_src / src.roofline.launches
    reload_dst = dst.median("prefix_reload", 4096) - o_dst / dst.roofline.launches
    assert reload_dst == pytest.approx(4 * reload_src)               # host link 64 -> 16 GB/s


def test_the_measured_h100_table_fits_within_a_band():
    fit = fit_table("h100_gr_base")
    assert fit.device_source == "h100"
    assert 0.2 < fit.efficiency.compute < 1 and 1.0 < fit.roofline.per_call_overhead_ms < 6.0
    errs = fit.relative_errors()
    assert np.median(errs["full_forward"]) < 0.15 and np.median(errs["rank_cached"]) < 0.15


# ------------------------------------------------------------------ the service
def test_noise_is_median_preserving():
    r = Roofline(GR, H100, Efficiency(0.4, 0.7))
    phases = RooflinePhases(r, np.random.default_rng(1), cv=0.3)
    draws = np.array([phases.phase("rank_cached", 4096, 256) for _ in range(40_000)])
    t = phases.median("rank_cached", 4096, 256)
    assert t == pytest.approx(float(r.time_ms("rank_cached", 4096, 256)))
    assert np.median(draws) == pytest.approx(t, rel=0.01)
    assert draws.mean() == pytest.approx(t * math.sqrt(1 + 0.3**2), rel=0.01)
    assert draws.std() / draws.mean() == pytest.approx(0.3, rel=0.05)
    quiet = RooflinePhases(r, np.random.default_rng(1))
    assert quiet.sample(4096, 256) == quiet.median("full_forward", 4096, 256)
    assert quiet.check(np.array([1, 10**7]), np.array([1, 10**5])) == 0
    assert quiet.prefix_bytes(1000) == 1000 * GR.kv_bytes_per_token


def relay_roofline(service: dict, **relay) -> simrec.Scenario:
    return validate({
        "name": "roofline-relay",
        "workload": {"rate_qps": 150,
                     "users": {"count": 2000, "zipf_s": 0.8,
                               "history_len": {"kind": "uniform", "low": 1024, "high": 16384},
                               "sessions": {"mean_requests": 3, "mean_gap_s": 1.0}},
                     "candidates": {"kind": "constant", "value": 256}},
        "stages": {
            "retrieval": {"nodes": {"count": 4, "device": "cpu"}, "router": "shared",
                          "service": {"kind": "exponential", "mean_ms": 3.0}, "hop_ms": 0.5},
            "ranking": {"nodes": {"count": 4, "device": "h100"}, "router": "affinity",
                        "service": service},
        },
        "slo": {"p99_ms": 100.0, "stage_p99_ms": {"ranking": 30.0}},
        "relay": {"stage": "ranking", "signal_after": "retrieval", "trigger": {"kind": "all"},
                  "cache": {"hbm_bytes": 20 * 10**9}, **relay},
        "run": {"requests": 3000, "replications": 2, "seed": 5},
    })


def test_relay_scenario_on_a_roofline_ascend_runs():
    sc = relay_roofline({"kind": "roofline", "device": "ascend910c", "cv": 0.2,
                         "model": {"layers": 8, "d_model": 512, "heads": 8, "ffn": 2048}})
    res = simrec.simulate(sc)
    check_invariants(res)
    assert res.summary["metrics"]["relay"]["prefix_hit_rate"]["mean"] > 0.3
    req = res.requests.to_pandas()
    assert (req["ranking_service_ms"] > 0).all()


def test_relay_scenario_with_efficiencies_fitted_on_the_h100_table_runs():
    sc = relay_roofline({"kind": "roofline", "device": "ascend910c", "fit_from": "h100_gr_base",
                         "model": {"layers": 8, "d_model": 512, "heads": 8, "ffn": 2048}})
    res = simrec.simulate(sc)
    check_invariants(res)
    # with cv = 0 a cache hit costs exactly the carried roofline's rank_cached time
    phases = RooflinePhases.from_config(sc.stages["ranking"].service, sc.device("ascend910c"),
                                        np.random.default_rng(0), "x")
    req = res.requests.to_pandas()
    hits = req[req["ranking_prefix"] == "hit"]
    assert len(hits) > 0
    expect = [phases.median("rank_cached", L, M) for L, M in zip(hits["history_len"], hits["candidates"])]
    np.testing.assert_allclose(hits["ranking_service_ms"], expect, rtol=1e-9)


def test_roofline_without_a_device_is_an_input_error():
    cfg = RooflineService(kind="roofline")
    with pytest.raises(InputError, match="needs a device"):
        RooflinePhases.from_config(cfg, None, np.random.default_rng(0), "stages.r.service")
