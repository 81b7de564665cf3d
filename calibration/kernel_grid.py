"""A wide kernel grid: the kernels of GR models of many widths, head layouts and lengths.

The shapes come from the operator graphs (`simrec.operators`) of transformer and HSTU models
over a grid of d_model, heads, L and M (ffn = 4 d, s short-term tokens), so the table holds
exactly the kernels the kernel cost model (`simrec.kernel_model`) looks up for those models
and brackets the ones between. Every distinct shape is timed on its own, back to back,
after its own warm-up, with calibration/bench.py's clock and `measure_cells` (CUDA events
or perf_counter_ns; the device synchronised after every call). Attention is timed through
the real blocks of calibration/gr_models.py (SDPA for the transformer, HSTU's pointwise
attention), and the copies in the memory layouts the model issues them in (a strided head
view in the K/V cat and store, SDPA's output layout in full_forward's cat), so each row
carries its ``arch`` and ``heads``.

On a GPU every shape is also timed as one CUDA graph that runs the call once per input set
(condition ``graph``: replays timed back to back, divided by the calls): the kernels' device
time without the host's launches, which an isolated timing of a call of several kernels
(HSTU's pointwise attention: seven) is mostly made of at small sizes. And the host's time
to issue the call when calls are issued back to back without a sync (condition ``host``), as
an eager phase issues its operators.

Cells run cheapest first (by an estimate of their work), so a deadline cuts the largest
shapes: after ``--soft-deadline-s`` every cell gets ``--min-samples`` calls; after
``--deadline-s`` no new cell starts, and the manifest lists how many were left out. The
default grid (5646 shapes) took 173 s on one H200, none cut. Run from the repository root::

    python -m calibration.kernel_grid --device cuda --out /tmp/h200_kernel_grid
    python -m calibration.kernel_grid --device cpu --d-models 64 --heads 2 \\
        --history-lens 32,64 --candidates 8 --out /tmp/cpu_grid      # a tiny CPU run

It writes ``kernels.parquet`` (bench.py's kernel columns plus ``arch`` and ``heads``; condition
``isolated`` and, on a GPU, ``graph`` and ``host``) and ``manifest.json`` (no phase table:
use it beside a table that has one).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from simrec import operators as opg

from .bench import KERNEL_COLUMNS, QUANTILES, Budget, Cell, Clock, _cat_seq, _device_info, _versions, measure_cells
from .gr_models import GRSpec, HSTUBlock, TransformerBlock, _merge, suffix_mask


def _store(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src)


@dataclass(frozen=True)
class Shape:
    kind: str
    dims: tuple[int, int, int]
    arch: str = ""       # attention and attn_concat
    heads: int = 0       # attention and the layout kinds (operators.LAYOUT_KINDS)

    @property
    def work(self) -> float:
        """A rough size, to order cells cheapest first."""
        a, b, c = self.dims
        if self.kind == "gemm":
            return 2.0 * a * b * c
        if self.kind in ("attn_causal", "attn_target"):
            return 4.0 * a * b * c * (2 if self.arch == "hstu" else 1)
        if self.kind in ("kv_concat", "attn_concat"):
            return float((a + b) * c)
        return float(a * max(b, 1))


def grid_shapes(d_models, heads, Ls, Ms, s: int, archs=opg.ARCHS, dtype="bfloat16",
                min_head_dim: int = 32, max_head_dim: int = 256) -> list[Shape]:
    """Every distinct kernel shape of the graphs of these models, phases and (L, M)."""
    out: dict[Shape, None] = {}
    for arch in archs:
        for d in d_models:
            for h in heads:
                if d % h or not min_head_dim <= d // h <= max_head_dim:
                    continue
                spec = GRSpec(arch=arch, layers=2, d_model=d, heads=h, ffn=4 * d, dtype=dtype,
                              short_term_tokens=s)
                for L in Ls:
                    for M in Ms:
                        for phase in opg.PHASES:
                            for op in opg.ops(opg.graph(spec, phase, L, M)):
                                dims = tuple(int(v) for v in op.dims) + (0,) * (3 - len(op.dims))
                                if op.kind.startswith("attn"):        # attention, attn_concat
                                    out[Shape(op.kind, dims, arch, h)] = None
                                elif op.kind in opg.LAYOUT_KINDS:
                                    out[Shape(op.kind, dims, "", h)] = None
                                else:
                                    out[Shape(op.kind, dims)] = None
    return sorted(out, key=lambda x: (x.work, x.kind, x.dims, x.arch, x.heads))


class Kernels:
    """The callable and input sets of one kernel shape."""

    def __init__(self, device: torch.device, dtype: torch.dtype, s: int, rotate_bytes: int):
        self.dev, self.dtype, self.s, self.rotate = device, dtype, s, rotate_bytes
        self._blocks: dict = {}

    def randn(self, *shape):
        return torch.randn(*shape, device=self.dev, dtype=self.dtype)

    def head_view(self, t: int, d: int, h: int):
        """[1, h, t, d/h]: a head view of the K third of a [1, t, 3 d] projection, as
        gr_models' ``_heads(qkv.chunk(3)[1])`` is (strided, not contiguous)."""
        return self.randn(1, t, 3 * d)[..., d:2 * d].view(1, t, h, d // h).transpose(1, 2)

    def sets(self, nbytes: float, hi: int = 8) -> int:
        return int(min(max(math.ceil(self.rotate / max(nbytes, 1)), 2), hi))

    def block(self, arch: str, d: int, h: int):
        """The attention of a block: built on the meta device, since attention uses none of the
        block's weights (building a d=4096 block's weights on the host took ~0.5 s a shape)."""
        key = (arch, d, h)
        if key not in self._blocks:
            spec = GRSpec(arch=arch, layers=1, d_model=d, heads=h, ffn=8, dtype="float32")
            with torch.device("meta"):
                self._blocks[key] = (TransformerBlock if arch == "transformer" else HSTUBlock)(spec)
        return self._blocks[key]

    def setup(self, sh: Shape):
        a, b, c = sh.dims
        e = torch.empty(0, dtype=self.dtype).element_size()
        if sh.kind == "gemm":
            w = self.randn(b, c)
            return F.linear, [(self.randn(a, c), w) for _ in range(self.sets(a * c * e))]
        if sh.kind == "attn_causal":
            blk, hd = self.block(sh.arch, c, sh.heads), c // sh.heads
            return blk.attend_causal, [tuple(self.randn(1, sh.heads, a, hd) for _ in range(3))
                                       for _ in range(self.sets(3 * a * c * e))]
        if sh.kind == "attn_target":
            blk, hd = self.block(sh.arch, c, sh.heads), c // sh.heads
            mask = suffix_mask(b - a, self.s, a - self.s, self.dev)
            return blk.attend_masked, [(self.randn(1, sh.heads, a, hd), self.randn(1, sh.heads, b, hd),
                                        self.randn(1, sh.heads, b, hd), mask)
                                       for _ in range(self.sets(2 * b * c * e))]
        if sh.kind == "kv_concat":      # cached K (contiguous) ++ the suffix's, a head view of the projection
            return _cat_seq, [(self.randn(1, sh.heads, a, c // sh.heads), self.head_view(b, c, sh.heads))
                              for _ in range(self.sets((a + b) * c * e))]
        if sh.kind == "attn_concat":    # attention outputs as the arch writes them
            part = ((lambda t: self.randn(1, t, sh.heads, c // sh.heads).transpose(1, 2))
                    if sh.arch == "transformer" else (lambda t: self.randn(1, sh.heads, t, c // sh.heads)))
            return _cat_seq, [(part(a), part(b)) for _ in range(self.sets((a + b) * c * e))]
        if sh.kind == "kv_store":       # K of the projection copied into the cache
            return _store, [(torch.empty(1, sh.heads, a, b // sh.heads, device=self.dev, dtype=self.dtype),
                             self.head_view(a, b, sh.heads)) for _ in range(self.sets(2 * a * b * e))]
        if sh.kind == "head_copy":      # [1, h, t, hd] -> [1, t, h * hd]
            return _merge, [(self.randn(1, sh.heads, a, b // sh.heads),) for _ in range(self.sets(2 * a * b * e))]
        n = a                       # element-wise: [n / 1024, 1024] rows (any width moves n elements)
        x = [self.randn(max(n // 1024, 1), min(n, 1024)) for _ in range(self.sets(n * e))]
        if sh.kind == "layer_norm":
            return partial(F.layer_norm, normalized_shape=(x[0].shape[1],)), [(t,) for t in x]
        if sh.kind in ("add", "mul"):
            return (torch.add if sh.kind == "add" else torch.mul), [(t, t) for t in x]
        if sh.kind == "copy":
            return torch.clone, [(t,) for t in x]
        return {"gelu": F.gelu, "silu": F.silu}[sh.kind], [(t,) for t in x]


def graph_times(fn, inputs, clock: Clock, est_ms: float, n: int) -> np.ndarray:
    """Device ms per call: one CUDA graph calls fn once per input set (so inputs still rotate);
    each sample times enough back-to-back replays to span ~0.2 ms, divided by the calls."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for args in inputs:
            fn(*args)
    inner = max(1, math.ceil(0.2 / max(est_ms * len(inputs), 1e-3)))
    replay = lambda: [g.replay() for _ in range(inner)]      # noqa: E731
    replay()
    x = np.array([clock.time(replay, ()) for _ in range(n)]) / (inner * len(inputs))
    del g
    return x


def host_times(fn, inputs, device_ms: float, n: int) -> np.ndarray:
    """Host ms to issue one call in a pipeline: k calls issued back to back with no sync
    (the device drains after each sample), timed on the host. k keeps the device's backlog
    under ~20 ms, so the launch queue never fills and blocks the host."""
    k = int(min(max(20.0 // max(device_ms, 1e-3), 2), 8))
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        for j in range(k):
            fn(*inputs[j % len(inputs)])
        out.append((time.perf_counter_ns() - t0) / 1e6 / k)
    torch.cuda.synchronize()
    return np.array(out)


def run(shapes: list[Shape], device: torch.device, dtype: torch.dtype, s: int, budget: Budget,
        deadline_s: float, target_s: float, max_n: int, rotate_bytes: int, seed: int = 0,
        graph_target_s: float = 0.0, log=print) -> tuple[list[tuple], int]:
    """Rows (KERNEL_COLUMNS + arch, heads) of every shape measured before the deadline, and
    how many shapes the deadline left out. graph_target_s > 0 (CUDA only): also the shape's
    graph rows, from about that many seconds of replays (3-20 samples), and its host rows
    (3 samples)."""
    clock, rng, kern = Clock(device), np.random.default_rng(seed), Kernels(device, dtype, s, rotate_bytes)
    rows, skipped, graph_failures = [], 0, 0
    with torch.inference_mode():
        for i, sh in enumerate(shapes):
            if budget.elapsed() > deadline_s:
                skipped = len(shapes) - i
                log(f"deadline {deadline_s:g} s: {skipped} of {len(shapes)} shapes left out")
                break
            if i % 64 == 0:
                gc.collect()        # tensors go by reference count; 65 ms a call, so not every shape
            try:
                fn, inputs = kern.setup(sh)
                x, = measure_cells([Cell(0, 0, fn, inputs)], clock, budget, rng, target_s=target_s, max_n=max_n)
                got = {"isolated": x}
                if graph_target_s > 0 and device.type == "cuda" and graph_failures < 5:
                    est = float(np.median(x))
                    n = 3 if budget.elapsed() > budget.soft_deadline_s else int(
                        min(max(math.ceil(graph_target_s * 1e3 / max(est * len(inputs), 1e-3)), 3), 20))
                    try:
                        got["graph"] = graph_times(fn, inputs, clock, est, n)
                    except RuntimeError as e:       # a capture that fails costs the shape its graph rows
                        graph_failures += 1
                        torch.cuda.synchronize()
                        log(f"graph capture failed at {sh.kind} {list(sh.dims)} {sh.arch}: {str(e)[:120]}")
                    dev_ms = float(np.median(got.get("graph", x)))
                    got["host"] = host_times(fn, inputs, dev_ms, 3)
            except torch.OutOfMemoryError:
                raise RuntimeError(f"out of memory at {sh.kind} {list(sh.dims)} {sh.arch} h={sh.heads}") from None
            del fn, inputs
            for cond, v in got.items():
                if not np.all(np.isfinite(v)) or np.any(v <= 0):
                    raise RuntimeError(f"bad {cond} timings at {sh.kind} {list(sh.dims)}: {v[:5]}")
                for q, t in zip(QUANTILES, np.quantile(v, QUANTILES)):
                    rows.append((sh.kind, *sh.dims, cond, q, float(t), len(v), sh.arch, sh.heads))
            if i % 100 == 0:
                log(f"[{budget.elapsed():6.1f}s] {i}/{len(shapes)} {sh.kind} {list(sh.dims)} "
                    f"{sh.arch} h={sh.heads}: p50 {np.median(x):.4f} ms (n={len(x)})"
                    + (f", graph {np.median(got['graph']):.4f} ms" if "graph" in got else "")
                    + (f", host {np.median(got['host']):.4f} ms" if "host" in got else ""))
    return rows, skipped


def _ints(text: str) -> list[int]:
    vals = sorted({int(v) for v in text.split(",") if v.strip()})
    if not vals or vals[0] <= 0:
        raise argparse.ArgumentTypeError(f"need comma-separated positive ints (got {text!r})")
    return vals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.kernel_grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--archs", default="transformer,hstu")
    p.add_argument("--d-models", type=_ints, default=_ints("256,512,1024,2048,4096"))
    p.add_argument("--heads", type=_ints, default=_ints("4,8,16,32"))
    p.add_argument("--history-lens", type=_ints, default=_ints("1024,2048,4096,8192,12288,16384,32768"))
    p.add_argument("--candidates", type=_ints, default=_ints("64,128,256,512,1024"))
    p.add_argument("--short-term", type=int, default=32)
    p.add_argument("--kinds", default=None, help="comma-separated kernel kinds to keep (default: all), "
                                                 "e.g. attn_causal for a dense L sweep of one kind")
    p.add_argument("--warmup", type=int, default=None, help="default 3 on cuda, 1 on cpu")
    p.add_argument("--target-s", type=float, default=0.01, help="timed seconds per shape")
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--max-samples", type=int, default=50)
    p.add_argument("--graph-target-s", type=float, default=0.005,
                   help="seconds of CUDA-graph replays per shape (condition graph); 0: none")
    p.add_argument("--soft-deadline-s", type=float, default=230.0)
    p.add_argument("--deadline-s", type=float, default=330.0, help="no new shape starts after this")
    p.add_argument("--rotate-mib", type=float, default=None, help="default 128 on cuda, 8 on cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    started = time.monotonic()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype_name = a.dtype or ("bfloat16" if cuda else "float32")
    if dtype_name not in opg.DTYPE_BYTES or dtype_name in ("fp8", "int8"):
        raise SystemExit(f"--dtype must be float32, bfloat16 or float16 (got {dtype_name!r})")
    archs = [x for x in a.archs.split(",") if x]
    if set(archs) - set(opg.ARCHS):
        raise SystemExit(f"--archs: known {', '.join(opg.ARCHS)} (got {a.archs!r})")
    torch.manual_seed(a.seed)
    shapes = grid_shapes(a.d_models, a.heads, a.history_lens, a.candidates, a.short_term, archs, dtype_name)
    if a.kinds:
        kinds = {k for k in a.kinds.split(",") if k}
        shapes = [sh for sh in shapes if sh.kind in kinds]
    budget = Budget(warmup=a.warmup or (3 if cuda else 1), target_s=a.target_s, min_n=a.min_samples,
                    max_n=max(a.max_samples, a.min_samples), soft_deadline_s=a.soft_deadline_s, t0=started)
    print(f"kernel grid: {len(shapes)} shapes on {_device_info(device)['name']}", flush=True)
    rows, skipped = run(shapes, device, getattr(torch, dtype_name), a.short_term, budget, a.deadline_s,
                        a.target_s, budget.max_n, int((a.rotate_mib or (128 if cuda else 8)) * 2**20), a.seed,
                        a.graph_target_s if cuda else 0.0, log=lambda m: print(m, flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=[*KERNEL_COLUMNS, "arch", "heads"])
    for col in ("dim_a", "dim_b", "dim_c", "n_samples", "heads"):
        frame[col] = frame[col].astype("int64")
    kpath = a.out / "kernels.parquet"
    frame.to_parquet(kpath, index=False)
    manifest = {
        "format_version": 1, "name": a.out.resolve().name, "label": "measured",
        "device": _device_info(device), "versions": _versions(device),
        "date": datetime.date.today().isoformat(),
        "model": {"arch": archs[0], "heads": a.heads[0], "dtype": dtype_name, "kernel_grid": True,
                  "short_term_tokens": a.short_term},
        "grid": {"d_model": a.d_models, "heads": a.heads, "history_len": a.history_lens,
                 "candidates": a.candidates, **({"kinds": sorted(kinds)} if a.kinds else {})},
        "method": {"kernels_file": kpath.name, "kernels_sha256": hashlib.sha256(kpath.read_bytes()).hexdigest(),
                   "timer": Clock(device).name, "warmup": budget.warmup, "min_samples": budget.min_n,
                   "max_samples": budget.max_n, "target_s_per_shape": a.target_s,
                   "graph_target_s_per_shape": a.graph_target_s if cuda else 0.0,
                   "soft_deadline_s": a.soft_deadline_s, "deadline_s": a.deadline_s,
                   "shapes": len(shapes), "shapes_left_out_by_deadline": skipped,
                   "shapes_cut_to_min_samples": budget.late_cells,
                   "run_seconds": round(time.monotonic() - started, 1), "command": " ".join(sys.argv),
                   "notes": __doc__.split("\n\n")[1].replace("\n", " ")},
    }
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {kpath} ({len(frame)} rows, {len(shapes) - skipped} shapes) in "
          f"{time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
