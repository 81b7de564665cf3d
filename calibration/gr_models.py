"""Small torch models of a generative-recommendation (GR) ranking model, for microbenchmarks.

Two block types share one layout, so the three entry points are written once:

- ``transformer``: pre-LN transformer block (softmax attention through
  ``F.scaled_dot_product_attention``, GELU feed-forward).
- ``hstu``: HSTU block (arXiv 2402.17152): ``U, V, Q, K = SiLU(f1(LN(x)))``, pointwise
  ``SiLU(Q K^T)`` attention with no softmax, ``y = x + f2(LN(A V) * U)``. No feed-forward
  (``ffn`` is ignored), no relative attention bias. The reference divides the attention
  weights by the maximum sequence length; a fixed constant (``HSTU_NORM``) keeps the
  prefix K/V independent of how many tokens follow, which a prefix cache needs.

A request's tokens are ``[history (L) | short-term (s) | candidates (M)]``:

- history tokens attend causally to history;
- short-term tokens attend to the whole history and causally to each other;
- each candidate attends to the history, the short-term tokens and itself only
  (target attention, M-FALCON-style: candidates never see each other).

Entry points (batch B, inputs are token embeddings ``[B, T, d_model]``):

- ``encode_prefix(history) -> kv``: per-layer K/V of the history, one contiguous tensor
  ``[layers, 2, B, heads, L, head_dim]`` (the prefix cache a relay / pre-infer step keeps).
  The last layer only needs K/V, so its attention and MLP are skipped.
- ``rank_cached(kv, short_term, candidates) -> scores [B, M]``: only the s + M suffix tokens
  are computed; their keys/values are appended to the cached ones (``torch.cat``, as an
  eager serving stack does).
- ``full_forward(history, short_term, candidates) -> scores [B, M]``: the same pass without a
  cache: one projection GEMM over all L + s + M tokens per layer, causal attention for the
  history rows, masked attention for the suffix rows. The history rows of the last layer
  are not computed (their outputs are unused). It equals ``rank_cached(encode_prefix(h), ...)``
  up to rounding.

Inference only: call under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("transformer", "hstu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HSTU_NORM = 4096.0  # constant attention normaliser of the HSTU block (see module docstring)


@dataclass(frozen=True)
class GRSpec:
    arch: str = "transformer"
    layers: int = 8
    d_model: int = 512
    heads: int = 8
    ffn: int = 2048
    dtype: str = "bfloat16"
    short_term_tokens: int = 32

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS} (got {self.arch!r})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)} (got {self.dtype!r})")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if min(self.layers, self.d_model, self.heads, self.ffn) <= 0 or self.short_term_tokens < 0:
            raise ValueError(f"model sizes must be positive: {self}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of cached K and V per history token, all layers."""
        return self.layers * 2 * self.d_model * self.torch_dtype.itemsize

    def to_dict(self) -> dict:
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}


