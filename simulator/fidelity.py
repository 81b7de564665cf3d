"""Fidelity: simrec's error against real serving logs (DESIGN.md, "Fidelity").

A serving log (`serving_log.py`, format in calibration/FORMAT.md) is one instance's job log
plus run.yaml. From it simrec derives the scenario itself: the requests replayed as a
trace, one ranking node, FIFO, the GR model costed from the log's table and, for a relay
policy, a pre-infer signal `lead_ms` before each ranking request, a length trigger and an
LRU prefix cache of the logged size and pinning. Each log is then simulated with one of
three sources of ranking times:

- ``replay``: every job takes exactly the busy time it took in the log (device time plus
  the host's time before it). Only the queueing and cache logic is the simulator's, so this
  checks the scenario derivation: its latencies should equal the measured ones.
- ``table``: the scenario as derived: draws from the isolated cost table.
- ``profile``: the table under a serving profile (`simrec fit`) fitted on one log: in-serving
  excess plus slow episodes. Fitted on one log, judged on the others (cross-fit: on each).

A measured P99 comes with a 95% circular block-bootstrap interval. A simulated P99 comes
with a 95% **prediction interval** for one window as long as the measured one: the P99s of
the replications (same arrivals, independent service times and episodes) are taken as
log-normal, and the interval is exp(m +- t_{R-1} s sqrt(1 + 1/R)) over their logs, the
interval in which one more window's P99 falls. Its centre exp(m) is the central value.
With rare slow episodes the P99 of a finite window is itself random; the interval says how
random, and a measured P99 is judged against it, not against a mean.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import InputError
from .serving_log import ServingLog, find_logs, load_log
from .stats import prediction_interval

STAGE = "ranking"
UPSTREAM = "upstream"
SOURCES = ("replay", "table", "profile")
COLUMNS = ("run", "policy", "utilisation", "requests", "meas_p50", "meas_p99", "meas_p99_lo", "meas_p99_hi",
           "source", "fit_run", "sim_p50", "sim_p99", "sim_p99_lo", "sim_p99_hi", "in_sample")
METRICS = ("p50", "p90", "p99", "mean")


# ----------------------------------------------------------------------------- the scenario

def device_preset(log: ServingLog) -> str:
    """The node device: the preset the log's table was measured on (its manifest), else one
    named inside the log's device string (e.g. 'NVIDIA H200' -> h200), else h100."""
    from simrec.calibration.table import load_table
    from .roofline import PRESET_NAMES
    dev = load_table(log.table).manifest.device or {}
    if dev.get("kind") == "cpu":
        return "cpu"
    for name in (str(dev.get("name", "")), log.device):
        preset = next((p for needle, p in PRESET_NAMES if needle in name.lower()), None)
        if preset is not None:
            return preset
    return "h100"


def requests_of(log: ServingLog) -> pd.DataFrame:
    """The requests as a trace (arrival = the pre-infer signal for relay, else the ranking
    arrival), one per ranking job, in request order."""
    rank = log.ranking()
    arrival = rank["arrival_ms"].to_numpy(float)
    if log.policy["kind"] == "relay":
        pre = log.jobs[log.jobs["kind"] == "pre"].set_index("request_id")["arrival_ms"]
        sig = pre.reindex(rank["request_id"]).to_numpy(float)
        arrival = np.where(np.isnan(sig), arrival - log.lead_ms, sig)
    return pd.DataFrame({"arrival_ms": arrival, "user_id": rank["user_id"].to_numpy(np.int64),
                         "history_len": rank["history_len"].to_numpy(np.int64),
                         "candidates": rank["candidates"].to_numpy(np.int64)})


