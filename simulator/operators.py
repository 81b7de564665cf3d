"""The operator graph of each GR architecture's serving phases, declared once.

A phase of a ranking model (``prefix_encode``, ``rank_cached``, ``full_forward``) is the
sequence of operators ``calibration/gr_models.py`` issues for one request of L history
tokens and M candidates: GEMMs by (m, n, k), attention by its shape and mask kind, the K/V
stores and concatenations and the head merges (by the memory layout they copy, which decides
the kernel PyTorch picks), and the element-wise and norm layers by element count. Each
operator's kernel count is the one a torch.profiler trace of the real phases showed
(calibration/kernel_grids/h200_phase_profile). The target-attention archs of
``calibration/arch_models.py`` (stca, vista, laser; `ARCH_PHASES`) are declared the same way,
their phases by their own names, with attention kinds of their own where their kernel is not
the GR suffix's (``attn_cross``, ``attn_single``, ``attn_segmented``) and launch counts read
off the code, not yet profiled. The roofline
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
# The target-attention archs of calibration/arch_models.py and their own phases, the names and
# dims of its REGISTRY (a test keeps them equal): each phase at the request's (L, M), a dim it
# does not take set to 0 (vista_rank_summary is (0, M): k is the model's, not the request's).
TARGET_ARCHS = ("stca", "vista", "laser")
ARCH_PHASES = {
    "stca": (("stca_history_encode", "L"), ("stca_target_attend", "LM"), ("stca_per_target", "LM"),
             ("full_forward", "LM")),
    "vista": (("vista_summarize", "L"), ("vista_rank_summary", "kM"), ("full_forward", "LM")),
    "laser": (("laser_history_encode", "L"), ("laser_sta_rank", "LM"), ("full_forward", "LM")),
}
# Every attention kind a graph uses; the kernel grids measure attn_causal and attn_target.
ATTENTION_KINDS = ("attn_causal", "attn_target", "attn_cross", "attn_single", "attn_segmented")
# arch_models.ArchSpec.chunk_tokens's default and arch_models.QUERY_CHUNK_ELEMS (a test keeps them equal).
STCA_CHUNK_TOKENS = 1 << 19
LASER_QUERY_CHUNK_ELEMS = 1 << 27
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
    gr_models.suffix_mask; attn_cross, attn_single (queries, keys, d) and attn_segmented
    (queries, padded keys, d), unmasked; kv_concat and attn_concat (a, b, d): [h, a, hd] ++
    [h, b, hd] along the sequence; kv_store and head_copy (tokens, d); an element-wise kind
    (elements,).
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
        raise ValueError(f"unknown arch {spec.arch!r} (operator graphs: {', '.join(ARCHS + TARGET_ARCHS)})")
    return proj + extra + attn + (rest if attn else ())


def graph(spec, phase: str, L, M) -> list[Block]:
    """The operator graph of one request's phase at shape (L, M), as gr_models.GRModel (or,
    for the target-attention archs, arch_models) runs it.

    `spec`: anything with arch, layers, d_model, heads, ffn, short_term_tokens and dtype
    (or dtype_bytes): a gr_models.GRSpec, a roofline.ModelShape, a scenario's model block;
    for stca, vista and laser also summary_tokens, segment_len and chunk_tokens (an
    arch_models.ArchSpec; the ArchSpec defaults where absent).
    """
    if spec.arch in TARGET_ARCHS:
        return _target_graph(spec, phase, L, M)
    if spec.arch not in ARCHS:
        raise ValueError(f"unknown arch {spec.arch!r} (operator graphs: {', '.join(ARCHS + TARGET_ARCHS)})")
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


# ------------------------------------------------------------ the target-attention archs
#
# calibration/arch_models.py's STCA, VISTA and LASER, layer by layer as their forward passes
# issue kernels. Launch counts are read off the code (one per Linear, norm, activation, SDPA
# call and materialising copy; views, chunks and head splits none), not profiled.

def _max1(x):
    return np.maximum(1, x) if isinstance(x, np.ndarray) else max(1, x)


def _chunks(M, step, ops_of) -> list[Block]:
    """A loop over M rows in chunks of `step` (the last one shorter): full chunks as one
    repeated block, the rest as a block run once or not at all (dims may be arrays)."""
    rem = M % step
    return [Block(ops_of(step), M // step), Block(ops_of(rem), 1 * (rem > 0))]


def attn_cross(q, keys, d: int, b: int, name: str = "attn_cross") -> Op:
    """Unmasked SDPA of q queries over one shared set of `keys` keys (STCA's candidates over
    the history K/V, VISTA's summary or candidate queries): one kernel."""
    return Op("attn_cross", (q, keys, d), 4 * q * keys * d, (2 * q + 2 * keys) * d * b, 1, name)


def attn_single(q, keys, d: int, b: int, name: str = "attn_single") -> Op:
    """q one-query SDPAs batched, each over its own `keys` keys (STCA without RLB, each target
    over its copy of the history; LASER's GSTA over each target's segment summaries)."""
    return Op("attn_single", (q, keys, d), 4 * q * keys * d, (2 * q + 2 * q * keys) * d * b, 1, name)


def attn_segmented(q, L, d: int, heads: int, seg: int, b: int) -> Op:
    """LASER's segmented target attention (LASERModel._segments) for q targets over L history
    tokens padded to P = S x seg: QK^T over all P keys, softmax and logsumexp per segment, the
    sigmoid gate, then the per-segment AV; dims (q, P, d). Eager it materialises the [h, q, P]
    score block (written, scaled, softmaxed, copied for the AV matmul: ~5 passes) and the
    [q, S, d] summaries (written, gated). Launches: 17 (QK^T, scale, logsumexp's 9, softmax,
    the gate's subtract and sigmoid, the transposing copy, AV, gate multiply), 8 more when the
    last segment is padded (K and V padded, 2 each; the mask's arange, compare, not, fill)."""
    S = -(-L // seg)
    P = S * seg
    nbytes = ((q + 2 * P) * d + 5 * heads * q * P + 3 * q * S * d) * b
    return Op("attn_segmented", (q, P, d), 4 * q * P * d, nbytes, 17 + 8 * (P != L), "sta")


def swiglu(t, d: int, f: int, b: int) -> tuple[Op, ...]:
    """arch_models.SwiGLU on t tokens: down(silu(gate(x)) * up(x))."""
    return (gemm(t, f, d, b, "ffn_gate"), gemm(t, f, d, b, "ffn_up"), eltwise("silu", t * f, b, "ffn_silu"),
            eltwise("mul", t * f, b, "ffn_mul"), gemm(t, d, f, b, "ffn_down"))


def _score(M, d: int, b: int, residual: bool) -> tuple[Op, ...]:
    """head(final_norm(x)) (STCA adds q1 to the last layer's output first)."""
    return ((eltwise("add", M * d, b, "residual_q1"),) if residual else ()) + (
        eltwise("layer_norm", M * d, b, "final_norm"), gemm(M, 1, d, b, "score_head"))


def _stca_history(t, d: int, f: int, b: int) -> tuple[Op, ...]:
    """STCALayer.history on t tokens: K and V of one layer (split into heads: views)."""
    return swiglu(t, d, f, b) + (eltwise("layer_norm", t * d, b, "hist_norm"), gemm(t, 2 * d, d, b, "kv"))


def _stca_queries(M, d: int, f: int, b: int) -> tuple[Op, ...]:
    return swiglu(M, d, f, b) + (eltwise("layer_norm", M * d, b, "target_norm"),)


def _stca_attend(M, L, d: int, b: int, fuse: bool, own_keys: bool) -> tuple[Op, ...]:
    """STCALayer.attend (and next_query unless the last layer): M queries over L keys, shared
    (RLB) or each its own copy (no RLB)."""
    attn = attn_single(M, L, d, b) if own_keys else attn_cross(M, L, d, b)
    ops = (gemm(M, d, d, b, "q"), attn, gemm(M, d, d, b, "out"))
    return ops + ((eltwise("copy", 2 * M * d, b, "fuse_cat"), gemm(M, d, 2 * d, b, "fuse"),
                   eltwise("layer_norm", M * d, b, "fuse_norm")) if fuse else ())


def _stca_per_target_chunk(spec, c, L, b: int) -> tuple[Op, ...]:
    """One chunk of c targets of STCAModel.per_target: c copies of the history (expand +
    reshape: a copy), the queries, every layer's K/V of the copies, then the stack."""
    N, d, f = spec.layers, spec.d_model, spec.ffn
    return ((eltwise("copy", c * L * d, b, "history_copies"),) + _stca_queries(c, d, f, b)
            + _stca_history(c * L, d, f, b) * N + _stca_attend(c, L, d, b, True, True) * (N - 1)
            + _stca_attend(c, L, d, b, False, True) + _score(c, d, b, True))


def _cross_block(x, mem, d: int, f: int, b: int) -> tuple[Op, ...]:
    """VISTA's CrossBlock: memory(mem) -> K, V; then x's attention and SwiGLU, both residual."""
    return ((eltwise("layer_norm", mem * d, b, "norm_mem"), gemm(mem, 2 * d, d, b, "kv"),
             eltwise("layer_norm", x * d, b, "norm_q"), gemm(x, d, d, b, "q"), attn_cross(x, mem, d, b),
             gemm(x, d, d, b, "out"), eltwise("add", x * d, b, "residual1"),
             eltwise("layer_norm", x * d, b, "norm_ff")) + swiglu(x, d, f, b)
            + (eltwise("add", x * d, b, "residual2"),))


def _gsta_layer(M, S, d: int, f: int, b: int) -> tuple[Op, ...]:
    """LASER's GSTALayer: each target's one query over its S segment summaries, then SwiGLU."""
    return ((eltwise("layer_norm", M * d, b, "norm_q"), gemm(M, d, d, b, "q"), attn_single(M, S, d, b),
             gemm(M, d, d, b, "out"), eltwise("add", M * d, b, "residual1"),
             eltwise("layer_norm", M * d, b, "norm_ff")) + swiglu(M, d, f, b)
            + (eltwise("add", M * d, b, "residual2"),))


def _laser_sta_rank(spec, L, M, b: int) -> list[Block]:
    """LASERModel.sta_rank: target SwiGLU and query, STA in query chunks (QUERY_CHUNK_ELEMS
    scores per chunk), the summaries normalised and permuted to [M, h, S, hd] (a copy), N GSTA
    layers, the head."""
    N, d, f, h = spec.layers, spec.d_model, spec.ffn, spec.heads
    seg = getattr(spec, "segment_len", 128)
    S = -(-L // seg)
    step = _max1(LASER_QUERY_CHUNK_ELEMS // _max1(h * L))
    first = swiglu(M, d, f, b) + (eltwise("layer_norm", M * d, b, "target_norm"), gemm(M, d, d, b, "q"))
    return ([Block(first)] + _chunks(M, step, lambda c: (attn_segmented(c, L, d, h, seg, b),))
            + [Block((eltwise("copy", M * S * d, b, "cat_chunks"),), 1 * (-(-M // step) > 1)),
               Block((eltwise("layer_norm", M * S * d, b, "seg_norm"), eltwise("copy", M * S * d, b, "seg_permute"))),
               Block(_gsta_layer(M, S, d, f, b), N), Block(_score(M, d, b, False))])


def _target_graph(spec, phase: str, L, M) -> list[Block]:
    N, d, f, b = spec.layers, spec.d_model, spec.ffn, dtype_bytes(spec)
    if phase not in dict(ARCH_PHASES[spec.arch]):
        raise ValueError(f"no operator graph for phase {phase!r} of {spec.arch} "
                         f"(have {', '.join(p for p, _ in ARCH_PHASES[spec.arch])})")
    if spec.arch == "stca":
        queries = Block(_stca_queries(M, d, f, b))
        score = Block(_score(M, d, b, True))
        if phase == "stca_history_encode":     # each layer's K and V copied into the cache tensor
            store = (head_op("kv_store", L, d, b, "k_store"), head_op("kv_store", L, d, b, "v_store"))
            return [Block(_stca_history(L, d, f, b) + store, N)]
        if phase == "stca_target_attend":
            return [queries, Block(_stca_attend(M, L, d, b, True, False), N - 1),
                    Block(_stca_attend(M, L, d, b, False, False)), score]
        if phase == "full_forward":           # each layer's K/V made just before its attention
            hist = _stca_history(L, d, f, b)
            return [queries, Block(hist + _stca_attend(M, L, d, b, True, False), N - 1),
                    Block(hist + _stca_attend(M, L, d, b, False, False)), score]
        step = _max1(getattr(spec, "chunk_tokens", STCA_CHUNK_TOKENS) // _max1(L))
        return (_chunks(M, step, lambda c: _stca_per_target_chunk(spec, c, L, b))
                + [Block((eltwise("copy", M, b, "cat_scores"),), 1 * (-(-M // step) > 1))])
    if spec.arch == "vista":
        k = getattr(spec, "summary_tokens", 128)
        summarize = [Block(_cross_block(k, L, d, f, b), N),
                     Block((eltwise("layer_norm", k * d, b, "summary_norm"),))]
        rank = [Block(_cross_block(M, k, d, f, b), N), Block(_score(M, d, b, False))]
        return {"vista_summarize": summarize, "vista_rank_summary": rank,
                "full_forward": summarize + rank}[phase]
    kv = (eltwise("layer_norm", L * d, b, "hist_norm"), gemm(L, 2 * d, d, b, "kv"))
    if phase == "laser_history_encode":       # torch.stack of the strided K and V head views
        return [Block(kv + (kv_concat(L, L, d, b, "kv_stack"),))]
    if phase == "laser_sta_rank":
        return _laser_sta_rank(spec, L, M, b)
    return [Block(kv)] + _laser_sta_rank(spec, L, M, b)


def ops(blocks: list[Block]) -> list[Op]:
    """The graph's operators in issue order, each repeat written out."""
    return [op for blk in blocks for _ in range(blk.repeat) for op in blk.ops]


def total(blocks: list[Block], field: str = "flops", exclude: tuple[str, ...] = ()):
    """Sum of an operator field (flops, bytes or launches) over the graph, leaving out the
    operators named in `exclude`."""
    return sum(blk.repeat * sum(getattr(op, field) for op in blk.ops if op.name not in exclude)
               for blk in blocks)


def flops(spec, phase: str, L, M):
    return total(graph(spec, phase, L, M), "flops")