def suffix_mask(n: int, s: int, m: int, device: torch.device | str) -> torch.Tensor:
    """Boolean mask [s+m, n+s+m] (True = may attend) for the suffix rows of a request.

    Keys are [history n | short-term s | candidates m]. Short-term row i sees the history and
    short-term keys <= i; candidate row i sees the history, all short-term keys and itself.
    """
    t = s + m
    idx = torch.arange(t, device=device)
    causal = idx[None, :] <= idx[:, None]
    own = (idx[None, :] < s) | (idx[None, :] == idx[:, None])
    hist = torch.ones(t, n, dtype=torch.bool, device=device)
    return torch.cat([hist, causal & own], dim=1)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B, T, d] -> [B, h, T, d/h] (a view)."""
    b, t, d = x.shape
    return x.view(b, t, h, d // h).transpose(1, 2)


def _merge(a: torch.Tensor) -> torch.Tensor:
    """[B, h, T, hd] -> [B, T, h*hd]."""
    b, h, t, hd = a.shape
    return a.transpose(1, 2).reshape(b, t, h * hd)


class TransformerBlock(nn.Module):
    def __init__(self, spec: GRSpec):
        super().__init__()
        d = spec.d_model
        self.h = spec.heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, spec.ffn)
        self.ff2 = nn.Linear(spec.ffn, d)

    def project(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        return _heads(q, self.h), _heads(k, self.h), _heads(v, self.h), None

    def attend_causal(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def attend_masked(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def finish(self, x, a, aux):
        x = x + self.out(_merge(a))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class HSTUBlock(nn.Module):
    QUERY_CHUNK_ELEMS = 1 << 27  # bound the materialised [B, h, q, k] score block

    def __init__(self, spec: GRSpec):
        super().__init__()
        d = spec.d_model
        self.h = spec.heads
        self.alpha = 1.0 / math.sqrt(spec.head_dim)
        self.norm = nn.LayerNorm(d)
        self.f1 = nn.Linear(d, 4 * d)
        self.attn_norm = nn.LayerNorm(d)
        self.f2 = nn.Linear(d, d)

    def project(self, x):
        u, v, q, k = F.silu(self.f1(self.norm(x))).chunk(4, dim=-1)
        return _heads(q, self.h), _heads(k, self.h), _heads(v, self.h), u

    def _pointwise(self, q, k, v, mask):
        w = F.silu(torch.matmul(q, k.transpose(-1, -2)) * self.alpha) * mask
        return torch.matmul(w / HSTU_NORM, v)

    def attend_causal(self, q, k, v):
        b, h, n, _ = q.shape
        step = max(1, self.QUERY_CHUNK_ELEMS // max(1, b * h * n))
        outs = []
        for r0 in range(0, n, step):  # query row blocks; keys only up to the block's end
            r1 = min(n, r0 + step)
            rows = torch.arange(r0, r1, device=q.device)[:, None]
            mask = torch.arange(r1, device=q.device)[None, :] <= rows
            outs.append(self._pointwise(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], mask.to(q.dtype)))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def attend_masked(self, q, k, v, mask):
        return self._pointwise(q, k, v, mask.to(q.dtype))

    def finish(self, x, a, aux):
        return x + self.f2(self.attn_norm(_merge(a)) * aux)


class GRModel(nn.Module):
    def __init__(self, spec: GRSpec):
        super().__init__()
        self.spec = spec
        block = TransformerBlock if spec.arch == "transformer" else HSTUBlock
        self.blocks = nn.ModuleList(block(spec) for _ in range(spec.layers))
        self.final_norm = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, 1)
        self._masks: dict[tuple, torch.Tensor] = {}
        self.mask_cache_limit: int | None = 8   # None: keep all (CUDA graphs hold their addresses)

    def _mask(self, n: int, s: int, m: int, device) -> torch.Tensor:
        key = (n, s, m, str(device))
        mask = self._masks.get(key)
        if mask is None:
            if self.mask_cache_limit is not None and len(self._masks) >= self.mask_cache_limit:
                self._masks.pop(next(iter(self._masks)))
            mask = self._masks[key] = suffix_mask(n, s, m, device)
        return mask

    def _score(self, cand_x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(cand_x)).squeeze(-1)

    def new_kv(self, batch: int, length: int, device) -> torch.Tensor:
        sp = self.spec
        return torch.empty(sp.layers, 2, batch, sp.heads, length, sp.head_dim,
                           dtype=sp.torch_dtype, device=device)

    def encode_prefix(self, history: torch.Tensor) -> torch.Tensor:
        b, n, _ = history.shape
        kv = self.new_kv(b, n, history.device)
        x = history
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            q, k, v, aux = blk.project(x)
            kv[i, 0].copy_(k)
            kv[i, 1].copy_(v)
            if i < last:
                x = blk.finish(x, blk.attend_causal(q, k, v), aux)
        return kv

    def rank_cached(self, kv: torch.Tensor, short_term: torch.Tensor,
                    candidates: torch.Tensor) -> torch.Tensor:
        s, m = short_term.shape[1], candidates.shape[1]
        n = kv.shape[4]
        x = torch.cat([short_term, candidates], dim=1)
        mask = self._mask(n, s, m, x.device)
        for i, blk in enumerate(self.blocks):
            q, k, v, aux = blk.project(x)
            keys = torch.cat([kv[i, 0], k], dim=2)
            values = torch.cat([kv[i, 1], v], dim=2)
            x = blk.finish(x, blk.attend_masked(q, keys, values, mask), aux)
        return self._score(x[:, s:])

    def full_forward(self, history: torch.Tensor, short_term: torch.Tensor,
                     candidates: torch.Tensor) -> torch.Tensor:
        n, s, m = history.shape[1], short_term.shape[1], candidates.shape[1]
        x = torch.cat([history, short_term, candidates], dim=1)
        mask = self._mask(n, s, m, x.device)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            q, k, v, aux = blk.project(x)
            a_suffix = blk.attend_masked(q[:, :, n:], k, v, mask)
            if i < last:
                a_hist = blk.attend_causal(q[:, :, :n], k[:, :, :n], v[:, :, :n])
                x = blk.finish(x, torch.cat([a_hist, a_suffix], dim=2), aux)
            else:  # only the suffix rows matter after the last layer
                x = blk.finish(x[:, n:], a_suffix, None if aux is None else aux[:, n:])
        return self._score(x[:, -m:])


def build_model(spec: GRSpec, device: torch.device | str, seed: int = 0) -> GRModel:
    torch.manual_seed(seed)
    return GRModel(spec).to(device=device, dtype=spec.torch_dtype).eval()


def self_check(model: GRModel, device, L: int = 48, M: int = 6) -> dict[str, float]:
    """Relative errors of: cached vs full pass; one candidate's change leaking into others.

    Returns {"cached_vs_full": ..., "candidate_leak": ...}; both should be at rounding level.
    """
    sp = model.spec
    L += -(L + sp.short_term_tokens + M) % 16  # keep the key count aligned for fused kernels
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(t):
        return torch.randn(1, t, sp.d_model, generator=g).to(device=device, dtype=sp.torch_dtype)

    hist, short, cand = rnd(L), rnd(sp.short_term_tokens), rnd(M)
    with torch.inference_mode():
        full = model.full_forward(hist, short, cand).float()
        cached = model.rank_cached(model.encode_prefix(hist), short, cand).float()
        cand2 = cand.clone()
        cand2[:, 0] = rnd(1)[:, 0]
        moved = model.full_forward(hist, short, cand2).float()
    rel = ((full - cached).norm() / full.norm()).item()
    leak = ((full[:, 1:] - moved[:, 1:]).norm() / full[:, 1:].norm()).item()
    changed = ((full[:, 0] - moved[:, 0]).abs().max()).item()
    if not all(math.isfinite(x) for x in (rel, leak, changed)):
        raise RuntimeError(f"model self-check produced non-finite values: {rel=} {leak=}")
    return {"cached_vs_full": rel, "candidate_leak": leak, "changed_candidate_delta": changed}


class Phases:
    """The three serving phases of one model, run eagerly or as one CUDA graph per shape.

    Eager PyTorch issues ~25 kernels per layer from Python, so a small model is bound by
    the host's launch rate (and its hiccups) rather than by the GPU. With ``graphs=True``
    each (phase, L, M) shape is captured once as a CUDA graph on first use, and a call
    copies its inputs into that graph's static buffers and replays it: the GPU's time, plus
    a few launches. ``encode`` returns a fresh K/V tensor (the cache entry, not the graph's
    buffer); ``rank`` copies the cached K/V into the graph's buffer first. The benchmark
    (bench.py) and the testbed (testbed.py) both call through this class, so a table and a
    testbed run time the same code path.
    """

    def __init__(self, model: GRModel, graphs: bool = False):
        self.model = model
        self.graphs = graphs
        if graphs:
            model.mask_cache_limit = None
        self._captured: dict[tuple, tuple] = {}

    def _graph(self, key: tuple, fn, *example: torch.Tensor):
        """(graph, static inputs, static output) for key, captured on first use."""
        got = self._captured.get(key)
        if got is None:
            static = [x.clone() for x in example]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):          # warm-up off the capture (kernel choice, masks)
                for _ in range(3):
                    fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = fn(*static)
            got = self._captured[key] = (g, static, out)
        return got

    def _replay(self, key: tuple, fn, *inputs: torch.Tensor) -> torch.Tensor:
        g, static, out = self._graph(key, fn, *inputs)
        for s, x in zip(static, inputs):
            s.copy_(x, non_blocking=True)
        g.replay()
        return out

    def full(self, history, short_term, candidates) -> torch.Tensor:
        if not self.graphs:
            return self.model.full_forward(history, short_term, candidates)
        key = ("full", history.shape[1], candidates.shape[1])
        return self._replay(key, self.model.full_forward, history, short_term, candidates)

    def encode(self, history) -> torch.Tensor:
        if not self.graphs:
            return self.model.encode_prefix(history)
        return self._replay(("encode", history.shape[1]), self.model.encode_prefix, history).clone()

    def rank(self, kv, short_term, candidates) -> torch.Tensor:
        if not self.graphs:
            return self.model.rank_cached(kv, short_term, candidates)
        key = ("rank", kv.shape[4], candidates.shape[1])
        return self._replay(key, self.model.rank_cached, kv, short_term, candidates)

    def check(self, L: int, M: int, device) -> float:
        """Largest relative difference between these phases and the eager model on fresh
        inputs at (L, M), after the shape's graphs were captured on other inputs: proves the
        static buffers really carry each call's inputs. 0 when eager."""
        sp = self.model.spec
        worst = 0.0
        with torch.inference_mode():
            for _ in range(2):   # the first call captures, the second replays on new inputs
                h, s, c = (torch.randn(1, t, sp.d_model, device=device, dtype=sp.torch_dtype)
                           for t in (L, sp.short_term_tokens, M))
                ref = self.model.full_forward(h, s, c).float()
                for got in (self.full(h, s, c), self.rank(self.encode(h), s, c)):
                    worst = max(worst, ((got.float() - ref).norm() / ref.norm()).item())
        return worst