def scenario_dict(log: ServingLog, trace_path: str, replications: int = 10, seed: int = 1,
                  profile: str | None = None) -> dict:
    service = {"kind": "gr", "table": log.table}
    if profile is not None:
        service["profile"] = profile
    stages = {STAGE: {"nodes": {"count": 1, "device": device_preset(log)}, "router": "round_robin",
                      "queue": "fifo", "service": service}}
    scen = {"name": log.name, "workload": {"arrivals": {"kind": "trace", "path": trace_path}},
            "stages": stages, "slo": {"p99_ms": 100.0},
            "run": {"replications": replications, "seed": seed, "warmup_s": float(log.warmup_s)}}
    pol = log.policy
    if pol["kind"] == "relay":
        scen["stages"] = {UPSTREAM: {"nodes": {"count": 1, "device": "cpu"}, "router": "delay",
                                     "service": {"kind": "constant", "ms": float(log.lead_ms)}}, **stages}
        scen["relay"] = {"stage": STAGE, "signal_after": "arrival", "signal_ms": 0.0,
                         "trigger": {"kind": "length", "min_history_len": int(pol["min_history_len"])},
                         "queue": "fifo", "cache": {"hbm_bytes": int(pol["cache_bytes"]),
                                                    "pin": pol.get("pin", "until_ranked")}}
    return scen


def scenario_for(log: ServingLog, trace_path: str, **kw):
    from .loader import validate
    return validate(scenario_dict(log, trace_path, **kw), f"{log.folder}/run.yaml (derived scenario)", None)


# ----------------------------------------------------------------------------- statistics

def describe(x: np.ndarray) -> dict[str, float]:
    p = np.percentile(x, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "mean": float(np.mean(x))}


