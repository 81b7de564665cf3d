"""The target-attention archs of calibration/arch_models.py (issue 16): phases compose to the full
pass, the registry, the roofline's formulas against torch's FLOP counter, and bench tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simrec import roofline  # noqa: E402
from simrec.calibration import arch_models as am  # noqa: E402
from simrec.calibration import bench  # noqa: E402
from simrec.calibration.table import PHASES as TABLE_PHASES, load_table  # noqa: E402

FORMAT_MD = Path(__file__).parent.parent / "calibration" / "FORMAT.md"


def spec(arch, **kw):
    base = dict(arch=arch, layers=2, d_model=32, heads=4, ffn=48, dtype="float32", summary_tokens=8,
                segment_len=16, chunk_tokens=100)
    return am.ArchSpec(**{**base, **kw})


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ composed == full
@pytest.mark.parametrize("arch", am.ARCHS)
@pytest.mark.parametrize("L", [64, 75])          # 75: LASER's last segment padded
def test_phases_compose_to_the_full_pass(arch, L):
    model = am.build_arch_model(spec(arch), "cpu")
    check = am.self_check(model, "cpu", L=L, M=7)
    assert len(check) >= 2
    for name, err in check.items():
        assert err < 1e-5, (name, check)


@pytest.mark.parametrize("arch", am.ARCHS)
def test_a_candidate_moves_only_its_own_score(arch):
    model = am.build_arch_model(spec(arch), "cpu")
    g = torch.Generator().manual_seed(3)
    h, c = torch.randn(1, 50, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    c2 = c.clone()
    c2[:, 2] = torch.randn(32, generator=g)
    with torch.inference_mode():
        a, b = model.full_forward(h, c), model.full_forward(h, c2)
    moved = (a - b).abs()[0]
    assert moved[2] > 1e-4 and torch.all(moved[[0, 1, 3, 4]] < 1e-6)


def test_stca_without_rlb_equals_rlb_over_several_chunks():
    model = am.build_arch_model(spec("stca", chunk_tokens=60), "cpu")   # 2 targets per chunk at L=30
    g = torch.Generator().manual_seed(4)
    h, c = torch.randn(2, 30, 32, generator=g), torch.randn(2, 5, 32, generator=g)   # batch 2 too
    with torch.inference_mode():
        full = model.full_forward(h, c)
        per = model.per_target(h, c)
        rlb = model.target_attend(model.history_encode(h), c)
    assert torch.allclose(per, full, atol=1e-5) and torch.equal(rlb, full)


def test_laser_query_chunks_and_silenced_segments(monkeypatch):
    model = am.build_arch_model(spec("laser"), "cpu")
    g = torch.Generator().manual_seed(5)
    h, c = torch.randn(1, 40, 32, generator=g), torch.randn(1, 9, 32, generator=g)
    with torch.inference_mode():
        whole = model.full_forward(h, c)
        monkeypatch.setattr(am, "QUERY_CHUNK_ELEMS", 4 * 40 * 2)      # 2 candidates per chunk
        chunked = model.full_forward(h, c)
        # a large gate offset silences every segment: the scores no longer depend on the history
        model.tau.fill_(1e4)
        silent = model.full_forward(h, c)
        other = model.full_forward(torch.randn(1, 40, 32, generator=g), c)
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.allclose(silent, other, atol=1e-6) and not torch.allclose(silent, whole, atol=1e-3)


def test_vista_ranking_is_flat_in_history_length():
    model = am.build_arch_model(spec("vista"), "cpu")
    with torch.inference_mode():
        shapes = {model.summarize(torch.randn(1, L, 32)).shape for L in (10, 100, 1000)}
    assert shapes == {(1, 8, 32)}                  # the summary, all rank_summary sees, is k x d


# ------------------------------------------------------------------ one declaration
def test_the_registry_is_the_one_declaration_everyone_reads():
    for arch, phases in am.REGISTRY.items():
        assert [(n, "".join(p.dims)) for n, p in phases.items()] == list(roofline.ARCH_PHASES[arch])
        assert all(n in TABLE_PHASES for n in phases)
        for path in am.SERVING_PATHS[arch].values():
            assert set(path) <= set(phases)
    assert am.SERVING_PATHS == {a: dict(v) for a, v in roofline.SERVING_PATHS.items()}
    documented = set(re.findall(r"^\| `(\w+)` \|", FORMAT_MD.read_text(), re.M))
    assert {n for p in am.REGISTRY.values() for n in p} <= documented
    assert set(TABLE_PHASES) <= documented


def test_phase_shapes_put_unused_dims_to_zero():
    r = am.REGISTRY
    assert r["vista"]["vista_rank_summary"].shape(4096, 64) == (0, 64)
    assert r["stca"]["stca_history_encode"].shape(4096, 64) == (4096, 0)
    assert r["laser"]["laser_sta_rank"].shape(4096, 64) == (4096, 64)


# ------------------------------------------------------------------ roofline formulas
@pytest.mark.parametrize("arch", am.ARCHS)
def test_roofline_flops_match_torchs_flop_counter(arch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sp = spec(arch, layers=3, d_model=64, heads=4, ffn=128, summary_tokens=16, segment_len=32,
              chunk_tokens=1000)
    model = am.build_arch_model(sp, "cpu").requires_grad_(False)
    shape = roofline.ModelShape(arch, 3, 64, 4, 128, 4, 0, 16, 32)
    for L, M in ((256, 16), (200, 8)):
        for name, p in am.REGISTRY[arch].items():
            Lr, Mr = p.shape(L, M)
            inputs = p.inputs(model, Lr, Mr, lambda t: torch.randn(1, t, 64))
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                p.run(model, *inputs)
            # the formulas leave out the d -> 1 score head (2 d M) and norms
            assert fc.get_total_flops() - 2 * 64 * Mr == pytest.approx(shape.flops(name, Lr, Mr), rel=1e-9), name


def test_roofline_legacy_names_map_onto_the_arch_phases():
    for arch, legacy in roofline.LEGACY.items():
        m = roofline.ModelShape(arch, 4, 1024, 16, 2048, 2, 0, 128, 128)
        for old, new in legacy.items():
            assert m.flops(old, 8192, 256) == m.flops(new, 8192, 256)
            assert m.bytes(old, 8192, 256) == m.bytes(new, 8192, 256)


def test_roofline_shapes_of_the_three_archs():
    m = {a: roofline.ModelShape(a, 4, 1024, 16, 2048, 2, 0, 128, 128) for a in am.ARCHS}
    L = np.array([512, 2048, 8192, 32768])
    # VISTA online is flat in L; STCA's target attention linear; without RLB ~M x the user side
    rank = m["vista"].flops("vista_rank_summary", L, 256)
    assert np.all(rank == rank[0])
    att = m["stca"].flops("stca_target_attend", L, 256)
    assert np.all(np.diff(np.diff(att)[1:] / np.diff(L)[1:]) == 0)
    s = m["stca"]
    for x in (s.flops, s.bytes):
        rlb = x("stca_history_encode", 8192, 0) + x("stca_target_attend", 8192, 256)
        assert x("stca_per_target", 8192, 256) > 100 * rlb
        assert x("full_forward", 8192, 256) <= rlb


# ------------------------------------------------------------------ bench tables
TINY = ["--device", "cpu", "--layers", "1", "--d-model", "32", "--heads", "2", "--ffn", "48",
        "--summary-tokens", "8", "--segment-len", "16", "--history-lens", "32,64,128",
        "--candidates", "4,8", "--conditions", "isolated,idle_gap,cache_pressure", "--gap-ms", "0,0.2",
        "--warmup", "2", "--target-s", "0.003", "--min-samples", "5", "--max-samples", "8",
        "--threads", "1", "--chunk-tokens", "256"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    out = {}
    for arch in am.ARCHS:
        folder = tmp_path_factory.mktemp("arch") / f"cpu_{arch}"
        assert bench.main([*TINY, "--arch", arch, "--out", str(folder)]) == 0
        out[arch] = folder
    return out


@pytest.mark.parametrize("arch", am.ARCHS)
def test_bench_measures_the_registry_phases(tables, arch):
    folder = tables[arch]
    t = load_table(str(folder))
    assert {p for p, _ in t.curves} == set(am.REGISTRY[arch])
    assert {c for _, c in t.curves} == {"isolated", "idle_gap"}       # cache_pressure dropped
    m = t.manifest
    assert m.model["arch"] == arch and list(m.model["phases"]) == list(am.REGISTRY[arch])
    assert m.method["phases_per_condition"] == {c: list(am.REGISTRY[arch]) for c in ("isolated", "idle_gap")}
    for name, p in am.REGISTRY[arch].items():
        c = t.curve(name)
        assert list(c.history_len) == ([32, 64, 128] if "L" in p.dims else [0])
        assert list(c.candidates) == ([4, 8] if "M" in p.dims else [0])


def test_vista_table_is_independent_of_L(tables):
    t = load_table(str(tables["vista"]))
    c = t.curve("vista_rank_summary", "idle_gap")
    assert c.median_ms(512, 8) == c.median_ms(1 << 20, 8)
    assert t.manifest.model["summary_tokens"] == 8


@pytest.mark.parametrize("arch", am.ARCHS)
def test_errors_cover_every_phase_of_the_arch(tables, arch):
    from simrec.calibration.model_errors import compute_errors
    errors = compute_errors(str(tables[arch]))
    roof = errors["roofline"]
    assert "skipped" not in roof, roof
    assert set(roof["phases"]) == set(am.REGISTRY[arch])
    assert all(np.isfinite(s["median"]) for s in roof["phases"].values())


def test_summary_prints_every_phase(tables):
    folder = tables["stca"]
    manifest = json.loads((folder / "manifest.json").read_text())
    import pandas as pd
    text = bench.summarize(pd.read_parquet(folder / "table.parquet"), manifest)
    for name in am.REGISTRY["stca"]:
        assert f"{name} isolated" in text and f"{name} idle_gap" in text


@pytest.mark.parametrize("extra, message", [
    (["--cuda-graphs"], "--cuda-graphs"),
    (["--batch-sizes", "2"], "--batch-sizes is not supported"),
])
def test_bad_arch_options_are_refused(tmp_path, extra, message):
    args = bench.parse_args(["--device", "cpu", "--arch", "stca", "--out", str(tmp_path), *extra])
    with pytest.raises(SystemExit, match=message):
        bench.config_from_args(args)


def test_bad_arch_spec_is_refused():
    with pytest.raises(ValueError, match="multiple of heads"):
        am.ArchSpec(arch="laser", d_model=30, heads=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        am.ArchSpec(arch="hstu")
