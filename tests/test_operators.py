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
    with pytest.raises(ValueError, match="unknown arch 'stca'"):
        opg.graph(ModelShape("stca", 2, 8, 2, 8, 2), "full_forward", 4, 2)
    with pytest.raises(ValueError, match="no operator graph for phase 'prefix_reload'"):
        opg.graph(ModelShape("hstu", 2, 8, 2, 8, 2), "prefix_reload", 4, 2)


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