def block_length(x: np.ndarray) -> int:
    """Bootstrap block: at least sqrt(n), and 5x the lag where the autocorrelation of x
    first drops under 0.05 (so a block spans the busy periods that make the tail), at
    most n / 10."""
    n = len(x)
    y = x - x.mean()
    f = np.fft.rfft(y, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n]
    acf = acf / acf[0] if acf[0] > 0 else np.zeros(n)
    below = np.flatnonzero(acf < 0.05)
    lag = int(below[0]) if len(below) else n
    return int(min(max(math.ceil(math.sqrt(n)), 5 * lag), max(n // 10, 1)))


def block_bootstrap(x: np.ndarray, block: int, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of describe()'s figures under a circular block bootstrap."""
    n = len(x)
    rng = np.random.default_rng(seed)
    k = math.ceil(n / block)
    offs = np.arange(block)
    est = {m: np.empty(n_boot) for m in METRICS}
    for b in range(n_boot):
        idx = ((rng.integers(0, n, k)[:, None] + offs[None, :]) % n).ravel()[:n]
        d = describe(x[idx])
        for m in METRICS:
            est[m][b] = d[m]
    a = (1 - level) / 2
    return {m: (float(np.quantile(v, a)), float(np.quantile(v, 1 - a))) for m, v in est.items()}


# ----------------------------------------------------------------------------- measured side

@dataclass
class Measured:
    latency: np.ndarray          # ranking latency per request (request order)
    warm: np.ndarray             # per request: past the warm-up cut
    figures: dict
    ci: dict
    utilisation: float

    @property
    def n(self) -> int:
        return int(self.warm.sum())


def measure(log: ServingLog, trace: pd.DataFrame, n_boot: int = 1000) -> Measured:
    rank = log.ranking()
    lat = (rank["end_ms"] - rank["arrival_ms"]).to_numpy(float)
    warm = trace["arrival_ms"].to_numpy() >= log.warmup_s * 1000.0
    x = lat[warm]
    ci = block_bootstrap(x, block_length(x), n_boot)
    ran = log.ran()
    span = ran["end_ms"].max() - ran["arrival_ms"].min()
    return Measured(lat, warm, describe(x), ci, float(ran["busy_ms"].sum() / span))


# ----------------------------------------------------------------------------- simulated side

class Replay:
    """The ranking stage's cost model replaced by the logged busy times, by (kind, request
    id); without a relay, ranking jobs come in request order (one FIFO node)."""

    def __init__(self, base, log: ServingLog):
        self.base = base
        self.curves = base.curves
        self.kv_bytes_per_token = base.kv_bytes_per_token
        j = log.ran()
        self.times = dict(zip(zip(j["kind"], j["request_id"].astype(int)), j["busy_ms"].astype(float)))
        self.current: tuple[str, int] | None = None
        self.next_rank = 0
        self.unmatched = 0        # the simulator ran a job the log did not

    def median(self, name, L, M=0):
        return self.base.median(name, L, M)

    def prefix_bytes(self, L):
        return self.base.prefix_bytes(L)

    def check(self, L, M):
        return self.base.check(L, M)

    def sample(self, L, M):
        return self.phase("full_forward", L, M)

    def phase(self, name, L, M=0):
        key = self.current
        if key is None:
            key = ("rank", self.next_rank)
            self.next_rank += 1
        got = self.times.get(key)
        if got is None:
            self.unmatched += 1
            return self.base.phase(name, L, M)
        self.times[key] = 0.0          # a second phase of the same job (reload + rank) adds nothing
        return got


def _replay_adjust(log: ServingLog, made: list) -> Callable:
    def adjust(prep, index):
        stage = next(s for s in prep.stages if s.name == STAGE)
        costs = Replay(stage.service, log)
        made.append(costs)
        stage.service = costs
        relay = prep.relay
        if relay is not None:
            relay.phases = costs
            for kind, attr in (("rank", "rank_cost"), ("pre", "pre_cost")):
                fn = getattr(relay, attr)

                def tagged(job, node, now, fn=fn, kind=kind):
                    costs.current = (kind, job.rid)
                    try:
                        return fn(job, node, now)
                    finally:
                        costs.current = None
                setattr(relay, attr, tagged)
    return adjust


@dataclass
class Task:
    """One simulation: a log, a source and (profile) the profile file and the log it came from."""

    folder: str
    trace_path: str
    source: str
    replications: int
    profile: str | None = None
    fit_run: str = ""
    seed: int = 1


@dataclass
class Simulated:
    per_rep: list[dict]                  # describe() of each replication, after the warm-up
    latency0: np.ndarray                 # replication 0's latencies, after the warm-up (plots)
    checks: dict = field(default_factory=dict)


def simulate_task(task: Task) -> Simulated:
    from .simulate import simulate
    log = load_log(Path(task.folder))
    reps = 1 if task.source == "replay" else task.replications
    scen = scenario_for(log, task.trace_path, replications=reps, seed=task.seed,
                        profile=task.profile if task.source == "profile" else None)
    made: list = []
    res = simulate(scen, adjust=_replay_adjust(log, made) if task.source == "replay" else None)
    req = res.requests.to_pandas().sort_values(["replication", "request_id"])
    warm = pd.read_parquet(task.trace_path)["arrival_ms"].to_numpy() >= log.warmup_s * 1000.0
    lats = [(g[f"{STAGE}_wait_ms"] + g[f"{STAGE}_service_ms"]).to_numpy() for _, g in req.groupby("replication")]
    checks = {}
    if task.source == "replay":
        checks["unmatched_jobs"] = made[-1].unmatched      # the run that stood (an engine fallback reruns)
        if f"{STAGE}_prefix" in req:
            sim = req[f"{STAGE}_prefix"].astype(str).to_numpy()
            logged = log.ranking()["outcome"].to_numpy(str)
            checks["outcome_mismatch"] = int(np.sum(np.where(sim == "hit", "hit", "miss")
                                                    != np.where(logged == "hit", "hit", "miss")))
    return Simulated([describe(x[warm]) for x in lats], lats[0][warm], checks)


# ----------------------------------------------------------------------------- the comparison

def _map(fn, items: list, jobs: int):
    """fn over items, in order, in `jobs` processes when jobs > 1 (same results either way)."""
    if jobs > 1 and len(items) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(jobs, len(items))) as pool:
            yield from pool.map(fn, items)
    else:
        yield from map(fn, items)


def _medians(log: ServingLog):
    from simrec.calibration.table import load_table
    from .serving_profile import reference_medians
    table = load_table(log.table)
    return table, reference_medians(table)


def level_of(profile, log: ServingLog) -> dict[str, float]:
    """A log's in-serving level per cell against a profile (profile_fit.run_level), on its
    own table."""
    from .profile_fit import run_level
    return run_level(profile, log.ran(), _medians(log)[1], log.warmup_s * 1000.0)


def levelled(profile, logs: list[ServingLog]):
    """The profile with the between-run level of these logs (profile_fit.with_levels)."""
    from .profile_fit import with_levels
    levels = {g.name: lv for g in logs if (lv := level_of(profile, g))}
    return with_levels(profile, levels) if levels else profile


def fit_log(log: ServingLog):
    """The serving profile of one log against its own table."""
    from .profile_fit import fit_profile
    from .serving_profile import REFERENCE
    table, medians = _medians(log)
    info = {"reference": f"table median under {REFERENCE} where the table has it, else isolated",
            "fitted_from": {"run": log.name, "folder": str(log.folder), "device": log.device,
                            "policy": log.policy},
            "table": {"path": log.table, "name": table.manifest.name, "sha256": table.manifest.sha256}}
    profile, per_job = fit_profile(log.ran(), medians, log.warmup_s * 1000.0, info)
    return profile, per_job


@dataclass
class FidelityReport:
    rows: pd.DataFrame                   # one row per (run, source, fit run): COLUMNS + detail
    curves: dict[str, dict[str, np.ndarray]]
    checks: dict
    profiles: dict[str, dict]            # fit run -> its profile's fit diagnostics
    replications: int
    profile_files: dict[str, str] = field(default_factory=dict)   # fit run -> profile file

    def table(self) -> pd.DataFrame:
        return self.rows.loc[:, list(COLUMNS)]

    def verdict(self) -> dict:
        """The judging figures over the out-of-sample profile rows."""
        r = self.rows[(self.rows["source"] == "profile") & ~self.rows["in_sample"]]
        if r.empty:
            return {}
        inside = (r["meas_p99"] >= r["sim_p99_lo"]) & (r["meas_p99"] <= r["sim_p99_hi"])
        width = (r["sim_p99_hi"] - r["sim_p99_lo"]) / (r["meas_p99_hi"] - r["meas_p99_lo"])
        central = (r["sim_p99"] >= r["meas_p99_lo"]) & (r["sim_p99"] <= r["meas_p99_hi"])
        tight = r[(r["meas_p99_hi"] - r["meas_p99_lo"]) / 2 <= 0.10 * r["meas_p99"]]
        return {"pairs": int(len(r)),
                "measured_p99_inside_prediction_interval": round(float(inside.mean()), 4),
                "median_width_ratio_sim_to_measured": round(float(width.median()), 4),
                "central_p99_inside_measured_interval": round(float(central.mean()), 4),
                "median_abs_p99_error": round(float(r["p99_error"].abs().median()), 4),
                "max_abs_p99_error": round(float(r["p99_error"].abs().max()), 4),
                "runs_with_measured_interval_within_10pct": sorted(set(tight["run"])),
                "max_abs_p99_error_on_those": (round(float(tight["p99_error"].abs().max()), 4)
                                               if len(tight) else None),
                "median_abs_p50_error": round(float(r["p50_error"].abs().median()), 4),
                "median_abs_mean_error": round(float(r["mean_error"].abs().median()), 4)}

    def markdown(self) -> str:
        r = self.rows
        lines = ["| run | policy | util. | n | measured P50 | measured P99 [95% CI] | source | fit on | "
                 "sim P50 (err) | sim P99 [95% PI] (err) | mean err |", "|" + "---|" * 11]
        for x in r.itertuples():
            lines.append(
                f"| {x.run} | {x.policy} | {x.utilisation:.2f} | {x.requests} | {x.meas_p50:.2f} | "
                f"{x.meas_p99:.2f} [{x.meas_p99_lo:.2f}, {x.meas_p99_hi:.2f}] | {x.source} | "
                f"{x.fit_run + ('*' if x.in_sample else '')} | {x.sim_p50:.2f} ({_pct(x.p50_error)}) | "
                f"{x.sim_p99:.2f} [{_f(x.sim_p99_lo)}, {_f(x.sim_p99_hi)}] ({_pct(x.p99_error)}) | "
                f"{_pct(x.mean_error)} |")
        lines += ["", "Errors are simulated / measured - 1. Measured intervals: 95% circular block "
                  "bootstrap; simulated: 95% prediction interval for one window of the run's length. "
                  "*: profile fitted on this run (in sample)."]
        v = self.verdict()
        if v:
            lines += ["", "Out-of-sample profile rows:", ""] + [f"- {k}: {val}" for k, val in v.items()]
        return "\n".join(lines)

    def write(self, out: Path) -> list[Path]:
        """fidelity.csv (COLUMNS exactly), fidelity_detail.csv, fidelity.md, fidelity.json,
        fidelity.png, into `out`, replaced atomically."""
        import json
        from .folders import atomic_folder
        names = ["fidelity.csv", "fidelity_detail.csv", "fidelity.md", "fidelity.json", "fidelity.png"]
        with atomic_folder(out) as tmp:
            self.table().to_csv(tmp / names[0], index=False, float_format="%.6g")
            self.rows.to_csv(tmp / names[1], index=False, float_format="%.6g")
            (tmp / names[2]).write_text("# simrec fidelity against serving logs\n\n" + self.markdown() + "\n")
            (tmp / names[3]).write_text(json.dumps({"replications": self.replications, "verdict": self.verdict(),
                                                    "checks": self.checks, "profiles": self.profiles},
                                                   indent=2, default=float) + "\n")
            self.plot(tmp / names[4])
            if self.profile_files:
                (tmp / "profiles").mkdir()
                for name, p in self.profile_files.items():
                    shutil.copy(p, tmp / "profiles" / f"{name}.json")
        return [Path(out) / n for n in names]

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        runs = list(self.curves)
        cols = min(4, len(runs))
        rows = math.ceil(len(runs) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        style = {"measured": ("k", "-", 2.2), "replay": ("tab:green", "--", 1.2),
                 "table": ("tab:red", "-", 1.2), "profile": ("tab:blue", "-", 1.2)}
        for ax, run in zip(axes.ravel(), runs):
            for name, x in self.curves[run].items():
                xs = np.sort(x)
                c, ls, lw = style.get(name, ("gray", "-", 1.0))
                ax.step(xs, 1.0 - np.arange(len(xs)) / len(xs), where="post", color=c, ls=ls, lw=lw, label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.05)
            for y in (0.01, 0.5):
                ax.axhline(y, color="gray", lw=0.5)
            ax.set_title(run, fontsize=9)
            ax.set_xlabel("ranking latency (ms)")
            ax.set_ylabel("P(latency > x)")
        for ax in axes.ravel()[len(runs):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7)
        fig.suptitle("measured vs simulated ranking latency (1 - CDF; lines at P50 and P99)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:+.1f}%"


def _f(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def _is_pilot(log: ServingLog) -> bool:
    return bool(log.extra.get("pilot") or (log.extra.get("meta") or {}).get("pilot"))


def run_fidelity(paths: list[Path], out: Path | None = None, fit_run: str | None = None,
                 cross: bool = False, replications: int = 10, sources: tuple[str, ...] = SOURCES,
                 n_boot: int = 1000, jobs: int = 1, progress: Callable[[int, int], None] | None = None,
                 levels: bool = False) -> FidelityReport:
    """Judge every (non-pilot) log with each source; the profile is fitted on `fit_run`
    (default: the longest log), and with `cross` on every log in turn. With `levels` and
    three or more logs, the profile judging a log carries the between-run level of all the
    other logs (never of the judged one: profile_fit.with_levels)."""
    logs = [load_log(p) for p in find_logs(paths)]
    names = [g.name for g in logs]
    if len(set(names)) != len(names):
        raise InputError(f"log names must be unique (got {names})")
    judged = [g for g in logs if not _is_pilot(g)]
    if not judged:
        raise InputError("only pilot logs given: nothing to judge", ", ".join(names))
    by_name = {g.name: g for g in logs}
    if fit_run is not None and fit_run not in by_name:       # a typo, whatever the sources
        raise InputError(f"no log named {fit_run!r} (logs: {', '.join(names)})", "--fit-run")
    if "profile" in sources:
        fit_run = fit_run or max(judged, key=lambda g: len(g.jobs)).name
    fits = ([g.name for g in judged] if cross else [fit_run]) if "profile" in sources else []
    tmp = Path(tempfile.mkdtemp(prefix="simrec-fidelity-"))
    try:
        from .serving_profile import save
        traces, meas = {}, {}
        for g in judged:
            trace = requests_of(g)
            traces[g.name] = str(tmp / f"{g.name}.trace.parquet")
            trace.to_parquet(traces[g.name])
            meas[g.name] = measure(g, trace, n_boot)
        from .profile_fit import with_levels
        profiles, diag, judging = {}, {}, {}
        for name in fits:
            prof, _ = fit_log(by_name[name])
            profiles[name] = str(save(prof, tmp / f"{name}.profile.json"))
            diag[name] = prof.info["fit"]
            if levels and len(judged) >= 3:
                lv = {g.name: level_of(prof, g) for g in judged}
                for g in judged:
                    others = {k: v for k, v in lv.items() if k != g.name and v}
                    if others:
                        judging[name, g.name] = str(save(with_levels(prof, others),
                                                         tmp / f"{name}.for.{g.name}.profile.json"))
        tasks = []
        for g in judged:
            for s in sources:
                if s == "profile":
                    tasks += [Task(str(g.folder), traces[g.name], s, replications,
                                   judging.get((f, g.name), profiles[f]), f) for f in fits]
                else:
                    tasks.append(Task(str(g.folder), traces[g.name], s, replications))
        rows, curves, checks = [], {}, {}
        for k, (task, sim) in enumerate(zip(tasks, _map(simulate_task, tasks, jobs))):
            g, m = by_name[Path(task.folder).name], meas[Path(task.folder).name]
            p99s = [d["p99"] for d in sim.per_rep]
            centre, lo, hi = prediction_interval(p99s)
            sim_mean = {q: float(np.mean([d[q] for d in sim.per_rep])) for q in METRICS}
            rows.append({"run": g.name, "policy": g.policy["kind"], "utilisation": round(m.utilisation, 4),
                         "requests": m.n, "meas_p50": m.figures["p50"], "meas_p99": m.figures["p99"],
                         "meas_p99_lo": m.ci["p99"][0], "meas_p99_hi": m.ci["p99"][1], "source": task.source,
                         "fit_run": task.fit_run, "sim_p50": sim_mean["p50"], "sim_p99": centre,
                         "sim_p99_lo": lo, "sim_p99_hi": hi, "in_sample": task.fit_run == g.name,
                         "meas_p50_lo": m.ci["p50"][0], "meas_p50_hi": m.ci["p50"][1],
                         "meas_mean": m.figures["mean"], "sim_mean": sim_mean["mean"],
                         "p50_error": sim_mean["p50"] / m.figures["p50"] - 1, "p99_error": centre / m.figures["p99"] - 1,
                         "mean_error": sim_mean["mean"] / m.figures["mean"] - 1, "replications": len(p99s)})
            c = curves.setdefault(g.name, {"measured": m.latency[m.warm]})
            if task.source != "profile" or task.fit_run == fit_run:
                c[task.source] = sim.latency0
            if sim.checks:
                checks[f"{g.name}/{task.source}"] = sim.checks
            if progress:
                progress(k + 1, len(tasks))
        report = FidelityReport(pd.DataFrame(rows), curves, checks, diag, replications, profiles)
        if out is not None:
            report.write(out)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
