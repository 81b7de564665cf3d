"""Fit a serving profile (`serving_profile.py`) from one serving log and its cost table.

Every executed job gives its busy time (device time plus the host's time before it) and its
table median. The fit alternates two steps, twice:

1. **Excess.** busy - median, over the jobs outside slow episodes, kept as quantiles per
   phase, size class of the median and idle bin. Each job's expected time is then its median
   plus the median excess of its pool, and r = busy / expected its slowness.
2. **Episodes.** Time is cut into windows of about `JOBS_PER_WINDOW` jobs; each window's
   statistic is the median log r of the jobs that started in it (robust to single slow
   jobs). A two-state Gaussian hidden Markov model over the windows (Baum-Welch, windows
   with too few jobs left unobserved) labels each window normal or slow; episodes are the
   runs of slow windows (posterior > 0.5).

Why an HMM: it is the smallest model that says *slow spells that persist*, and its states
give episode boundaries, durations and rates directly. It is accepted only if it beats, by
BIC, both one state (no slowdown) and an i.i.d. two-component mixture of the same windows
(slow windows that do not cluster in time are per-job noise, which the excess already holds).
A window-statistic HMM cannot see episodes shorter than a window; they stay in the excess.

Durations and slowdowns are kept as the empirical values of the episodes found (an episode
cut by the end of the log counts with the length it was seen); the rate is episodes per
minute of normal running. An episode's factor F is the median slowness of its jobs; how much
of it each size class feels (its elasticity e: a job runs F ** e slower) is fitted by least
squares, because on a host-bound server a slow host stretches short jobs and hardly long ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import scenario as sc
from .serving_profile import ALL, IDLE_EDGES_MS, PhaseExcess, Profile

QUANTILES = np.unique(np.concatenate([np.linspace(0, 1, 101), [0.995, 0.999]]))
MIN_POOL = 50              # jobs a pool needs; fewer fall back to a coarser pool
MAX_SIZE_CLASSES = 4
JOBS_PER_WINDOW = 25
MIN_WINDOW_JOBS = 5
WINDOW_S = (0.1, 2.0)      # window length bounds (s)


def job_phase(kind: pd.Series, outcome: pd.Series) -> np.ndarray:
    """The table phase a logged job ran: a cached ranking, a full one, or a prefix encode."""
    k, o = kind.to_numpy(str), outcome.to_numpy(str)
    return np.where(k == "pre", "prefix_encode", np.where(o == "hit", "rank_cached", "full_forward"))


# ----------------------------------------------------------------------------- excess

def _size_edges(base: np.ndarray) -> list[float]:
    """Size classes of table medians: one per distinct value when there are few, else
    quartiles; edges halfway between classes."""
    u = np.unique(np.round(base, 6))
    if len(u) <= MAX_SIZE_CLASSES:
        return [float(x) for x in (u[1:] + u[:-1]) / 2]
    return [float(x) for x in np.unique(np.quantile(base, [0.25, 0.5, 0.75]))]


def _pools(base: np.ndarray, idle: np.ndarray, excess: np.ndarray) -> PhaseExcess:
    edges = _size_edges(base)
    size = np.searchsorted(edges, base, side="right")
    ib = np.searchsorted(IDLE_EDGES_MS, idle)          # serving_profile.idle_bin, vectorised
    pools = {}
    for b in np.unique(size):
        sel = size == b
        if sel.sum() >= MIN_POOL:
            pools[(int(b), -1)] = np.quantile(excess[sel], QUANTILES)
            for i in np.unique(ib[sel]):
                s2 = sel & (ib == i)
                if s2.sum() >= MIN_POOL:
                    pools[(int(b), int(i))] = np.quantile(excess[s2], QUANTILES)
    return PhaseExcess(edges, (float(base.min()), float(base.max())), pools, {})


def fit_excess(phase: np.ndarray, base: np.ndarray, idle: np.ndarray, excess: np.ndarray
               ) -> dict[str, PhaseExcess]:
    out = {p: _pools(base[phase == p], idle[phase == p], excess[phase == p]) for p in np.unique(phase)}
    out[ALL] = _pools(base, idle, excess)
    out[ALL].pools[(-1, -1)] = np.quantile(excess, QUANTILES)
    return out


def expected_ms(profile_phases: dict[str, PhaseExcess], phase, base, idle) -> np.ndarray:
    """Per job: table median + the median excess of its pool."""
    prof = Profile(QUANTILES, profile_phases, None, {})
    mid = int(np.searchsorted(QUANTILES, 0.5))
    return np.array([b + prof.pool(p, b, i)[0][mid] for p, b, i in zip(phase, base, idle)])


def fit_elasticity(phases: dict[str, PhaseExcess], phase, base, log_r, log_f, in_episode) -> None:
    """Per phase and size class: the least-squares e in log r = e log F over the jobs in
    episodes (F: their episode's factor), clipped to [0, 3]; classes with fewer than
    MIN_POOL / 2 such jobs keep 1 (the factor as it is)."""
    for name, ex in phases.items():
        sel = in_episode & ((phase == name) if name != ALL else True)
        sizes = np.searchsorted(ex.base_edges_ms, base, side="right")
        for b in np.unique(sizes[sel]):
            s2 = sel & (sizes == b)
            den = float(np.sum(log_f[s2] ** 2))
            if s2.sum() >= MIN_POOL // 2 and den > 0:
                ex.elasticity[int(b)] = float(np.clip(np.sum(log_r[s2] * log_f[s2]) / den, 0.0, 3.0))


# ----------------------------------------------------------------------------- HMM

def _normal_pdf(x, mu, sd):
    return np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


@dataclass
class HMMFit:
    mu: np.ndarray          # state means (state 1 the slower)
    sd: np.ndarray
    A: np.ndarray           # transitions
    post: np.ndarray        # per window: P(slow)
    loglik: float


def fit_hmm(x: np.ndarray, seen: np.ndarray, iters: int = 200, mixture: bool = False) -> HMMFit:
    """Two-state Gaussian HMM by Baum-Welch; unobserved windows carry no emission. With
    `mixture`, the transitions are tied to the state frequencies (an i.i.d. mixture)."""
    xs = x[seen]
    lo, hi = np.quantile(xs, [0.5, 0.95])
    spread = max(float(np.median(np.abs(xs - lo))) * 1.4826, 1e-3)
    mu, sd = np.array([lo, max(hi, lo + spread)]), np.array([spread, spread])
    A = np.array([[0.95, 0.05], [0.3, 0.7]])
    pi = np.array([0.9, 0.1])
    T = len(x)
    floor = max(spread * 0.05, 1e-4)
    prev = -np.inf
    for _ in range(iters):
        B = np.ones((T, 2))
        B[seen] = _normal_pdf(xs[:, None], mu[None, :], sd[None, :]) + 1e-300
        alpha, c = np.empty((T, 2)), np.empty(T)
        a = pi * B[0]
        for t in range(T):
            if t:
                a = (alpha[t - 1] @ A) * B[t]
            c[t] = a.sum()
            alpha[t] = a / c[t]
        beta = np.ones((T, 2))
        for t in range(T - 2, -1, -1):
            beta[t] = (A @ (B[t + 1] * beta[t + 1])) / c[t + 1]
        gamma = alpha * beta
        gamma /= gamma.sum(1, keepdims=True)
        ll = float(np.log(c).sum())
        xi = (alpha[:-1, :, None] * A[None] * (B[1:] * beta[1:])[:, None, :]) / c[1:, None, None]
        pi = gamma[0]
        if mixture:
            f = gamma.mean(0)
            A = np.vstack([f, f])
        else:
            A = xi.sum(0) / np.maximum(xi.sum(0).sum(1, keepdims=True), 1e-300)
        g = gamma[seen]
        w = g.sum(0) + 1e-12
        mu = (g * xs[:, None]).sum(0) / w
        sd = np.maximum(np.sqrt((g * (xs[:, None] - mu) ** 2).sum(0) / w), floor)
        if ll - prev < 1e-7 * abs(ll):
            break
        prev = ll
    if mu[1] < mu[0]:
        mu, sd, A, gamma = mu[::-1], sd[::-1], A[::-1, ::-1], gamma[:, ::-1]
    return HMMFit(mu, sd, A, gamma[:, 1], ll)


def _bic(loglik: float, k: int, n: int) -> float:
    return k * math.log(n) - 2 * loglik


def find_episodes(start_ms: np.ndarray, slowness: np.ndarray) -> dict:
    """Windows, HMM, model choice and the episodes (window index runs) found."""
    span_s = (start_ms.max() - start_ms.min()) / 1000.0
    rate = len(start_ms) / max(span_s, 1e-9)
    window_s = float(np.clip(JOBS_PER_WINDOW / rate, *WINDOW_S))
    w = ((start_ms - start_ms.min()) // (window_s * 1000)).astype(int)
    T = int(w.max()) + 1
    logr = np.log(slowness)
    df = pd.DataFrame({"w": w, "x": logr}).groupby("w")["x"].agg(["median", "size"])
    x = np.zeros(T)
    n = np.zeros(T, int)
    x[df.index] = df["median"].to_numpy()
    n[df.index] = df["size"].to_numpy()
    seen = n >= MIN_WINDOW_JOBS
    diag = {"window_s": round(window_s, 4), "windows": T, "windows_seen": int(seen.sum())}
    if seen.sum() < 20:
        return {**diag, "accepted": False, "reason": "fewer than 20 windows with enough jobs", "runs": [],
                "window_of_job": w, "slow_window": np.zeros(T, bool)}
    xs = x[seen]
    one = float(np.sum(np.log(_normal_pdf(xs, xs.mean(), max(xs.std(), 1e-4)) + 1e-300)))
    hmm = fit_hmm(x, seen)
    mix = fit_hmm(x, seen, mixture=True)
    m = int(seen.sum())
    bic = {"one_state": _bic(one, 2, m), "mixture": _bic(mix.loglik, 5, m), "hmm": _bic(hmm.loglik, 7, m)}
    accepted = bic["hmm"] < bic["one_state"] and bic["hmm"] < bic["mixture"] and hmm.mu[1] > hmm.mu[0]
    slow = (hmm.post > 0.5) if accepted else np.zeros(T, bool)
    runs = []
    t = 0
    while t < T:
        if slow[t]:
            u = t
            while u + 1 < T and slow[u + 1]:
                u += 1
            runs.append((t, u))
            t = u + 1
        else:
            t += 1
    diag.update({"bic": {k: round(v, 2) for k, v in bic.items()}, "accepted": bool(accepted),
                 "state_log_means": [round(float(v), 5) for v in hmm.mu],
                 "state_log_sds": [round(float(v), 5) for v in hmm.sd],
                 "transitions": [[round(float(v), 5) for v in row] for row in hmm.A]})
    if not accepted:
        diag["reason"] = ("a persistent slow state does not beat one state and an i.i.d. mixture by BIC")
    return {**diag, "runs": runs if accepted else [], "window_of_job": w, "slow_window": slow}


# ----------------------------------------------------------------------------- the fit

def executed(ran: pd.DataFrame, medians, warmup_ms: float) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The jobs that ran a phase after the warm-up (a cancelled pre job ran none), in start
    order, with each one's phase and table median."""
    keep = (ran["arrival_ms"].to_numpy() >= warmup_ms) & (ran["outcome"].to_numpy(str) != "cancelled")
    j = ran[keep].reset_index(drop=True)
    phase = job_phase(j["kind"], j["outcome"])
    memo: dict = {}
    base = np.array([memo.setdefault((p, l, m), medians(p, l, 0 if p == "prefix_encode" else m))
                     for p, l, m in zip(phase, j["history_len"].to_numpy(), j["candidates"].to_numpy())])
    return j, phase, base


def fit_profile(ran: pd.DataFrame, medians, warmup_ms: float, info: dict) -> tuple[Profile, dict]:
    """Fit from executed jobs (columns kind, outcome, history_len, candidates, start_ms,
    arrival_ms, busy_ms, idle_ms; in start order) and `medians(phase, L, M)`, the table's
    median. Returns the profile and a per-job frame of the fit (for plots and tests)."""
    j, phase, base = executed(ran, medians, warmup_ms)
    if len(j) < 2 * MIN_POOL:
        from .errors import InputError
        raise InputError(f"too few executed jobs after the warm-up to fit a profile ({len(j)} < "
                         f"{2 * MIN_POOL})", info.get("fitted_from", {}).get("folder"))
    busy, idle, start = (j[c].to_numpy(float) for c in ("busy_ms", "idle_ms", "start_ms"))
    excess = busy - base
    normal = np.ones(len(j), bool)
    for _ in range(2):
        phases = fit_excess(phase[normal], base[normal], idle[normal], excess[normal])
        slowness = np.maximum(busy, 1e-6) / np.maximum(expected_ms(phases, phase, base, idle), 1e-6)
        ep = find_episodes(start, slowness)
        normal = ~ep["slow_window"][ep["window_of_job"]]
    window_ms = ep["window_s"] * 1000.0
    logr = np.log(slowness)
    ref = float(np.median(logr[normal]))
    durations, factors = [], []
    log_f = np.zeros(len(j))                # per job: log of its episode's factor
    for a, b in ep["runs"]:
        sel = (ep["window_of_job"] >= a) & (ep["window_of_job"] <= b)
        if sel.any():
            durations.append(round((b - a + 1) * ep["window_s"], 4))
            factors.append(round(float(np.exp(np.median(logr[sel]) - ref)), 4))
            log_f[sel] = math.log(max(factors[-1], 1e-3))
    fit_elasticity(phases, phase, base, logr - ref, log_f, ~normal)
    normal_min = (~ep["slow_window"]).sum() * window_ms / 60_000.0
    episodes = None
    if durations:
        episodes = sc.Interference(rate_per_min=len(durations) / normal_min,
                                   duration_s=sc.EmpiricalDist(kind="empirical", values=durations),
                                   slowdown=sc.EmpiricalDist(kind="empirical",
                                                             values=[max(f, 1e-3) for f in factors]))
    diag = {k: v for k, v in ep.items() if k not in ("runs", "window_of_job", "slow_window")}
    diag.update({"jobs": int(len(j)), "jobs_in_episodes": int((~normal).sum()), "episodes": len(durations),
                 "time_in_episodes": round(float(ep["slow_window"].mean()), 4)})
    if durations:
        diag.update({"rate_per_min": round(episodes.rate_per_min, 4),
                     "duration_s": _quartiles(durations), "slowdown": _quartiles(factors)})
    profile = Profile(QUANTILES, phases, episodes, {**info, "fit": diag})
    per_job = pd.DataFrame({"start_ms": start, "phase": phase, "base_ms": base, "busy_ms": busy,
                            "slowness": slowness, "in_episode": ~normal})
    return profile, per_job


def _quartiles(v) -> dict:
    q = np.quantile(np.asarray(v, float), [0, 0.25, 0.5, 0.75, 1])
    return dict(zip(("min", "q25", "median", "q75", "max"), (round(float(x), 4) for x in q)))


# ----------------------------------------------------------------------------- between-run level

def run_level(profile: Profile, ran: pd.DataFrame, medians, warmup_ms: float) -> dict[str, float]:
    """A serving log's in-serving level against a profile, per cell of the profile's pools
    ("phase|size class", `Profile.cell`) that ran MIN_POOL jobs or more after the warm-up:
    the median log of busy time over the time the profile expects (0: as fitted).

    The same shapes on the same machine ran with 15-45% different host excess in runs
    minutes apart while one run drifted 1-3%, and host-bound cells feel it, GPU-bound ones
    hardly: a profile from one log cannot know the next run's level, so `with_levels`
    carries it across runs."""
    j, phase, base = executed(ran, medians, warmup_ms)
    mid = int(np.searchsorted(QUANTILES, 0.5))
    cells, expected = [], []
    for p, b, i in zip(phase, base, j["idle_ms"].to_numpy(float)):
        pool, _, cell = profile.cell(p, b, i)
        cells.append(cell)
        expected.append(b + pool[mid])
    cells = np.array(cells)
    log_r = np.log(np.maximum(j["busy_ms"].to_numpy(float), 1e-6) / np.maximum(expected, 1e-6))
    return {c: float(np.median(log_r[cells == c])) for c in np.unique(cells)
            if (cells == c).sum() >= MIN_POOL}


def with_levels(profile: Profile, levels: dict[str, dict[str, float]]) -> Profile:
    """The profile with the between-run level of several logs (run name -> `run_level`).

    Runs are random draws of one level u_r ~ N(mu, sd^2) per run, seen in every cell of the
    profile's own phases (all-phase cells, where a job's phase was never fitted, carry
    phase error, not a run's level, and are left out). The profile embodies its own run's
    level, so a new run differs from it by u_new - u_fit: centred on the fitted run (its
    measured level in each cell, not the other logs' mean: logs of other policies or
    machines are not exchangeable runs) with spread sd sqrt(2), sd pooled over cells from
    each cell's deviations from its mean. `InServing` draws one level a replication
    (serving_profile.level_drawn), so the prediction interval carries the run-to-run spread."""
    own = levels.get(profile.info.get("fitted_from", {}).get("run"), {})
    levels = {r: {c: x for c, x in lv.items() if not c.startswith(ALL + "|")} for r, lv in levels.items()}
    cells = sorted({c for lv in levels.values() for c in lv})
    centre, count, ss, df = {}, {}, 0.0, 0
    for c in cells:
        v = np.array([lv[c] for lv in levels.values() if c in lv])
        centre[c], count[c] = round(float(own.get(c, v.mean())), 6), len(v)
        ss += float(np.sum((v - v.mean()) ** 2))
        df += len(v) - 1
    sd = math.sqrt(ss / df) if df > 0 else None
    info = {**profile.info, "level": {
        "runs": sorted(levels), "centre_log": centre, "runs_per_cell": count,
        "sd_log": None if sd is None else round(sd, 6), "df": df,
        "spread_log": None if sd is None else round(sd * math.sqrt(2), 6),
        "log_levels": {r: {c: round(x, 6) for c, x in sorted(lv.items())} for r, lv in sorted(levels.items())}}}
    return Profile(profile.quantiles, profile.phases, profile.episodes, info)
