"""The operator graph of each GR architecture's serving phases, declared once.

A phase of a ranking model (``prefix_encode``, ``rank_cached``, ``full_forward``) is the
sequence of operators ``calibration/gr_models.py`` issues for one request of L history
tokens and M candidates: GEMMs by (m, n, k), attention by its shape and mask kind, the K/V
stores and concatenations and the head merges (by the memory layout they copy, which decides
the kernel PyTorch picks), and the element-wise and norm layers by element count. Each
operator's kernel count is the one a torch.profiler trace of the real phases showed
(calibration/kernel_grids/h200_phase_profile). The roofline
(`simrec.roofline`) sums the graph's FLOPs, the kernel cost model (`simrec.kernel_model`)
looks every operator up in a measured kernel table, and the kernel grid benchmark
(`calibration/kernel_grid.py`) measures the shapes the graphs use: nobody writes a phase's
cost formula a second time.

FLOPs follow DESIGN.md's convention: 2 m n k per GEMM (the linear layers and the scoring
head), and for attention the multiply-adds of the pairs a query may see, counted at full
width d whatever the head split: causal self-attention over L tokens ``2 L^2 d`` (half of
``4 L^2 d``), and the suffix's target attention ``4 q (L + s) d`` (each of q = s + M rows
sees the history and the short-term tokens; a candidate's own key is left out, as in
DESIGN's ``4 m n d``). Element-wise, norm and copy operators count no FLOPs, only bytes.

The graphs follow the model as written, which differs from an idealised count in one
place: the last layer computes the full projection (Q, K and V; HSTU's fused U, V, Q, K) of
its history rows although only K and V are kept, and skips the rest of the layer.

Dims may be numpy arrays (L and M broadcast), so the roofline evaluates a grid at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARCHS = ("transformer", "hstu")
PHASES = ("prefix_encode", "rank_cached", "full_forward")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
# Element-wise kinds (kernel names in a kernel table) and the bytes they move per element,
# in elements: read + write (add and mul read two inputs).
ELTWISE_PASSES = {"layer_norm": 2, "gelu": 2, "silu": 2, "add": 3, "mul": 3, "copy": 2}
# Copies whose kernel depends on the heads' memory layout (so a kernel table keys them by heads;
# attn_concat by the arch too, whose attention output layout it copies).
LAYOUT_KINDS = ("kv_concat", "attn_concat", "kv_store", "head_copy")


@dataclass(frozen=True, slots=True)
class Op:
    """One operator of a phase. ``dims`` by kind: gemm (m, n, k), i.e. [m, k] x [k, n];
    attn_causal (L, L, d); attn_target (queries, keys, d) under the suffix mask of
    gr_models.suffix_mask; kv_concat and attn_concat (a, b, d): [h, a, hd] ++ [h, b, hd] along
    the sequence; kv_store and head_copy (tokens, d); an element-wise kind (elements,).
    ``launches`` is how many kernels eager PyTorch issues for it (the host's share of its cost)."""

    kind: str
    dims: tuple
    flops: object
    bytes: object
    launches: object = 1
    name: str = ""


@dataclass(frozen=True, slots=True)
class Block:
    """Operators issued in this order, ``repeat`` times back to back (a run of layers)."""

    ops: tuple[Op, ...]
    repeat: int = 1


def dtype_bytes(spec) -> int:
    b = getattr(spec, "dtype_bytes", None)
    return int(b) if b else DTYPE_BYTES[spec.dtype]


def gemm(m, n, k, b: int, name: str) -> Op:
    """A linear layer: x [m, k] times W^T [k, n] (+ bias): read x and W, write the output."""
    return Op("gemm", (m, n, k), 2 * m * n * k, (m * k + n * k + m * n) * b, 1, name)


def eltwise(kind: str, elements, b: int, name: str) -> Op:
    return Op(kind, (elements,), 0, ELTWISE_PASSES[kind] * elements * b, 1, name)


def attn_causal(L, d: int, b: int, launches) -> Op:
    return Op("attn_causal", (L, L, d), 2 * L * L * d, 4 * L * d * b, launches, "attn_causal")


def attn_target(q, keys, context, d: int, b: int, launches) -> Op:
    """q suffix rows over `keys` keys, of which `context` (history + short-term) every row sees."""
    return Op("attn_target", (q, keys, d), 4 * q * context * d, (2 * q + 2 * keys) * d * b,
              launches, "attn_target")


def kv_concat(a, c, d: int, b: int, name: str = "kv_concat", kind: str = "kv_concat") -> Op:
    """``torch.cat`` along the sequence. kv_concat: the cached K (or V), contiguous, with the
    suffix's, a strided head view of the projection, which sends PyTorch to its slow
    non-vectorised cat (~6x the contiguous one's time on the H200, profiled). attn_concat:
    full_forward's history and suffix attention outputs, in the layout the arch's attention
    writes them (SDPA's [B, L, h, hd] strided; HSTU's matmul contiguous)."""
    return Op(kind, (a, c, d), 0, 2 * (a + c) * d * b, 1, name)


def head_op(kind: str, t, d: int, b: int, name: str) -> Op:
    """kv_store: a strided head view of the projection copied into the K/V cache (``copy_``);
    head_copy: attention output [h, t, hd] merged to [t, h * hd] (a transposing copy)."""
    return Op(kind, (t, d), 0, 2 * t * d * b, 1, name)


# gr_models.HSTUBlock.QUERY_CHUNK_ELEMS: HSTU's causal attention runs in query blocks of at most
# this many scores (tests/test_operators.py checks the two agree).
HSTU_QUERY_CHUNK_ELEMS = 1 << 27


def attn_launches(arch: str, kind: str, L, heads: int):
    """Kernels eager PyTorch issues per attention call, as profiled on the H200 (torch 2.11):
    SDPA causal 1; SDPA with the boolean target mask 4 (two fills and a where make the additive
    mask, then the kernel); HSTU target 7 (mask cast, QK^T, scale, SiLU, mask, normalise, AV);
    HSTU causal 10 per query block (two aranges, a compare and a cast make the block's mask,
    then the six) and a cat of the blocks when there are several."""
    if arch == "transformer":
        return 1 if kind == "causal" else 4
    if kind == "target":
        return 7
    step = np.maximum(1, HSTU_QUERY_CHUNK_ELEMS // np.maximum(1, heads * L))
    blocks = -(-L // step)
    return 10 * blocks + (blocks > 1)


def _layer(spec, t, b: int, attn: tuple[Op, ...], finish_rows=None, extra: tuple[Op, ...] = (),
           merged: bool = True):
    """One block over t tokens: the projection, then `extra` (the K/V stores or
    concatenations), then `attn`, then the rest of the layer on `finish_rows` rows (default
    t; fewer in the last layer of a full pass). `merged`: the attention output is already in
    token order (SDPA writes [B, L, h, hd]), so merging the heads is a view, not a copy."""
    d, f = spec.d_model, spec.ffn
    r = t if finish_rows is None else finish_rows
    if spec.arch == "transformer":
        proj = (eltwise("layer_norm", t * d, b, "ln1"), gemm(t, 3 * d, d, b, "qkv"))
        rest = (() if merged else (head_op("head_copy", r, d, b, "merge_heads"),)) + (
            gemm(r, d, d, b, "out"), eltwise("add", r * d, b, "residual1"),
            eltwise("layer_norm", r * d, b, "ln2"), gemm(r, f, d, b, "ff1"),
            eltwise("gelu", r * f, b, "gelu"), gemm(r, d, f, b, "ff2"),
            eltwise("add", r * d, b, "residual2"))
    elif spec.arch == "hstu":
        proj = (eltwise("layer_norm", t * d, b, "norm"), gemm(t, 4 * d, d, b, "f1_uvqk"),
                eltwise("silu", t * 4 * d, b, "silu"))
        rest = (head_op("head_copy", r, d, b, "merge_heads"), eltwise("layer_norm", r * d, b, "attn_norm"),
                eltwise("mul", r * d, b, "gate_u"), gemm(r, d, d, b, "f2"),
                eltwise("add", r * d, b, "residual"))
    else:
        raise ValueError(f"unknown arch {spec.arch!r} (operator graphs: {', '.join(ARCHS)})")
    return proj + extra + attn + (rest if attn else ())


def graph(spec, phase: str, L, M) -> list[Block]:
    """The operator graph of one request's phase at shape (L, M), as gr_models.GRModel runs it.

    `spec`: anything with arch, layers, d_model, heads, ffn, short_term_tokens and dtype
    (or dtype_bytes): a gr_models.GRSpec, a roofline.ModelShape, a scenario's model block.
    """
    if spec.arch not in ARCHS:
        raise ValueError(f"unknown arch {spec.arch!r} (operator graphs: {', '.join(ARCHS)})")
    N, d, s, b, a = spec.layers, spec.d_model, spec.short_term_tokens, dtype_bytes(spec), spec.arch
    q, T = s + M, L + s + M
    causal = attn_causal(L, d, b, attn_launches(a, "causal", L, spec.heads))
    suffix = attn_target(q, T, L + s, d, b, attn_launches(a, "target", L, spec.heads))
    head = (eltwise("layer_norm", M * d, b, "final_norm"), gemm(M, 1, d, b, "score_head"))
    if phase == "prefix_encode":
        store = (head_op("kv_store", L, d, b, "k_store"), head_op("kv_store", L, d, b, "v_store"))
        layer = _layer(spec, L, b, (causal,), extra=store)
        last = _layer(spec, L, b, (), extra=store)      # K/V only: no attention, no MLP
        return [Block(layer, N - 1), Block(last)]
    if phase == "rank_cached":
        cat = (kv_concat(L, q, d, b, "k_concat"), kv_concat(L, q, d, b, "v_concat"))
        layer = _layer(spec, q, b, (suffix,), extra=cat)
        return [Block((eltwise("copy", q * d, b, "cat_inputs"),)), Block(layer, N), Block(head)]
    if phase == "full_forward":
        hist = (suffix, causal, kv_concat(L, q, d, b, "cat_attn", "attn_concat"))
        return [Block((eltwise("copy", T * d, b, "cat_inputs"),)),
                Block(_layer(spec, T, b, hist, merged=False), N - 1),
                Block(_layer(spec, T, b, (suffix,), finish_rows=q)), Block(head)]
    raise ValueError(f"no operator graph for phase {phase!r} (have {', '.join(PHASES)})")


def ops(blocks: list[Block]) -> list[Op]:
    """The graph's operators in issue order, each repeat written out."""
    return [op for blk in blocks for _ in range(blk.repeat) for op in blk.ops]


def total(blocks: list[Block], field: str = "flops"):
    """Sum of an operator field (flops, bytes or launches) over the graph."""
    return sum(blk.repeat * sum(getattr(op, field) for op in blk.ops) for blk in blocks)


def flops(spec, phase: str, L, M):
    return total(graph(spec, phase, L, M), "flops")
