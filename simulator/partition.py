"""Partition controllers: where each device's HBM boundary between EMB and KV goes.

A static split is set once (hbm_pool.Hbm). The adaptive controllers are one SimPy process
per device, waking every `interval_ms`. Both estimate, in ms of device time per interval,
what bytes on each side save:

- EMB: ids looked up x ms per missed row x h(rows), with h the Che curve of the item
  popularity (embedding_cache.py; the controllers know the Zipf law, as a profiled
  popularity would give, but not the drift). The rows actually useful are read off the
  observed hit ratio (h^-1 of it): when drift keeps the valid rows below the side's size,
  extra EMB bytes save nothing.
- KV: every first reference of a request to its prefix carries its LRU stack depth in
  bytes (resident: bytes used more recently; evicted: beyond all resident bytes, from the
  ghost list) and the time a hit saves. By LRU inclusion, a KV side of c bytes would have
  hit exactly the references with depth <= c, so these give the saved time at every size.

`marginal_controller` hill-climbs: it moves one step toward the side whose next bytes save
more than the other side loses. `miss_curve_controller` builds both curves over all
splits and jumps to the best one (within a maximum step), so it follows a regime shift
within a few intervals. Both read the SLO: the marginal step doubles for each interval in
a row that missed it, and the miss-curve controller drops its minimum-gain hysteresis.
"""

from __future__ import annotations

import math

import numpy as np
import simpy

from . import scenario as sc
from .hbm_pool import Hbm, HbmPool, Interval

GRID = 100          # splits the miss-curve controller considers (and KV depth bins)
FULL = 0.97         # an EMB side is "full" when the valid rows reach this share of it


def start_controllers(env: simpy.Environment, hbm: Hbm) -> None:
    """One controller process per device, unless the split is static."""
    p = hbm.cfg.partition
    for pool in hbm.pools:
        if isinstance(p, sc.MarginalPartition):
            env.process(marginal_controller(env, hbm, pool, p))
        elif isinstance(p, sc.MissCurvePartition):
            env.process(miss_curve_controller(env, hbm, pool, p))


def useful_rows(hbm: Hbm, pool: HbmPool, it: Interval) -> float:
    """Rows the EMB side effectively holds, from the hit ratio observed in the interval;
    infinite when the side is full (more rows would be filled and used)."""
    rows = pool.emb.rows
    if it.ids == 0:
        return math.inf
    observed = hbm.curve.rows_for(1.0 - it.misses / it.ids)
    return math.inf if observed >= FULL * rows else observed


def emb_saved(hbm: Hbm, ids: float, rows: float, cap: float) -> float:
    """ms saved per interval by an EMB side of `rows` rows (no more than `cap` useful)."""
    return ids * hbm.cost.ms_per_miss * hbm.curve.hit(min(rows, cap))


def late_fraction(it: Interval) -> float:
    return it.late / it.rankings if it.rankings else 0.0


def marginal_controller(env: simpy.Environment, hbm: Hbm, pool: HbmPool, cfg: sc.MarginalPartition):
    """Every interval, move a step of the pool to the side whose next bytes save the most."""
    m, rb = cfg.memory, pool.emb.row_bytes
    est = np.zeros(4)           # EWMA of (kv gain, emb loss, emb gain, kv loss), ms per interval
    streak = 0
    while True:
        yield env.timeout(cfg.interval_ms)
        it = pool.take_interval()
        if env.now < cfg.hold_s * 1000.0:
            continue
        streak = streak + 1 if late_fraction(it) > cfg.slo_miss_target else 0
        step = min(cfg.step_fraction * 2 ** streak, 0.5) * pool.pool_bytes
        rows, kv = pool.emb.rows, pool.kv.capacity
        cap = useful_rows(hbm, pool, it)
        d_rows = step / rb
        here = emb_saved(hbm, it.ids, rows, cap)
        depths = np.array([d for d, _ in it.kv_refs], float)
        saved = np.array([s for _, s in it.kv_refs], float)
        new = np.array([
            saved[(depths > kv) & (depths <= kv + step)].sum(),                  # KV grows
            here - emb_saved(hbm, it.ids, max(rows - d_rows, 0), cap),           # EMB shrinks
            emb_saved(hbm, it.ids, rows + d_rows, cap) - here,                   # EMB grows
            saved[(depths > kv - step) & (depths <= kv)].sum()])                 # KV shrinks
        est = m * est + (1 - m) * new
        to_kv, to_emb = est[0] - est[1], est[2] - est[3]
        emb = pool.emb_bytes
        if to_kv > 0 and to_kv >= to_emb and emb > pool.min_emb_bytes:
            pool.set_emb_bytes(emb - step, env.now)
        elif to_emb > 0 and emb < pool.max_emb_bytes:
            pool.set_emb_bytes(emb + step, env.now)


def miss_curve_controller(env: simpy.Environment, hbm: Hbm, pool: HbmPool,
                          cfg: sc.MissCurvePartition):
    """Every interval, jump toward the split whose predicted saved time is largest."""
    m, rb, P = cfg.memory, pool.emb.row_bytes, pool.pool_bytes
    bin_bytes = P / GRID
    kv_hist = np.zeros(GRID + 1)       # EWMA of saved ms by depth bin (last bin: deeper than the pool)
    ids = 0.0
    fractions = np.linspace(0.0, 1.0, GRID + 1)
    allowed = (fractions * P >= pool.min_emb_bytes - 1) & (fractions * P <= pool.max_emb_bytes + 1)
    while True:
        yield env.timeout(cfg.interval_ms)
        it = pool.take_interval()
        if env.now < cfg.hold_s * 1000.0:
            continue
        new = np.zeros(GRID + 1)
        for depth, saved in it.kv_refs:
            new[min(int(math.ceil(depth / bin_bytes)) - 1, GRID)] += saved
        kv_hist = m * kv_hist + (1 - m) * new
        ids = m * ids + (1 - m) * it.ids
        cap = useful_rows(hbm, pool, it)
        # A KV side of (1 - f) P bytes keeps the references of depth <= (1 - f) P.
        kv_cum = np.concatenate(([0.0], np.cumsum(kv_hist[:GRID])))      # saved by k bins
        kv_saved = kv_cum[GRID - np.arange(GRID + 1)]
        emb_curve = np.array([emb_saved(hbm, ids, f * P / rb, cap) for f in fractions])
        total = np.where(allowed, emb_curve + kv_saved, -np.inf)
        best = int(np.argmax(total))
        emb = pool.emb_bytes
        f_now = emb / P
        now_saved = emb_saved(hbm, ids, emb / rb, cap) + np.interp(1.0 - f_now, fractions, kv_cum)
        gain = total[best] - now_saved
        misses = ids * hbm.cost.ms_per_miss + kv_hist.sum()       # all the time at stake
        urgent = late_fraction(it) > cfg.slo_miss_target
        if gain > 0 and (urgent or gain > cfg.min_gain * misses):
            move = float(np.clip(fractions[best] * P - emb, -cfg.max_step_fraction * P,
                                 cfg.max_step_fraction * P))
            pool.set_emb_bytes(emb + move, env.now)
