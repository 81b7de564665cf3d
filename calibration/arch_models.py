"""Torch models of three target-attention ranking architectures, for microbenchmarks (issue 16).

Random weights, inference only (call under ``torch.inference_mode()``); each model has the
phases its serving path needs and a ``full_forward`` that is the same computation in one call
(``self_check`` proves composed == full to rounding). Inputs are token embeddings
``[B, T, d_model]`` (history ``[B, L, d]``, candidates ``[B, M, d]``); scores are ``[B, M]``.
Candidates never see each other in any of them (target attention).

- **STCA** (arXiv 2511.06077, stacked target-to-history cross attention). Per layer i the
  history goes through its own SwiGLU feed-forward and LayerNorm and is projected to K_i, V_i
  (no history self-attention: linear in L). The target's query q_1 = LN(SwiGLU(x_t)); layer i is
  single-query multi-head cross attention of q_i over (K_i, V_i), and the next layer's query is
  the learned fusion LN(W_i [o_i ; q_1]). Score: a linear head on LN(o_N + q_1).

  - ``stca_history_encode(L)``: the user side, all layers' K/V ``[N, 2, B, h, L, d_h]``
    (with Request-Level Batching, once per request);
  - ``stca_target_attend(L, M)``: M candidates attend to those K/V;
  - ``stca_per_target(L, M)``: without RLB: every target re-encodes the history (the history
    side runs on M copies of the history, in chunks of ``chunk_tokens`` tokens), then attends
    to its own copy. Same scores as RLB, M times the user-side work and K/V traffic;
  - ``full_forward(L, M)``: the RLB pass in one call, each layer's K/V computed just before
    its attention (no cache tensor).

- **VISTA** (arXiv 2510.22049). ``summarize`` compresses the history into k summary tokens:
  k learned queries, N layers of cross attention to the history (softmax, linear in L; the
  paper's quasi-linear attention is not reproduced) plus a SwiGLU feed-forward on the k tokens.
  The summary ``[B, k, d]`` (k x d x dtype bytes) is what the store keeps. ``rank_summary``:
  N layers of candidate-to-summary target attention (each layer projects the summary to its
  own K/V online) plus a SwiGLU feed-forward on the candidates: flat in L.

  - ``vista_summarize(L)`` (nearline, or on the critical path on a miss);
  - ``vista_rank_summary(k, M)`` (online);
  - ``full_forward(L, M)``: both in one call.

- **LASER's STA** (arXiv 2602.11562, segmented target attention). The history is projected
  once to K, V (LayerNorm + two d x d projections; the user side) and cut into segments of
  ``segment_len`` tokens (the last one padded and masked). Per target and head, softmax target
  attention inside each segment gives a segment summary; a sigmoid gate
  ``sigmoid(logsumexp(segment scores) - tau)`` silences segments with no relevant item. A
  light global stacked target attention (GSTA, N layers) then lets each target attend over its
  own S = ceil(L / segment_len) gated segment summaries (no K/V projections: the summaries are
  the keys and values), each layer followed by a SwiGLU feed-forward on the targets.

  - ``laser_history_encode(L)``: K, V ``[2, B, h, L, d_h]``;
  - ``laser_sta_rank(L, M)``: STA + GSTA + head for M candidates;
  - ``full_forward(L, M)``: both in one call.

The paper interpretations above (what is fused, which norms, the gate's input, FFN widths) are
ours where the papers leave them open; the costs that matter (what scales with L, M, k, S,
what is shared per request) follow the papers.

``REGISTRY[arch]`` declares each arch's phases in one place: name -> ``PhaseDef`` (the
callable, the dims it takes, an input builder); ``calibration/bench.py`` measures exactly these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .gr_models import DTYPES, _heads, _merge

ARCHS = ("stca", "vista", "laser")
QUERY_CHUNK_ELEMS = 1 << 27     # LASER: bound the materialised [B, h, m, L] score block


@dataclass(frozen=True)
class ArchSpec:
    arch: str = "stca"
    layers: int = 4
    d_model: int = 1024
    heads: int = 16
    ffn: int = 2048                # SwiGLU hidden width
    dtype: str = "bfloat16"
    summary_tokens: int = 128      # VISTA k
    segment_len: int = 128         # LASER tokens per segment
    chunk_tokens: int = 1 << 19    # STCA without RLB: history tokens (M copies) per chunk

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS} (got {self.arch!r})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)} (got {self.dtype!r})")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if min(self.layers, self.d_model, self.heads, self.ffn, self.summary_tokens,
               self.segment_len, self.chunk_tokens) <= 0:
            raise ValueError(f"model sizes must be positive: {self}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per token of the user-side state a phase hands to the next: STCA all layers'
        K/V per history token; VISTA one summary token (d); LASER the STA layer's K/V."""
        b = self.torch_dtype.itemsize
        return {"stca": self.layers * 2, "vista": 1, "laser": 2}[self.arch] * self.d_model * b

    def to_dict(self) -> dict:
        out = {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token, "short_term_tokens": 0}
        if self.arch != "vista":
            out.pop("summary_tokens")
        if self.arch != "laser":
            out.pop("segment_len")
        if self.arch != "stca":
            out.pop("chunk_tokens")
        return out


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------- STCA

