"""A small user model implementing the phase protocol, for `simrec calibrate --model`.

The protocol is what simrec's built-in models (calibration/gr_models.py) implement; inputs
are token embeddings ``[B, T, spec.d_model]`` in ``spec.dtype``:

- ``spec``: a `GRSpec` giving the token width, short-term tokens, dtype, layers and heads
  (the table's manifest records it; ``kv_bytes_per_token`` sizes the prefix cache);
- ``encode_prefix(history) -> kv``: the user's cached prefix, any tensor (or tensors)
  that ``rank_cached`` takes back;
- ``rank_cached(kv, short_term, candidates) -> scores [B, M]``;
- ``full_forward(history, short_term, candidates) -> scores [B, M]``, equal to
  ``rank_cached(encode_prefix(history), ...)`` up to rounding, with no candidate seeing
  another (the benchmark checks both before timing);
- optionally ``new_kv(batch, length, device)``: an empty prefix of that length (for the
  prefix_reload phase; derived from ``encode_prefix`` when absent).

Calibrate it on a CPU with a tiny grid (from the repository root)::

    simrec calibrate --model simrec.calibration.examples.tiny_gr:build --device cpu \\
        --history-lens 32,64 --candidates 4,8 --conditions isolated --out /tmp/tiny_user

The factory is called with no arguments; simrec moves the module to the device and dtype.
This loads your code on purpose; nothing in a scenario ever does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simrec.calibration.gr_models import GRSpec, suffix_mask


class TinyGR(nn.Module):
    """Per layer: K/V projections of the history once (the prefix), then the suffix tokens
    attend to [history | short-term | candidates] under simrec's suffix mask."""

    def __init__(self, spec: GRSpec):
        super().__init__()
        self.spec = spec
        d = spec.d_model
        self.kv = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(spec.layers))
        self.q = nn.ModuleList(nn.Linear(d, d) for _ in range(spec.layers))
        self.head = nn.Linear(d, 1)

    def _split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.spec.heads, d // self.spec.heads).transpose(1, 2)

    def encode_prefix(self, history):
        return torch.stack([torch.stack([self._split(t) for t in self.kv[i](history).chunk(2, -1)])
                            for i in range(self.spec.layers)])

    def rank_cached(self, kv, short_term, candidates):
        x = torch.cat([short_term, candidates], dim=1)
        s, m, n = short_term.shape[1], candidates.shape[1], kv.shape[4]
        mask = suffix_mask(n, s, m, x.device)
        for i in range(self.spec.layers):
            k, v = (self._split(t) for t in self.kv[i](x).chunk(2, -1))
            keys, values = torch.cat([kv[i, 0], k], 2), torch.cat([kv[i, 1], v], 2)
            a = F.scaled_dot_product_attention(self._split(self.q[i](x)), keys, values, attn_mask=mask)
            x = x + a.transpose(1, 2).reshape(x.shape)
        return self.head(x[:, s:]).squeeze(-1)

    def full_forward(self, history, short_term, candidates):
        return self.rank_cached(self.encode_prefix(history), short_term, candidates)


def build() -> TinyGR:
    """The factory `--model simrec.calibration.examples.tiny_gr:build` calls."""
    torch.manual_seed(0)
    return TinyGR(GRSpec(arch="transformer", layers=2, d_model=64, heads=4, ffn=64,
                         dtype="float32", short_term_tokens=4))
