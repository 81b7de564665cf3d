"""The operator graphs (simrec.operators): DESIGN's FLOP formula, and the real model's GEMMs."""

from __future__ import annotations

import numpy as np
import pytest

from simrec import operators as opg
from simrec.roofline import ModelShape


def design_flops(arch, N, d, f, s, L, M):
    """DESIGN.md's formulas in FLOPs, written out by hand: per layer c FLOPs per token of the
    linear layers, causal attention 2 L^2 d, target attention 4 (M+s)(L+s) d; the last layer
    of a history pass runs only its projection p; the score head 2 M d."""
    c, p = (10 * d * d, 8 * d * d) if arch == "hstu" else (8 * d * d + 4 * d * f, 6 * d * d)
    q = M + s
    enc = (N - 1) * (c * L + 2 * L * L * d) + p * L
    rank = N * (c * q + 4 * q * (L + s) * d) + 2 * M * d
    return {"prefix_encode": enc, "rank_cached": rank, "full_forward": enc + rank}


@pytest.mark.parametrize("arch", opg.ARCHS)
@pytest.mark.parametrize("N, d, f, h, s", [(24, 1024, 4096, 4, 32), (8, 512, 2048, 8, 0), (1, 64, 96, 2, 5)])
def test_graph_flops_are_designs_formula_exactly(arch, N, d, f, h, s):
    spec = ModelShape(arch, N, d, h, f, 2, s)
    for L, M in [(1024, 64), (32768, 512), (3, 1), (4097, 333)]:
        want = design_flops(arch, N, d, f, s, L, M)
        for phase in opg.PHASES:
            assert opg.flops(spec, phase, L, M) == want[phase], (phase, L, M)


def test_roofline_counts_the_declared_graph_also_over_arrays():
    spec = ModelShape("hstu", 24, 1024, 4, 4096, 2, 32)
    L, M = np.array([1024, 8192]), np.array([64, 512])
    for phase in opg.PHASES:
        got = spec.flops(phase, L, M)
        assert got.tolist() == [opg.flops(spec, phase, int(a), int(b)) for a, b in zip(L, M)]