class STCALayer(nn.Module):
    def __init__(self, sp: ArchSpec, last: bool):
        super().__init__()
        d = sp.d_model
        self.h = sp.heads
        self.hist_ffn = SwiGLU(d, sp.ffn)
        self.hist_norm = nn.LayerNorm(d)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.q = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.fuse = None if last else nn.Linear(2 * d, d, bias=False)
        self.fuse_norm = None if last else nn.LayerNorm(d)

    def history(self, x):
        """History tokens [B, L, d] -> K, V [B, h, L, d_h]."""
        k, v = self.kv(self.hist_norm(self.hist_ffn(x))).chunk(2, dim=-1)
        return _heads(k, self.h), _heads(v, self.h)

    def attend(self, q_in, k, v):
        """Queries [B, M, d] (one per target) over K, V [B, h, L, d_h] -> [B, M, d]."""
        return self.out(_merge(F.scaled_dot_product_attention(_heads(self.q(q_in), self.h), k, v)))

    def next_query(self, o, q1):
        return self.fuse_norm(self.fuse(torch.cat([o, q1], dim=-1)))


class STCAModel(nn.Module):
    def __init__(self, sp: ArchSpec):
        super().__init__()
        self.spec = sp
        d = sp.d_model
        self.layers = nn.ModuleList(STCALayer(sp, i == sp.layers - 1) for i in range(sp.layers))
        self.target_ffn = SwiGLU(d, sp.ffn)
        self.target_norm = nn.LayerNorm(d)
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def _queries(self, candidates):
        return self.target_norm(self.target_ffn(candidates))

    def _stack(self, q1, kv_of: Callable[[int], tuple]):
        q = q1
        for i, layer in enumerate(self.layers):
            o = layer.attend(q, *kv_of(i))
            if layer.fuse is not None:
                q = layer.next_query(o, q1)
        return self.head(self.final_norm(o + q1)).squeeze(-1)

    def history_encode(self, history: torch.Tensor) -> torch.Tensor:
        sp = self.spec
        b, n, _ = history.shape
        kv = torch.empty(sp.layers, 2, b, sp.heads, n, sp.head_dim, dtype=history.dtype,
                         device=history.device)
        for i, layer in enumerate(self.layers):
            k, v = layer.history(history)
            kv[i, 0].copy_(k)
            kv[i, 1].copy_(v)
        return kv

    def target_attend(self, kv: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self._stack(self._queries(candidates), lambda i: (kv[i, 0], kv[i, 1]))

    def per_target(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Without RLB: each target carries its own copy of the history and encodes it."""
        b, n, d = history.shape
        m = candidates.shape[1]
        step = max(1, self.spec.chunk_tokens // max(1, n))
        outs = []
        for j0 in range(0, m, step):
            c = min(m, j0 + step) - j0
            cand = candidates[:, j0:j0 + c].reshape(b * c, 1, d)        # one target per row
            copies = history[:, None].expand(b, c, n, d).reshape(b * c, n, d)
            q1 = self._queries(cand)
            kv = [layer.history(copies) for layer in self.layers]       # per-target encoding
            outs.append(self._stack(q1, lambda i: kv[i]).view(b, c))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def full_forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self._stack(self._queries(candidates), lambda i: self.layers[i].history(history))


# ----------------------------------------------------------------------------- VISTA

class CrossBlock(nn.Module):
    """x = x + Attn(LN(x) Wq, K, V) Wo; x = x + SwiGLU(LN(x)). K/V from a memory, per block."""

    def __init__(self, sp: ArchSpec):
        super().__init__()
        d = sp.d_model
        self.h = sp.heads
        self.norm_q = nn.LayerNorm(d)
        self.norm_mem = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.norm_ff = nn.LayerNorm(d)
        self.ffn = SwiGLU(d, sp.ffn)

    def memory(self, mem):
        k, v = self.kv(self.norm_mem(mem)).chunk(2, dim=-1)
        return _heads(k, self.h), _heads(v, self.h)

    def forward(self, x, k, v):
        a = F.scaled_dot_product_attention(_heads(self.q(self.norm_q(x)), self.h), k, v)
        x = x + self.out(_merge(a))
        return x + self.ffn(self.norm_ff(x))


class VISTAModel(nn.Module):
    def __init__(self, sp: ArchSpec):
        super().__init__()
        self.spec = sp
        d = sp.d_model
        self.summary_queries = nn.Parameter(torch.randn(sp.summary_tokens, d) * 0.02)
        self.summarizer = nn.ModuleList(CrossBlock(sp) for _ in range(sp.layers))
        self.summary_norm = nn.LayerNorm(d)
        self.ranker = nn.ModuleList(CrossBlock(sp) for _ in range(sp.layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def summarize(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> the summary [B, k, d] the store keeps."""
        s = self.summary_queries.expand(history.shape[0], -1, -1)
        for blk in self.summarizer:
            s = blk(s, *blk.memory(history))
        return self.summary_norm(s)

    def rank_summary(self, summary: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        x = candidates
        for blk in self.ranker:
            x = blk(x, *blk.memory(summary))
        return self.head(self.final_norm(x)).squeeze(-1)

    def full_forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.rank_summary(self.summarize(history), candidates)


# ----------------------------------------------------------------------------- LASER

class GSTALayer(nn.Module):
    """Each target attends over its own segment summaries (keys = values = LN(summaries))."""

    def __init__(self, sp: ArchSpec):
        super().__init__()
        d = sp.d_model
        self.h = sp.heads
        self.norm_q = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.norm_ff = nn.LayerNorm(d)
        self.ffn = SwiGLU(d, sp.ffn)

    def forward(self, x, seg):
        """x [B, M, d], seg [B*M, h, S, d_h] (already normalised) -> [B, M, d]."""
        b, m, d = x.shape
        q = self.q(self.norm_q(x)).view(b * m, 1, self.h, d // self.h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, seg, seg).reshape(b, m, d)
        x = x + self.out(a)
        return x + self.ffn(self.norm_ff(x))


class LASERModel(nn.Module):
    def __init__(self, sp: ArchSpec):
        super().__init__()
        self.spec = sp
        d = sp.d_model
        self.h = sp.heads
        self.hist_norm = nn.LayerNorm(d)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.target_ffn = SwiGLU(d, sp.ffn)
        self.target_norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.tau = nn.Parameter(torch.zeros(sp.heads))      # gate offset per head
        self.seg_norm = nn.LayerNorm(sp.head_dim)
        self.gsta = nn.ModuleList(GSTALayer(sp) for _ in range(sp.layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def _kv(self, history):
        k, v = self.kv(self.hist_norm(history)).chunk(2, dim=-1)
        return _heads(k, self.h), _heads(v, self.h)

    def history_encode(self, history: torch.Tensor) -> torch.Tensor:
        k, v = self._kv(history)
        return torch.stack([k, v])

    def _segments(self, q, k, v):
        """q [B, h, m, d_h], k/v [B, h, L, d_h] -> gated segment summaries [B, h, m, S, d_h]."""
        b, h, m, hd = q.shape
        n, sl = k.shape[2], self.spec.segment_len
        S = -(-n // sl)
        pad = S * sl - n
        if pad:
            k = F.pad(k, (0, 0, 0, pad))
            v = F.pad(v, (0, 0, 0, pad))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))   # [B, h, m, S*sl]
        if pad:
            valid = torch.arange(S * sl, device=q.device) < n
            scores = scores.masked_fill(~valid, float("-inf"))
        scores = scores.view(b, h, m, S, sl)
        lse = torch.logsumexp(scores, dim=-1)                                  # [B, h, m, S]
        p = torch.softmax(scores, dim=-1)
        gate = torch.sigmoid(lse - self.tau.view(1, h, 1, 1))
        # [B, h, S, m, sl] @ [B, h, S, sl, hd] -> [B, h, S, m, hd]
        seg = torch.matmul(p.transpose(2, 3), v.view(b, h, S, sl, hd))
        return seg.transpose(2, 3) * gate[..., None]

    def sta_rank(self, kv: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        k, v = kv[0], kv[1]
        b, m, d = candidates.shape
        x = self.target_norm(self.target_ffn(candidates))
        q = _heads(self.q(x), self.h)
        n = k.shape[2]
        step = max(1, QUERY_CHUNK_ELEMS // max(1, b * self.h * n))
        parts = [self._segments(q[:, :, j:j + step], k, v) for j in range(0, m, step)]
        seg = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]          # [B, h, M, S, hd]
        S = seg.shape[3]
        seg = self.seg_norm(seg).permute(0, 2, 1, 3, 4).reshape(b * m, self.h, S, d // self.h)
        for layer in self.gsta:
            x = layer(x, seg)
        return self.head(self.final_norm(x)).squeeze(-1)

    def full_forward(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        k, v = self._kv(history)
        return self.sta_rank((k, v), candidates)


MODELS = {"stca": STCAModel, "vista": VISTAModel, "laser": LASERModel}


def build_arch_model(spec: ArchSpec, device: torch.device | str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[spec.arch](spec).to(device=device, dtype=spec.torch_dtype).eval()


# ----------------------------------------------------------------------------- the registry

Tokens = Callable[[int], torch.Tensor]     # t -> random token embeddings [1, t, d]


@dataclass(frozen=True)
class PhaseDef:
    """One measured phase: ``run(model, *inputs)``; ``dims`` says which shape dims it takes
    (``L``: history tokens, table column history_len; ``M``: candidates, column candidates;
    ``k``: VISTA's summary tokens, fixed by the spec and recorded in the manifest, no column).
    ``inputs(model, L, M, tokens)`` builds one input set (cached user-side state included)."""
    name: str
    dims: tuple[str, ...]
    run: Callable
    inputs: Callable
    what: str

    def shape(self, L: int, M: int) -> tuple[int, int]:
        """(history_len, candidates) of this phase's table row at grid point (L, M)."""
        return (L if "L" in self.dims else 0, M if "M" in self.dims else 0)


def _hist(model, L, M, tok):
    return (tok(L),)


def _hist_cand(model, L, M, tok):
    return (tok(L), tok(M))


def _stca_kv_cand(model, L, M, tok):
    return (model.history_encode(tok(L)), tok(M))


def _vista_summary_cand(model, L, M, tok):
    return (tok(model.spec.summary_tokens), tok(M))     # a stored summary: k tokens of width d


def _laser_kv_cand(model, L, M, tok):
    return (model.history_encode(tok(L)), tok(M))


REGISTRY: dict[str, dict[str, PhaseDef]] = {
    "stca": {p.name: p for p in (
        PhaseDef("stca_history_encode", ("L",), STCAModel.history_encode, _hist,
                 "user side: every layer's SwiGLU + LN + K/V projection of L history tokens"),
        PhaseDef("stca_target_attend", ("L", "M"), STCAModel.target_attend, _stca_kv_cand,
                 "M candidates' stacked cross attention over the encoded K/V of L tokens"),
        PhaseDef("stca_per_target", ("L", "M"), STCAModel.per_target, _hist_cand,
                 "without RLB: each of M targets encodes its own copy of L tokens, then attends"),
        PhaseDef("full_forward", ("L", "M"), STCAModel.full_forward, _hist_cand,
                 "with RLB in one call: history encode + target attend"),
    )},
    "vista": {p.name: p for p in (
        PhaseDef("vista_summarize", ("L",), VISTAModel.summarize, _hist,
                 "k summary tokens from L history tokens (nearline, or a miss on the critical path)"),
        PhaseDef("vista_rank_summary", ("k", "M"), VISTAModel.rank_summary, _vista_summary_cand,
                 "M candidates attend to the k cached summary tokens: flat in L"),
        PhaseDef("full_forward", ("L", "M"), VISTAModel.full_forward, _hist_cand,
                 "summarize + rank_summary in one call"),
    )},
    "laser": {p.name: p for p in (
        PhaseDef("laser_history_encode", ("L",), LASERModel.history_encode, _hist,
                 "user side: LN + K/V projection of L history tokens"),
        PhaseDef("laser_sta_rank", ("L", "M"), LASERModel.sta_rank, _laser_kv_cand,
                 "segmented target attention with sigmoid segment gates + GSTA over segments"),
        PhaseDef("full_forward", ("L", "M"), LASERModel.full_forward, _hist_cand,
                 "history encode + STA rank in one call"),
    )},
}

# What one ranking request costs, per arch (and STCA variant): phase names in order, each
# taking the request's (L, M) through its PhaseDef.shape. Mirrored, torch-free, in
# simrec.roofline.SERVING_PATHS (a test keeps them equal).
SERVING_PATHS = {
    "stca": {"rlb": ("stca_history_encode", "stca_target_attend"), "per_target": ("stca_per_target",)},
    "vista": {"hit": ("vista_rank_summary",), "miss": ("vista_summarize", "vista_rank_summary")},
    "laser": {"default": ("laser_history_encode", "laser_sta_rank")},
}


def compositions(model: nn.Module, history: torch.Tensor, candidates: torch.Tensor) -> dict:
    """{name: scores} of every way the arch computes a request's scores (the first is full)."""
    arch = model.spec.arch
    out = {"full_forward": model.full_forward(history, candidates)}
    if arch == "stca":
        out["history_encode+target_attend"] = model.target_attend(model.history_encode(history), candidates)
        out["per_target"] = model.per_target(history, candidates)
    elif arch == "vista":
        out["summarize+rank_summary"] = model.rank_summary(model.summarize(history), candidates)
    else:
        out["history_encode+sta_rank"] = model.sta_rank(model.history_encode(history), candidates)
    return out


def self_check(model: nn.Module, device, L: int = 200, M: int = 6) -> dict[str, float]:
    """Relative errors (vs full_forward) of each composition of phases, and of one candidate's
    change leaking into the others' scores. All should be at rounding level."""
    sp = model.spec
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(t):
        return torch.randn(1, t, sp.d_model, generator=g).to(device=device, dtype=sp.torch_dtype)

    hist, cand = rnd(L), rnd(M)
    out = {}
    with torch.inference_mode():
        got = {k: v.float() for k, v in compositions(model, hist, cand).items()}
        full = got.pop("full_forward")
        for k, v in got.items():
            out[k] = ((v - full).norm() / full.norm()).item()
        cand2 = cand.clone()
        cand2[:, 0] = rnd(1)[:, 0]
        moved = model.full_forward(hist, cand2).float()
    out["candidate_leak"] = ((full[:, 1:] - moved[:, 1:]).norm() / full[:, 1:].norm()).item()
    if not all(math.isfinite(x) for x in out.values()):
        raise RuntimeError(f"arch self-check produced non-finite values: {out}")
    return out
