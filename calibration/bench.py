"""Torch microbenchmarks of the serving phases of a GR ranking cascade -> a cost table.

Writes ``<out>/table.parquet``, ``<out>/kernels.parquet`` and ``<out>/manifest.json`` in the
format of FORMAT.md. Run from the repository root::

    python -m calibration.bench --device cuda --out /tmp/h100_gr_base
    python -m calibration.bench --device cpu --layers 2 --d-model 128 --heads 4 --ffn 512 \\
        --history-lens 64,128 --candidates 16,32 --out /tmp/cpu_tiny
    python -m calibration.bench --summary calibration/tables/h100_gr_base

Every timed call is one service: the device is synchronised after each call, and the time
runs from just before the call is issued until the device has finished it (CUDA events on a
GPU, ``time.perf_counter_ns`` on a CPU), so launch overhead is included. A point that cannot
run (out of memory, say) stops the run with an error naming it; nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from simrec import operators as opg

from . import arch_models
from .arch_models import ArchSpec, build_arch_model
from .gr_models import GRModel, GRSpec, Phases, build_model, self_check

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
TABLE_COLUMNS = ("phase", "condition", "history_len", "candidates", "quantile", "time_ms", "n_samples",
                 "batch")
KERNEL_COLUMNS = ("kernel", "dim_a", "dim_b", "dim_c", "condition", "quantile", "time_ms", "n_samples")
L_PHASES = ("prefix_encode", "prefix_reload")                 # shape (L, 0)
LM_PHASES = ("rank_cached", "full_forward")                   # shape (L, M), serving-critical
M_PHASES = ("emb_gather", "retrieval_score", "prerank_mlp")   # shape (0, M)
PHASES = ("prefix_encode", "rank_cached", "full_forward", "prefix_reload",
          "emb_gather", "retrieval_score", "prerank_mlp")
CONDITIONS = ("isolated", "idle_gap", "busy", "cache_pressure")

ARCH_NOTE = ("Architecture {arch} (calibration/arch_models.py): the phases of its REGISTRY entry, "
             "each measured over the grid of the dims it takes (L -> history_len, M -> candidates, "
             "k fixed by model.summary_tokens; a dim a phase does not take is 0 in its rows), "
             "every phase under every condition. Inputs of a phase that takes cached user-side "
             "state (K/V, a summary) are built once per input set by the producing phase. No "
             "batched rows, no cache_pressure, no kernels for these archs. ")

GRAPHS_NOTE = ("The GR phases (prefix_encode, rank_cached, full_forward) run as one CUDA graph per "
               "shape (gr_models.Phases): each call copies its inputs into the graph's static "
               "buffers (rank_cached: the cached K/V too) and replays it; prefix_encode clones the "
               "K/V out. No torch.compile.")

BATCH_NOTE = ("Rows with batch B > 1 (B in {sizes}, isolated only): rank_cached and full_forward "
              "over B requests of the same (L, M) in one call (B cached prefixes, B x (s + M) "
              "suffix tokens), measured where B x (L + s + M) <= {cap} tokens. ")

CONDITION_NOTES = {
    "isolated": "back-to-back: each call is issued as soon as the previous one has finished "
                "(device synchronised after every call)",
    "idle_gap": "before each call the host sleeps a uniform random {gap} ms with the device idle "
                "(previous call synchronised), as a lightly loaded server sees",
    "busy": "a second CUDA stream (default priority) runs a {size}^3 GEMM loop in the model dtype the "
            "whole time; before each timed call its queue is topped up to min(max(40 ms, 2x the "
            "call's warm-up median), 120 ms) of GEMM work, so the timed call competes with it for "
            "SMs and memory bandwidth from start to end",
    "cache_pressure": "{frac:.0%} of free device memory (capped at {cap}) is first filled with "
                      "random prefix K/V slabs; rank_cached reads its cached prefix from a random "
                      "place in that pool on every call (64 distinct users), full_forward runs "
                      "with the pool resident; the allocator cache is emptied before filling",
}


# ----------------------------------------------------------------------------- timing

def _copy_to(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src, non_blocking=True)


def _score_topk(corpus: torch.Tensor, user: torch.Tensor, k: int):
    return torch.topk(torch.matmul(corpus, user).squeeze(1), k)


def _cat_seq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, y], dim=2)


class Clock:
    """Times one call: CUDA events around it (then synchronise), or perf_counter_ns on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    @property
    def name(self) -> str:
        return "cuda_events" if self.cuda else "perf_counter_ns"

    def time(self, fn: Callable, args: tuple) -> float:
        if self.cuda:
            self.start.record()
            fn(*args)
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        t0 = time.perf_counter_ns()
        fn(*args)
        return (time.perf_counter_ns() - t0) / 1e6


@dataclass
class Budget:
    """How many timed calls a cell gets: about target_s of timed work, within [min_n, max_n].

    After soft_deadline_s of the run has passed, every further cell gets min_n calls.
    """
    warmup: int
    target_s: float
    min_n: int
    max_n: int
    soft_deadline_s: float
    t0: float = field(default_factory=time.monotonic)
    late_cells: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def samples_for(self, est_ms: float, target_s: float | None = None, max_n: int | None = None) -> int:
        if self.elapsed() > self.soft_deadline_s:
            self.late_cells += 1
            return self.min_n
        want = math.ceil((target_s or self.target_s) * 1e3 / max(est_ms, 1e-3))
        return int(min(max(want, self.min_n), max_n or self.max_n))


@dataclass
class Cell:
    """One grid point: the call to time and the argument sets it rotates through."""
    L: int
    M: int
    fn: Callable
    inputs: list[tuple]
    est_ms: float = 0.0
    n: int = 0
    B: int = 1