@pytest.mark.parametrize("arch", opg.ARCHS)
def test_graph_matches_what_the_torch_model_executes(arch):
    """GEMM FLOPs equal torch's own count of the model's addmm calls, phase by phase; the
    attention ops' shapes equal its batched matmuls (HSTU; at this L one query block)."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from simrec.calibration.gr_models import GRSpec, build_model
    sp = GRSpec(arch=arch, layers=3, d_model=32, heads=4, ffn=48, dtype="float32", short_term_tokens=3)
    model = build_model(sp, "cpu")
    L, M = 20, 5
    g = torch.Generator().manual_seed(0)
    h, s, c = (torch.randn(1, t, 32, generator=g) for t in (L, 3, M))
    with torch.inference_mode():
        kv = model.encode_prefix(h)
        calls = {"prefix_encode": lambda: model.encode_prefix(h),
                 "rank_cached": lambda: model.rank_cached(kv, s, c),
                 "full_forward": lambda: model.full_forward(h, s, c)}
        for phase, fn in calls.items():
            with FlopCounterMode(display=False) as fc:
                fn()
            counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
            blocks = opg.graph(sp, phase, L, M)
            gemm = sum(b.repeat * op.flops for b in blocks for op in b.ops if op.kind == "gemm")
            assert counts["aten.addmm"] == gemm, phase
            if arch == "hstu":      # dense pointwise attention: QK^T and AV over every pair
                dense = sum(b.repeat * 4 * op.dims[0] * op.dims[1] * op.dims[2]
                            for b in blocks for op in b.ops if op.kind in ("attn_causal", "attn_target"))
                assert counts["aten.bmm"] == dense, phase


def test_unknown_arch_and_phase_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown arch 'rnn'"):
        opg.graph(ModelShape("rnn", 2, 8, 2, 8, 2), "full_forward", 4, 2)
    with pytest.raises(ValueError, match="no operator graph for phase 'prefix_reload'"):
        opg.graph(ModelShape("hstu", 2, 8, 2, 8, 2), "prefix_reload", 4, 2)
    with pytest.raises(ValueError, match="no operator graph for phase 'rank_cached' of stca"):
        opg.graph(ModelShape("stca", 2, 8, 2, 8, 2), "rank_cached", 4, 2)


def test_hstu_causal_attention_launches_follow_the_models_query_blocks():
    """10 kernels per query block (+1 cat of the blocks), the blocks as HSTUBlock makes them
    (the profile of prefix_encode at L=16384 showed 2098 kernels, as the graph counts)."""
    pytest.importorskip("torch")
    from simrec.calibration.gr_models import HSTUBlock
    assert opg.HSTU_QUERY_CHUNK_ELEMS == HSTUBlock.QUERY_CHUNK_ELEMS
    assert opg.attn_launches("hstu", "causal", 1024, 4) == 10
    assert opg.attn_launches("hstu", "causal", 16384, 4) == 8 * 10 + 1     # blocks of 2048 rows
    spec = ModelShape("hstu", 24, 1024, 4, 4096, 2, 32)
    assert opg.total(opg.graph(spec, "prefix_encode", 16384, 0), "launches") == 2098
    assert opg.total(opg.graph(spec, "rank_cached", 16384, 64), "launches") == 411


# ------------------------------------------------------------ the target-attention archs
def target_flops(arch, N, d, f, k, seg, L, M):
    """The roofline's closed forms for arch_models' phases (f the SwiGLU width, k VISTA's
    summary tokens, S = ceil(L / seg) LASER's segments, P = S seg the padded history), as
    simrec.roofline wrote them before it read the graphs. They leave out the score head."""
    if arch == "stca":
        enc = N * L * (6 * d * f + 4 * d * d)
        att = M * (6 * d * f + N * (4 * d * d + 4 * L * d) + (N - 1) * 4 * d * d)
        return {"stca_history_encode": enc, "stca_target_attend": att,
                "stca_per_target": M * enc + att, "full_forward": enc + att}
    if arch == "vista":
        summ = N * (4 * L * d * d + 4 * k * L * d + 4 * k * d * d + 6 * k * d * f)
        rank = N * (4 * k * d * d + 4 * M * d * d + 4 * M * k * d + 6 * M * d * f)
        return {"vista_summarize": summ, "vista_rank_summary": rank, "full_forward": summ + rank}
    S = -(-L // seg)
    P = S * seg
    enc = 4 * L * d * d
    sta = M * (6 * d * f + 2 * d * d + 4 * P * d) + N * M * (4 * d * d + 4 * S * d + 6 * d * f)
    return {"laser_history_encode": enc, "laser_sta_rank": sta, "full_forward": enc + sta}


@pytest.mark.parametrize("arch", opg.TARGET_ARCHS)
@pytest.mark.parametrize("N, d, f, h, k, seg", [(4, 1024, 2048, 16, 128, 128), (24, 4096, 16384, 32, 256, 64),
                                                (1, 32, 48, 2, 5, 7)])
def test_target_arch_graph_flops_are_the_rooflines_formula_exactly(arch, N, d, f, h, k, seg):
    """The graph counts what arch_models runs, which is the formula plus the d -> 1 score head
    (2 M d) of every phase that scores: the formula left the head out. The roofline keeps the
    formula's numbers by leaving the head out too."""
    spec = ModelShape(arch, N, d, h, f, 2, 0, k, seg)
    for L, M in [(4096, 256), (32768, 1000), (1, 1), (4097, 333), (200, 8)]:
        want = target_flops(arch, N, d, f, k, seg, L, M)
        for phase, dims in opg.ARCH_PHASES[arch]:
            head = 2 * M * d if "M" in dims else 0
            assert opg.flops(spec, phase, L, M) == want[phase] + head, (phase, L, M)
            assert spec.flops(phase, L if "L" in dims else 0, M) == want[phase], (phase, L, M)


@pytest.mark.parametrize("arch", opg.TARGET_ARCHS)
def test_target_arch_roofline_counts_the_graph_over_arrays(arch):
    spec = ModelShape(arch, 4, 1024, 16, 2048, 2, 0, 128, 128)
    L, M = np.array([1000, 4096, 30000]), np.array([64, 2000, 7])
    for phase, _ in opg.ARCH_PHASES[arch]:
        got = spec.flops(phase, L, M)
        assert got.tolist() == [spec.flops(phase, int(a), int(b)) for a, b in zip(L, M)], phase


@pytest.mark.parametrize("arch", opg.TARGET_ARCHS)
def test_target_arch_graph_matches_what_the_torch_model_executes(arch):
    """Every FLOP torch counts in the phase (GEMMs, the score head, SDPA's math backend,
    LASER's score and AV matmuls) is one the graph declares, at shapes where STCA's no-RLB
    pass and LASER's STA run in several chunks; and the chunk sizes are the models'."""
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from simrec.calibration import arch_models as am
    assert (opg.STCA_CHUNK_TOKENS, opg.LASER_QUERY_CHUNK_ELEMS) == (am.ArchSpec().chunk_tokens,
                                                                   am.QUERY_CHUNK_ELEMS)
    assert {a: tuple((n, "".join(p.dims)) for n, p in r.items()) for a, r in am.REGISTRY.items()} \
        == opg.ARCH_PHASES
    sp = am.ArchSpec(arch=arch, layers=3, d_model=32, heads=4, ffn=48, dtype="float32",
                     summary_tokens=6, segment_len=16, chunk_tokens=100)
    model = am.build_arch_model(sp, "cpu").requires_grad_(False)
    for L, M in ((40, 7), (48, 3)):
        for name, p in am.REGISTRY[arch].items():
            Lr, Mr = p.shape(L, M)
            inputs = p.inputs(model, Lr, Mr, lambda t: torch.randn(1, t, 32))
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                p.run(model, *inputs)
            assert fc.get_total_flops() == opg.flops(sp, name, Lr, Mr), (name, L, M)


def test_target_arch_chunked_loops_follow_the_models_chunks():
    """STCA without RLB runs ceil(M / (chunk_tokens // L)) chunks and cats their scores; LASER's
    STA runs ceil(M / (QUERY_CHUNK_ELEMS // (h L))) query chunks: their launches scale so."""
    from dataclasses import replace
    spec = ModelShape("stca", 4, 1024, 16, 2048, 2, 0, 128, 128)
    one = opg.total(opg.graph(spec, "stca_per_target", 4096, 128), "launches")   # 128 per chunk
    two = opg.total(opg.graph(spec, "stca_per_target", 4096, 200), "launches")
    assert two == 2 * one + 1
    laser = replace(spec, arch="laser")
    sta = [op for op in opg.ops(opg.graph(laser, "laser_sta_rank", 32768, 600)) if op.kind == "attn_segmented"]
    assert [op.dims[0] for op in sta] == [256, 256, 88]       # 2^27 // (16 x 32768) = 256 queries
    assert all(op.launches == 17 for op in sta)                # 32768 is whole segments: no padding
    assert opg.ops(opg.graph(laser, "laser_sta_rank", 4000, 8))[7].launches == 25