def measure_cells(cells: list[Cell], clock: Clock, budget: Budget, rng: np.random.Generator,
                  hook: Callable[[float | None], None] | None = None,
                  target_s: float | None = None, max_n: int | None = None) -> list[np.ndarray]:
    """Time the calls of several grid points, interleaved in a random order. Returns ms per cell.

    Each cell is warmed up first (which also estimates its call time and so its sample count);
    then all timed calls of all cells run in one shuffled sequence, each cell rotating through
    its own input sets. Slow periods of the host or device thus spread over every grid point
    instead of landing on the few that happen to be measured then; consecutive calls have
    different shapes, as consecutive requests do in serving. ``hook(expected_ms)`` runs before
    every call (a condition's gap or background load).
    """
    for c in cells:
        warm = []
        for i in range(budget.warmup):
            if hook:
                hook(warm[-1] if warm else None)
            warm.append(clock.time(c.fn, c.inputs[i % len(c.inputs)]))
        c.est_ms = float(np.median(warm[len(warm) // 2:]))
        c.n = budget.samples_for(c.est_ms, target_s, max_n)
    order = rng.permutation(np.repeat(np.arange(len(cells)), [c.n for c in cells]))
    out = [np.empty(c.n) for c in cells]
    pos = [0] * len(cells)
    for k in order:
        c, j = cells[k], pos[k]
        if hook:
            hook(c.est_ms)
        out[k][j] = clock.time(c.fn, c.inputs[(j + budget.warmup) % len(c.inputs)])
        pos[k] = j + 1
    return out


def host_probe(n: int = 300) -> dict:
    """Quantiles (ms) of a fixed pure-Python loop: how fast and how steady the host CPU is."""
    def spin():
        acc = 0
        for i in range(20000):
            acc += i
        return acc
    t = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        spin()
        t.append((time.perf_counter_ns() - t0) / 1e6)
    q = np.quantile(t, (0.1, 0.5, 0.9, 0.99))
    return {"python_loop_ms": {k: round(float(v), 4) for k, v in zip(("p10", "p50", "p90", "p99"), q)},
            "n": n}


class IdleGap:
    def __init__(self, lo_ms: float, hi_ms: float, rng: np.random.Generator):
        self.lo, self.hi, self.rng = lo_ms, hi_ms, rng

    def __call__(self, expected_ms):
        time.sleep(self.rng.uniform(self.lo, self.hi) / 1e3)


class BusyStream:
    """Keeps a second CUDA stream busy with a large GEMM loop while the main stream is timed."""

    MIN_COVER_MS, MAX_COVER_MS = 40.0, 120.0

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int = 4096, per_chunk: int = 4):
        self.size, self.per_chunk = size, per_chunk
        self.stream = torch.cuda.Stream(device)
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.c = torch.empty(size, size, device=device, dtype=dtype)
        self.pending: deque = deque()
        for _ in range(2):  # warm up, then time one chunk
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record(self.stream)
            self._chunk()
            t1.record(self.stream)
            t1.synchronize()
        self.chunk_ms = t0.elapsed_time(t1)
        self.tflops = 2 * size**3 * per_chunk / (self.chunk_ms * 1e-3) / 1e12

    def _chunk(self):
        with torch.cuda.stream(self.stream):
            for _ in range(self.per_chunk):
                torch.matmul(self.a, self.b, out=self.c)

    def __call__(self, expected_ms):
        """Before a timed call: top the queue up to 2x the call's expected time of GEMM work
        (clamped to [MIN_COVER_MS, MAX_COVER_MS]; MAX when unknown)."""
        cover = self.MAX_COVER_MS if expected_ms is None else 2 * expected_ms
        cover = min(max(cover, self.MIN_COVER_MS), self.MAX_COVER_MS)
        while self.pending and self.pending[0].query():
            self.pending.popleft()
        depth = math.ceil(cover / self.chunk_ms)
        while len(self.pending) < depth:
            self._chunk()
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.pending.append(ev)

    def stop(self):
        self.stream.synchronize()
        self.pending.clear()


class PressurePool:
    """Slabs of random prefix K/V filling a fraction of free device (or host) memory."""

    def __init__(self, device: torch.device, dtype: torch.dtype, frac: float, cap_bytes: float,
                 slab_bytes: int):
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _mem_available()
        self.free_before = free
        target = int(min(frac * free, cap_bytes))
        esize = torch.empty(0, dtype=dtype).element_size()
        block = torch.randn(1 << 20, device=device, dtype=dtype)
        slab_elems = math.ceil(slab_bytes / esize / block.numel()) * block.numel()
        slab_bytes = slab_elems * esize
        self.slabs = []
        for _ in range(max(1, target // slab_bytes)):
            slab = torch.empty(slab_elems, device=device, dtype=dtype)
            slab.view(-1, block.numel()).copy_(block)  # random-looking contents, cheaply
            self.slabs.append(slab)
        self.bytes = len(self.slabs) * slab_elems * esize
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def prefix(self, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
        """A view shaped like one user's cached prefix, at a random place in the pool."""
        n = math.prod(shape)
        slab = self.slabs[int(rng.integers(len(self.slabs)))]
        if n > slab.numel():
            raise RuntimeError(f"a prefix of {n} elements does not fit a pool slab of {slab.numel()}")
        off = int(rng.integers(0, (slab.numel() - n) // 256 + 1)) * 256
        return slab[off:off + n].view(shape)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


# ----------------------------------------------------------------------------- the benchmark

@dataclass
class Config:
    device: torch.device
    spec: GRSpec | ArchSpec
    history_lens: list[int]
    candidates: list[int]
    conditions: list[str]
    budget: Budget
    kernel_target_s: float
    kernel_max_n: int
    rotate_bytes: int
    emb_rows: int
    emb_dim: int
    corpus_items: int
    retrieval_dim: int
    prerank_hidden: tuple[int, ...]
    gap_ms: tuple[float, float]
    pressure_frac: float
    pressure_cap_bytes: float
    busy_gemm: int
    kernels: bool
    seed: int
    graphs: bool = False
    batch_sizes: tuple[int, ...] = ()
    batch_max_tokens: int = 32768


class Bench:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dev = cfg.device
        self.spec = cfg.spec
        self.dtype = cfg.spec.torch_dtype
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.clock = Clock(self.dev)
        self.rows: list[tuple] = []
        self.kernel_rows: list[tuple] = []
        self.pool: PressurePool | None = None
        self.info: dict = {}
        # The target-attention archs (arch_models): their phases come from the registry.
        self.registry = arch_models.REGISTRY.get(cfg.spec.arch)
        if self.registry is not None:
            self.model = build_arch_model(cfg.spec, self.dev, cfg.seed)
            self.phases = None
            self.prerank_dims = None
            return
        self.model: GRModel = build_model(cfg.spec, self.dev, cfg.seed)
        self.phases = Phases(self.model, cfg.graphs)
        d = cfg.emb_dim
        self.emb_table = torch.randn(cfg.emb_rows, d, device=self.dev, dtype=self.dtype)
        self.corpus = torch.randn(cfg.corpus_items, cfg.retrieval_dim, device=self.dev, dtype=self.dtype)
        dims = (2 * d, *cfg.prerank_hidden, 1)
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        self.prerank = nn.Sequential(*layers[:-1]).to(self.dev, self.dtype).eval()
        self.prerank_dims = list(dims)

    # -- helpers
    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, device=self.dev, dtype=self.dtype)

    def n_sets(self, set_bytes: int, lo: int = 3, hi: int = 32) -> int:
        """Enough input sets that one rotation moves about rotate_bytes (so caches don't flatter)."""
        return int(min(max(math.ceil(self.cfg.rotate_bytes / max(set_bytes, 1)), lo), hi))

    def tokens(self, t: int, batch: int = 1) -> torch.Tensor:
        return self.randn(batch, t, self.spec.d_model)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    # -- phase setups: the cells of one phase under one condition, sharing per-L / per-M inputs
    def arch_cells(self, phase: str) -> list[Cell]:
        """The cells of a registry phase: its callable and input sets at each grid point."""
        pd_ = self.registry[phase]
        fn = partial(pd_.run, self.model)
        out = []
        for L, M in self.shapes(phase):
            first = pd_.inputs(self.model, L, M, self.tokens)
            size = sum(x.numel() * x.element_size() for x in first if isinstance(x, torch.Tensor))
            inputs = [first] + [pd_.inputs(self.model, L, M, self.tokens)
                                for _ in range(self.n_sets(size) - 1)]
            out.append(Cell(L, M, fn, inputs))
        return out

    def cells(self, phase: str, condition: str, B: int = 1) -> list[Cell]:
        """B > 1: a padded batch of B requests of the same shape in one call (LM phases only)."""
        if self.registry is not None:
            return self.arch_cells(phase)
        sp, m, ph = self.spec, self.model, self.phases
        s, d, esize = sp.short_term_tokens, sp.d_model, self.dtype.itemsize
        per_L: dict[int, list] = {}
        per_M: dict[int, list] = {}

        def hist(L):  # token sets of L history tokens
            if L not in per_L:
                per_L[L] = [self.tokens(L, B) for _ in range(self.n_sets(B * L * d * esize))]
            return per_L[L]

        def kv(L):  # cached prefixes of L tokens
            if L not in per_L:
                if condition == "cache_pressure":  # a random user of the pool on every call
                    shape = (sp.layers, 2, 1, sp.heads, L, sp.head_dim)
                    per_L[L] = [self.pool.prefix(shape, self.rng) for _ in range(64)]
                else:
                    per_L[L] = [m.encode_prefix(self.tokens(L, B))
                                for _ in range(self.n_sets(B * L * sp.kv_bytes_per_token, 2))]
            return per_L[L]

        def suffix(M):  # (short-term, candidates) token sets
            if M not in per_M:
                per_M[M] = [(self.tokens(s, B), self.tokens(M, B))
                            for _ in range(self.n_sets(B * (s + M) * d * esize))]
            return per_M[M]

        def combine(a: list, b: list, f) -> list[tuple]:
            return [f(a[i % len(a)], b[i % len(b)]) for i in range(max(len(a), len(b)))]

        out = []
        for L, M in self.shapes(phase, B):
            if phase == "prefix_encode":
                fn, inputs = ph.encode, [(h,) for h in hist(L)]
            elif phase == "full_forward":
                fn, inputs = ph.full, combine(hist(L), suffix(M), lambda h, x: (h, *x))
            elif phase == "rank_cached":
                fn, inputs = ph.rank, combine(kv(L), suffix(M), lambda c, x: (c, *x))
            elif phase == "prefix_reload":
                shape = m.new_kv(1, L, "meta").shape
                dst = torch.empty(shape, device=self.dev, dtype=self.dtype)
                inputs = []
                for _ in range(self.n_sets(L * sp.kv_bytes_per_token)):
                    src = torch.empty(shape, dtype=self.dtype, pin_memory=self.dev.type == "cuda")
                    src.copy_(self.randn(*shape))
                    inputs.append((src, dst))
                fn = _copy_to
            elif phase == "emb_gather":
                fn = partial(F.embedding, weight=self.emb_table)
                inputs = [(torch.randint(0, self.cfg.emb_rows, (M,), device=self.dev),) for _ in range(32)]
            elif phase == "retrieval_score":
                fn = partial(_score_topk, self.corpus, k=M)
                inputs = [(self.randn(self.cfg.retrieval_dim, 1),) for _ in range(8)]
            elif phase == "prerank_mlp":
                width = 2 * self.cfg.emb_dim
                fn = self.prerank
                inputs = [(self.randn(M, width),) for _ in range(self.n_sets(M * width * esize))]
            else:
                raise ValueError(phase)
            out.append(Cell(L, M, fn, inputs, B=B))
        return out

    def shapes(self, phase: str, B: int = 1) -> list[tuple[int, int]]:
        """The grid of a phase; a batch of B only where B x (L + s + M) <= batch_max_tokens."""
        Ls, Ms = self.cfg.history_lens, self.cfg.candidates
        if self.registry is not None:
            dims = self.registry[phase].dims
            return [(L, M) for L in (Ls if "L" in dims else [0]) for M in (Ms if "M" in dims else [0])]
        if phase in L_PHASES:
            return [(L, 0) for L in Ls]
        if phase in M_PHASES:
            return [(0, M) for M in Ms]
        s = self.spec.short_term_tokens
        return [(L, M) for L in Ls for M in Ms
                if B == 1 or B * (L + s + M) <= self.cfg.batch_max_tokens]

    def run_phase(self, phase: str, condition: str, hook=None, B: int = 1):
        t0 = time.monotonic()
        gc.collect()
        try:
            cells = self.cells(phase, condition, B)
            if not cells:
                return
            self.sync()
            print(f"== {phase} / {condition} / batch {B}: {len(cells)} shapes, inputs ready in "
                  f"{time.monotonic() - t0:.1f}s", flush=True)
            results = measure_cells(cells, self.clock, self.cfg.budget, self.rng, hook)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(f"out of memory in phase={phase} condition={condition}; "
                               "choose a smaller grid") from e
        for c, x in zip(cells, results):
            if not np.all(np.isfinite(x)) or np.any(x <= 0):
                raise RuntimeError(f"bad timings at {phase}/{condition} L={c.L} M={c.M}: {x[:5]}")
            q = np.quantile(x, QUANTILES)
            for qq, t in zip(QUANTILES, q):
                self.rows.append((phase, condition, c.L, c.M, qq, float(t), len(x), c.B))
            print(f"  {phase:15s} {condition:14s} B={c.B} L={c.L:6d} M={c.M:5d} n={len(x):4d} "
                  f"p50={q[4]:9.3f} p99={q[8]:9.3f} ms", flush=True)
        del cells
        print(f"== [{self.cfg.budget.elapsed():6.1f}s] {phase} / {condition} done in "
              f"{time.monotonic() - t0:.1f}s", flush=True)

    # -- the run
    def preflight(self):
        """Run the largest shapes once, so a grid that does not fit fails at the start."""
        sp, Lmax, Mmax = self.spec, max(self.cfg.history_lens), max(self.cfg.candidates)
        t0 = time.monotonic()
        try:
            with torch.inference_mode():
                if self.registry is not None:
                    for pd_ in self.registry.values():
                        L, M = pd_.shape(Lmax, Mmax)
                        pd_.run(self.model, *pd_.inputs(self.model, L, M, self.tokens))
                        self.sync()
                else:
                    s = sp.short_term_tokens
                    kv = self.model.encode_prefix(self.tokens(Lmax))
                    self.model.rank_cached(kv, self.tokens(s), self.tokens(Mmax))
                    del kv
                    self.model.full_forward(self.tokens(Lmax), self.tokens(s), self.tokens(Mmax))
                    self.sync()
        except torch.OutOfMemoryError as e:
            raise RuntimeError(f"largest shape L={Lmax} M={Mmax} does not fit on {self.dev}: "
                               "choose a smaller grid") from e
        peak = torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda" else None
        print(f"preflight L={Lmax} M={Mmax} ok in {time.monotonic() - t0:.2f}s"
              + (f", peak allocated {peak / 2**30:.2f} GiB" if peak else ""), flush=True)
        self.info["preflight_peak_gib"] = None if peak is None else round(peak / 2**30, 3)

    def run_arch(self):
        """A registry arch: self-check, preflight, then every phase under every condition."""
        cfg = self.cfg
        check = arch_models.self_check(self.model, self.dev)
        tol = 1e-4 if self.dtype == torch.float32 else 5e-2
        print(f"arch self-check (relative error vs full_forward): {check} (tolerance {tol})", flush=True)
        if max(check.values()) > tol:
            raise RuntimeError(f"arch self-check failed: {check}")
        self.info["self_check"] = check
        self.info["host_probe_start"] = host_probe()
        print(f"host probe (pure-Python loop): {self.info['host_probe_start']}", flush=True)
        self.preflight()
        with torch.inference_mode():
            for phase in self.registry:
                self.run_phase(phase, "isolated")
            if "idle_gap" in cfg.conditions:
                hook = IdleGap(*cfg.gap_ms, self.rng)
                for phase in self.registry:
                    self.run_phase(phase, "idle_gap", hook)
            if "busy" in cfg.conditions:
                bg = BusyStream(self.dev, self.dtype, cfg.busy_gemm)
                self.info["busy"] = {"gemm": cfg.busy_gemm, "chunk_ms": round(bg.chunk_ms, 3),
                                     "tflops_alone": round(bg.tflops, 1)}
                for phase in self.registry:
                    self.run_phase(phase, "busy", bg)
                bg.stop()
                del bg
        self.info["host_probe_end"] = host_probe()
        print(f"host probe (pure-Python loop): {self.info['host_probe_end']}", flush=True)

    def run(self):
        cfg = self.cfg
        if self.registry is not None:
            return self.run_arch()
        check = self_check(self.model, self.dev)
        tol = 1e-4 if self.dtype == torch.float32 else 5e-2
        print(f"model self-check: {check} (tolerance {tol})", flush=True)
        if check["cached_vs_full"] > tol or check["candidate_leak"] > tol:
            raise RuntimeError(f"model self-check failed: {check}")
        self.info["self_check"] = check
        if cfg.graphs:
            L0, M0 = min(cfg.history_lens), min(cfg.candidates)
            err = self.phases.check(L0, M0, self.dev)
            print(f"CUDA graphs vs eager at L={L0} M={M0}: max relative difference {err:.2e}", flush=True)
            if err > tol:
                raise RuntimeError(f"CUDA-graph phases disagree with the eager model: {err}")
            self.info["graphs_vs_eager"] = err
        self.info["host_probe_start"] = host_probe()
        print(f"host probe (pure-Python loop): {self.info['host_probe_start']}", flush=True)
        self.preflight()
        with torch.inference_mode():
            for phase in PHASES:
                self.run_phase(phase, "isolated")
            for B in cfg.batch_sizes:
                for phase in LM_PHASES:
                    self.run_phase(phase, "isolated", B=B)
            if "idle_gap" in cfg.conditions:
                hook = IdleGap(*cfg.gap_ms, self.rng)
                for phase in LM_PHASES:
                    self.run_phase(phase, "idle_gap", hook)
            if "busy" in cfg.conditions:
                bg = BusyStream(self.dev, self.dtype, cfg.busy_gemm)
                print(f"busy stream: {cfg.busy_gemm}^3 GEMM chunk of {bg.per_chunk} = "
                      f"{bg.chunk_ms:.2f} ms ({bg.tflops:.0f} TFLOP/s alone)", flush=True)
                self.info["busy"] = {"gemm": cfg.busy_gemm, "chunk_ms": round(bg.chunk_ms, 3),
                                     "tflops_alone": round(bg.tflops, 1)}
                for phase in LM_PHASES:
                    self.run_phase(phase, "busy", bg)
                bg.stop()
                del bg
            if "cache_pressure" in cfg.conditions:
                gc.collect()
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                slab = 1 << 30 if self.dev.type == "cuda" else 1 << 28
                slab = max(slab, max(cfg.history_lens) * self.spec.kv_bytes_per_token)
                t0 = time.monotonic()
                self.pool = PressurePool(self.dev, self.dtype, cfg.pressure_frac, cfg.pressure_cap_bytes, slab)
                print(f"cache pressure: {self.pool.bytes / 2**30:.2f} GiB of prefix K/V filled "
                      f"(free before {self.pool.free_before / 2**30:.2f} GiB) in "
                      f"{time.monotonic() - t0:.1f}s", flush=True)
                self.info["cache_pressure"] = {"pool_gib": round(self.pool.bytes / 2**30, 2),
                                               "free_before_gib": round(self.pool.free_before / 2**30, 2)}
                for phase in LM_PHASES:
                    self.run_phase(phase, "cache_pressure")
                self.pool = None
                gc.collect()
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
            self.info["host_probe_end"] = host_probe()
            print(f"host probe (pure-Python loop): {self.info['host_probe_end']}", flush=True)
            if cfg.kernels:
                self.run_kernels()

    # -- kernels
    def kernel_list(self) -> list[tuple[str, int, int, int]]:
        """(kernel, dim_a, dim_b, dim_c): every operator of the model's phase graphs over the
        grid, read from their one declaration (simrec.operators), then the cascade's own
        kernels (pre-rank MLP and retrieval GEMMs, embedding gather, top-k)."""
        sp, cfg = self.spec, self.cfg
        out = [(op.kind, *(int(v) for v in op.dims), *(0,) * (3 - len(op.dims)))
               for L in cfg.history_lens for M in cfg.candidates for phase in opg.PHASES
               for op in opg.ops(opg.graph(sp, phase, L, M))]
        dims = self.prerank_dims
        out += [("gemm", M, dims[i + 1], dims[i]) for M in cfg.candidates for i in range(len(dims) - 1)]
        out += [("gemm", cfg.corpus_items, 1, cfg.retrieval_dim)]
        out += [("emb_gather", M, cfg.emb_dim, cfg.emb_rows) for M in cfg.candidates]
        out += [("topk", cfg.corpus_items, M, 0) for M in cfg.candidates]
        return list(dict.fromkeys(out))

    def kernel_setup(self, kernel: str, a: int, b: int, c: int):
        """The graph's operators as calibration/kernel_grid.py times them (the layouts the
        model issues); the cascade's gather and top-k here."""
        from .kernel_grid import Kernels, Shape
        if kernel == "emb_gather":
            return partial(F.embedding, weight=self.emb_table), [
                (torch.randint(0, self.cfg.emb_rows, (a,), device=self.dev),) for _ in range(32)]
        if kernel == "topk":
            return partial(torch.topk, k=b), [(self.randn(a),) for _ in range(4)]
        sp = self.spec
        kern = Kernels(self.dev, self.dtype, sp.short_term_tokens, self.cfg.rotate_bytes)
        arch = sp.arch if kernel.startswith("attn") else ""
        heads = sp.heads if kernel.startswith("attn") or kernel in opg.LAYOUT_KINDS else 0
        return kern.setup(Shape(kernel, (a, b, c), arch, heads))

    def run_kernels(self):
        """Each kernel shape is timed on its own (back to back), after its own warm-up."""
        t0 = time.monotonic()
        ks = self.kernel_list()
        print(f"== kernels / isolated: {len(ks)} shapes", flush=True)
        for kernel, a, b, c in ks:
            gc.collect()
            try:
                fn, inputs = self.kernel_setup(kernel, a, b, c)
                self.sync()
                x, = measure_cells([Cell(0, 0, fn, inputs)], self.clock, self.cfg.budget, self.rng,
                                   target_s=self.cfg.kernel_target_s, max_n=self.cfg.kernel_max_n)
                del fn, inputs
            except torch.OutOfMemoryError as e:
                raise RuntimeError(f"out of memory at kernel {kernel} [{a},{b},{c}]") from e
            for qq, t in zip(QUANTILES, np.quantile(x, QUANTILES)):
                self.kernel_rows.append((kernel, a, b, c, "isolated", qq, float(t), len(x)))
        print(f"== [{self.cfg.budget.elapsed():6.1f}s] kernels done in {time.monotonic() - t0:.1f}s", flush=True)

    # -- output
    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        t = pd.DataFrame(self.rows, columns=list(TABLE_COLUMNS))
        k = pd.DataFrame(self.kernel_rows, columns=list(KERNEL_COLUMNS))
        for f, ints in ((t, ("history_len", "candidates", "n_samples", "batch")),
                        (k, ("dim_a", "dim_b", "dim_c", "n_samples"))):
            for col in ints:
                f[col] = f[col].astype("int64")
        return t, k


# ----------------------------------------------------------------------------- manifest

def _versions(device: torch.device) -> dict:
    driver = None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            driver = r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver,
            "python": platform.python_version(), "numpy": np.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"name": torch.cuda.get_device_name(device), "kind": "cuda",
                "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"name": name, "kind": "cpu", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_outputs(bench: Bench, out: Path, name: str, started: float) -> dict:
    cfg = bench.cfg
    out.mkdir(parents=True, exist_ok=True)
    table, kernels = bench.frames()
    tpath, kpath = out / "table.parquet", out / "kernels.parquet"
    table.to_parquet(tpath, index=False)
    kernels.to_parquet(kpath, index=False)
    digest = hashlib.sha256(tpath.read_bytes()).hexdigest()
    b = cfg.budget
    gap = f"{cfg.gap_ms[0]:g}-{cfg.gap_ms[1]:g}"
    cap = "no cap" if math.isinf(cfg.pressure_cap_bytes) else f"{cfg.pressure_cap_bytes / 2**30:g} GiB"
    conds = {c: CONDITION_NOTES[c].format(gap=gap, size=cfg.busy_gemm, frac=cfg.pressure_frac, cap=cap)
             for c in ["isolated", *cfg.conditions] if c in CONDITION_NOTES}
    conds = {c: conds[c] for c in CONDITIONS if c in conds}
    if bench.registry is not None:
        model = {**cfg.spec.to_dict(), "batch": 1, "cuda_graphs": False,
                 "phases": {n: {"dims": list(p.dims), "what": p.what} for n, p in bench.registry.items()}}
    else:
        model = {**cfg.spec.to_dict(), "emb_rows": cfg.emb_rows, "emb_dim": cfg.emb_dim,
                 "corpus_items": cfg.corpus_items, "retrieval_dim": cfg.retrieval_dim,
                 "prerank_mlp": bench.prerank_dims, "batch": 1, "cuda_graphs": cfg.graphs}
    grid = {"history_len": list(cfg.history_lens), "candidates": list(cfg.candidates)}
    if cfg.batch_sizes:
        grid["batch"] = [1, *cfg.batch_sizes]
    manifest = {
        "format_version": 1,
        "name": name,
        "label": "measured",
        "table_file": tpath.name,
        "sha256": digest,
        "device": _device_info(cfg.device),
        "versions": _versions(cfg.device),
        "date": datetime.date.today().isoformat(),
        "model": model,
        "grid": grid,
        "method": {
            "warmup": b.warmup,
            "repeats": b.max_n,
            "min_samples": b.min_n,
            "target_s_per_point": b.target_s,
            "timer": bench.clock.name,
            "notes": (
                "One request (batch 1) per call, except the rows with batch > 1; the device is synchronised after every call and "
                "the time covers issue to completion, launch overhead included. Per grid point: "
                f"{b.warmup} warm-up calls, then about {b.target_s:g} s of timed calls, at least "
                f"{b.min_n} and at most {b.max_n} (n_samples says how many; quantiles from few "
                "samples, the 0.99 one especially, are crude). Inputs rotate among pre-allocated "
                f"sets that together span about {cfg.rotate_bytes / 2**20:.0f} MiB (3-32 sets) so "
                "caches don't flatter. Within a phase and condition every grid point is warmed up, "
                "then the timed calls of all its grid points run interleaved in one random order "
                "(so slow periods of the host spread over all points, and consecutive calls differ "
                "in shape as consecutive requests do). " + (
                    ARCH_NOTE.format(arch=cfg.spec.arch) + "Inputs are random token embeddings. "
                    "Eager PyTorch, no CUDA graphs, no torch.compile." if bench.registry is not None else
                "Inputs are random token embeddings (no embedding lookup inside the "
                "ranking phases). rank_cached appends the suffix K/V to the cached K/V with "
                "torch.cat in every layer. prefix_reload copies one contiguous [layers,2,1,heads,"
                "L,head_dim] tensor from pinned host memory (on a CPU device: a plain memcpy). "
                "emb_gather is F.embedding of M random ids; retrieval_score is corpus @ user then "
                "torch.topk(K=candidates); prerank_mlp is the MLP in model.prerank_mlp over K "
                "rows. " + (BATCH_NOTE.format(sizes=list(cfg.batch_sizes), cap=cfg.batch_max_tokens)
                            if cfg.batch_sizes else "") + (GRAPHS_NOTE if cfg.graphs else "Eager PyTorch, no CUDA graphs, no torch.compile."))),
            "conditions": conds,
            "phases_per_condition": (
                {c: list(bench.registry) for c in ["isolated", *cfg.conditions]}
                if bench.registry is not None else
                {"isolated": list(PHASES), **{c: list(LM_PHASES) for c in cfg.conditions if c != "isolated"}}),
            "quantiles": list(QUANTILES),
            "quantile_method": "numpy.quantile, linear interpolation",
            "kernels_file": kpath.name,
            "kernels_sha256": hashlib.sha256(kpath.read_bytes()).hexdigest(),
            "soft_deadline_s": b.soft_deadline_s,
            "points_cut_to_min_samples": b.late_cells,
            "run_seconds": round(time.monotonic() - started, 1),
            "seed": cfg.seed,
            "command": " ".join(sys.argv),
            **bench.info,
        },
        "errors": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- summary

def summarize_arch(table: pd.DataFrame, manifest: dict) -> str:
    """The summary of a registry arch's table: per phase (registry order) and condition, p50 ms."""
    m = manifest["model"]
    lines = [f"# {manifest['name']}: {manifest['device']['name']}, {m['arch']} "
             f"{m['layers']}x{m['d_model']} {m['dtype']}"]
    key = ["phase", "condition", "history_len", "candidates"]
    med = table[table["quantile"] == 0.5].set_index(key)["time_ms"].sort_index()
    have = set(med.index.droplevel([2, 3]))
    declared = list(m.get("phases", {}))
    order = declared + sorted({p for p, _ in have} - set(declared))
    for phase, cond in ((p, c) for p in order for c in CONDITIONS if (p, c) in have):
        piv = med.loc[phase, cond].unstack("candidates")
        lines.append(f"\n{phase} {cond} p50 ms (rows L, columns M; 0 = not a dim of the phase)")
        lines.append(piv.to_string(float_format=lambda v: f"{v:9.3f}"))
    return "\n".join(lines)


def summarize(table: pd.DataFrame, manifest: dict) -> str:
    if manifest["model"].get("arch") in arch_models.ARCHS:
        return summarize_arch(table, manifest)
    lines = []
    batched = table[table["batch"] > 1] if "batch" in table else table.iloc[:0]
    if "batch" in table:
        table = table[table["batch"] == 1]
    kvpt = manifest["model"]["kv_bytes_per_token"]
    key = ["phase", "condition", "history_len", "candidates"]
    med = table[table["quantile"] == 0.5].set_index(key)["time_ms"].sort_index()
    p99 = table[table["quantile"] == 0.99].set_index(key)["time_ms"].sort_index()
    lines.append(f"# {manifest['name']}: {manifest['device']['name']}, {manifest['model']['arch']} "
                 f"{manifest['model']['layers']}x{manifest['model']['d_model']} {manifest['model']['dtype']}")
    for phase in LM_PHASES:
        if (phase, "isolated") not in med.index.droplevel([2, 3]):
            continue
        piv = med.loc[phase, "isolated"].unstack("candidates")
        lines.append(f"\n{phase} isolated p50 ms (rows L, columns M)")
        lines.append(piv.to_string(float_format=lambda v: f"{v:8.3f}"))
    for phase in L_PHASES:
        if (phase, "isolated") not in med.index.droplevel([2, 3]):
            continue
        lines.append(f"\n{phase} isolated")
        for (L, _), v in med.loc[phase, "isolated"].items():
            extra = f"  {L * kvpt / v / 1e6:7.2f} GB/s" if phase == "prefix_reload" else ""
            lines.append(f"  L={L:6d} p50={v:9.3f} p99={p99.loc[phase, 'isolated', L, 0]:9.3f} ms{extra}")
    for phase in M_PHASES:
        if (phase, "isolated") not in med.index.droplevel([2, 3]):
            continue
        vals = "  ".join(f"M={M}:{v:.3f}" for (_, M), v in med.loc[phase, "isolated"].items())
        lines.append(f"{phase:15s} isolated p50 ms  {vals}")
    lines.append("\nin-serving conditions vs isolated, over all (L, M) points: "
                 "ratio of p50 to isolated p50 [min / median / max]; p99 to isolated p50 median")
    for phase in LM_PHASES:
        for cond in CONDITIONS[1:]:
            try:
                c50, c99, iso = med.loc[phase, cond], p99.loc[phase, cond], med.loc[phase, "isolated"]
            except KeyError:
                continue
            r = (c50 / iso).dropna()
            r99 = (c99 / iso).dropna()
            lines.append(f"  {phase:13s} {cond:14s} p50 x{r.min():.2f} / x{r.median():.2f} / x{r.max():.2f}"
                         f"   p99 x{r99.median():.2f}")
        iso99 = (p99.loc[phase, "isolated"] / med.loc[phase, "isolated"]).median()
        lines.append(f"  {phase:13s} {'isolated':14s} p99/p50 median x{iso99:.2f}")
    if len(batched):
        lines.append("\nbatched, isolated: p50 of a batch of B over B x the p50 of one request "
                     "[min / median / max over (L, M)]")
        bmed = batched[batched["quantile"] == 0.5]
        for (phase, B), g in bmed.groupby(["phase", "batch"]):
            one = med.loc[phase, "isolated"]
            r = np.array([t / (B * one.loc[L, M]) for L, M, t in
                          zip(g["history_len"], g["candidates"], g["time_ms"])])
            lines.append(f"  {phase:13s} B={B:<3d} x{r.min():.2f} / x{np.median(r):.2f} / x{r.max():.2f}"
                         f"  ({len(r)} shapes)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def _ints(text: str) -> list[int]:
    vals = [int(v) for v in text.split(",") if v.strip()]
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"need a comma-separated list of positive ints (got {text!r})")
    return sorted(set(vals))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m calibration.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (table.parquet, kernels.parquet, manifest.json)")
    p.add_argument("--name", help="table name in the manifest (default: the output folder's name)")
    p.add_argument("--summary", type=Path, metavar="DIR", help="print the summary of an existing table and exit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="transformer", choices=("transformer", "hstu", *arch_models.ARCHS))
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--d-model", type=int, default=512)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--ffn", type=int, default=2048)
    m.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    m.add_argument("--short-term", type=int, default=32, help="transformer/hstu only")
    m.add_argument("--summary-tokens", type=int, default=128, help="vista: summary tokens k")
    m.add_argument("--segment-len", type=int, default=128, help="laser: history tokens per segment")
    m.add_argument("--chunk-tokens", type=int, default=1 << 19,
                   help="stca without RLB: history tokens (M copies) encoded per chunk")
    g = p.add_argument_group("grid")
    g.add_argument("--history-lens", type=_ints, default=_ints("256,512,1024,2048,4096,8192,16384"))
    g.add_argument("--candidates", type=_ints, default=_ints("32,64,128,256,512,1024"))
    g.add_argument("--emb-rows", type=int, default=None, help="default 1M on cuda, 200k on cpu")
    g.add_argument("--emb-dim", type=int, default=64)
    g.add_argument("--corpus", type=int, default=None, help="retrieval corpus; default 1M on cuda, 100k on cpu")
    g.add_argument("--retrieval-dim", type=int, default=64)
    g.add_argument("--prerank-hidden", type=_ints_ordered, default=(256, 64))
    t = p.add_argument_group("method")
    t.add_argument("--conditions", default="isolated,idle_gap,busy,cache_pressure",
                   help="isolated always runs; busy is dropped on cpu")
    t.add_argument("--warmup", type=int, default=None, help="default 10 on cuda, 3 on cpu")
    t.add_argument("--target-s", type=float, default=0.5, help="timed seconds per grid point")
    t.add_argument("--min-samples", type=int, default=30)
    t.add_argument("--max-samples", type=int, default=300)
    t.add_argument("--kernel-target-s", type=float, default=0.1)
    t.add_argument("--kernel-max-samples", type=int, default=200)
    t.add_argument("--soft-deadline-s", type=float, default=420.0,
                   help="after this many seconds every further point gets --min-samples calls")
    t.add_argument("--rotate-mib", type=float, default=None, help="default 256 on cuda, 64 on cpu")
    t.add_argument("--gap-ms", type=_floats2, default=(2.0, 5.0))
    t.add_argument("--pressure-frac", type=float, default=0.6)
    t.add_argument("--pressure-max-gib", type=float, default=None, help="default: none on cuda, 2 on cpu")
    t.add_argument("--busy-gemm", type=int, default=4096)
    t.add_argument("--no-kernels", action="store_true")
    t.add_argument("--batch-sizes", type=_ints, default=[],
                   help="also time rank_cached and full_forward on batches of these sizes (> 1)")
    t.add_argument("--batch-max-tokens", type=int, default=32768,
                   help="batched points only where batch x (L + s + M) is at most this")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cuda-graphs", action="store_true",
                   help="run the GR phases as CUDA graphs, one per shape (cuda only)")
    args = p.parse_args(argv)
    if args.summary is None and args.out is None:
        p.error("--out is required (or --summary DIR)")
    return args


def _ints_ordered(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats2(text: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in text.split(","))
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need LO,HI with 0 <= LO <= HI (got {text!r})")
    return lo, hi


def config_from_args(a: argparse.Namespace) -> Config:
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    cuda = device.type == "cuda"
    if a.cuda_graphs and not cuda:
        raise SystemExit("--cuda-graphs needs --device cuda")
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    conds = [c.strip() for c in a.conditions.split(",") if c.strip()]
    unknown = set(conds) - set(CONDITIONS)
    if unknown:
        raise SystemExit(f"unknown condition(s): {sorted(unknown)} (known: {CONDITIONS})")
    conds = [c for c in CONDITIONS[1:] if c in conds and (cuda or c != "busy")]
    if a.arch in arch_models.ARCHS:
        if a.cuda_graphs:
            raise SystemExit(f"--cuda-graphs is not supported for --arch {a.arch}")
        if any(b > 1 for b in a.batch_sizes):
            raise SystemExit(f"--batch-sizes is not supported for --arch {a.arch}")
        if "cache_pressure" in conds:
            print(f"note: condition cache_pressure is not measured for --arch {a.arch}", flush=True)
            conds.remove("cache_pressure")
        spec = ArchSpec(arch=a.arch, layers=a.layers, d_model=a.d_model, heads=a.heads, ffn=a.ffn,
                        dtype=dtype, summary_tokens=a.summary_tokens, segment_len=a.segment_len,
                        chunk_tokens=a.chunk_tokens)
        a.no_kernels = True
    else:
        spec = GRSpec(arch=a.arch, layers=a.layers, d_model=a.d_model, heads=a.heads, ffn=a.ffn,
                      dtype=dtype, short_term_tokens=a.short_term)
    cap = a.pressure_max_gib if a.pressure_max_gib is not None else (math.inf if cuda else 2.0)
    return Config(
        device=device, spec=spec, history_lens=a.history_lens, candidates=a.candidates,
        conditions=conds,
        budget=Budget(warmup=a.warmup if a.warmup is not None else (10 if cuda else 3),
                      target_s=a.target_s, min_n=a.min_samples, max_n=max(a.max_samples, a.min_samples),
                      soft_deadline_s=a.soft_deadline_s),
        kernel_target_s=a.kernel_target_s, kernel_max_n=max(a.kernel_max_samples, a.min_samples),
        rotate_bytes=int((a.rotate_mib or (256 if cuda else 64)) * 2**20),
        emb_rows=a.emb_rows or (1_000_000 if cuda else 200_000), emb_dim=a.emb_dim,
        corpus_items=a.corpus or (1_000_000 if cuda else 100_000), retrieval_dim=a.retrieval_dim,
        prerank_hidden=a.prerank_hidden, gap_ms=a.gap_ms, pressure_frac=a.pressure_frac,
        pressure_cap_bytes=cap * 2**30, busy_gemm=a.busy_gemm, kernels=not a.no_kernels, seed=a.seed,
        graphs=a.cuda_graphs, batch_sizes=tuple(b for b in a.batch_sizes if b > 1),
        batch_max_tokens=a.batch_max_tokens)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary is not None:
        manifest = json.loads((args.summary / "manifest.json").read_text())
        print(summarize(pd.read_parquet(args.summary / manifest["table_file"]), manifest))
        return 0
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    cfg.budget.t0 = started
    name = args.name or args.out.resolve().name
    print(f"simrec calibration bench: {name} on {_device_info(cfg.device)['name']} "
          f"({cfg.device}), torch {torch.__version__}, model {cfg.spec.to_dict()}", flush=True)
    print(f"grid L={cfg.history_lens} M={cfg.candidates}; conditions isolated+{cfg.conditions}", flush=True)
    bench = Bench(cfg)
    try:
        bench.run()
    except BaseException:
        if bench.rows:  # keep what was measured for diagnosis; it is not a valid table
            args.out.mkdir(parents=True, exist_ok=True)
            bench.frames()[0].to_parquet(args.out / "partial_table.parquet", index=False)
            print(f"FAILED; {len(bench.rows)} rows kept in {args.out / 'partial_table.parquet'}",
                  file=sys.stderr, flush=True)
        raise
    manifest = write_outputs(bench, args.out, name, started)
    print(f"\nwrote {args.out}/table.parquet ({len(bench.rows)} rows), kernels.parquet "
          f"({len(bench.kernel_rows)} rows), manifest.json in {time.monotonic() - started:.1f}s\n", flush=True)
    print(summarize(pd.read_parquet(args.out / "table.parquet"), manifest), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
