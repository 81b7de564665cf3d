"""`simrec testbed` and `simrec fidelity`: command functions, registered by cli.py.

Torch is imported only inside `testbed`, so `simrec --help` works without it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import InputError


def _fail(e: Exception) -> None:
    print(str(e), file=sys.stderr)
    raise typer.Exit(1)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"need comma-separated numbers (got {text!r})", what) from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"need comma-separated integers (got {text!r})", what) from None


def testbed(
    table: Path = typer.Argument(..., help="cost table folder calibrated on this device; the served "
                                           "model is the table's model"),
    out: Path = typer.Option(Path("testbed_runs"), "--out", "-o", help="folder that receives one folder per run"),
    policy: str = typer.Option("full", help="full (full forward per request) or relay (prefix cache)"),
    loads: str = typer.Option("0.3,0.6,0.85", help="target utilisations, one run each"),
    requests: str = typer.Option("30000", help="requests per run: one value, or one per load"),
    rates: Optional[str] = typer.Option(None, help="arrival rates (req/s), one per load, instead of a pilot run"),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)"),
    users: int = typer.Option(50_000, help="users (Zipf-popular)"),
    zipf: float = typer.Option(1.2, help="Zipf exponent of user popularity"),
    history_lens: str = typer.Option("1024,2048,4096,8192", help="history-length buckets (table grid points)"),
    length_weights: str = typer.Option("0.35,0.3,0.2,0.15", help="share of users per bucket"),
    candidates: int = typer.Option(128, help="candidates per request (a table grid point)"),
    lead_ms: float = typer.Option(20.0, help="pre-infer signal lead before the ranking request"),
    threshold: int = typer.Option(4096, help="relay: pre-infer requests with history_len >= this"),
    cache_mib: str = typer.Option("16384", help="relay: HBM prefix cache size (MiB), one or one per load"),
    seed: int = typer.Option(0, help="workload seed (users, lengths, arrival gaps)"),
    pilot_s: float = typer.Option(4.0, help="seconds of the pilot run that sets the rates"),
    keep_pilot: bool = typer.Option(False, help="also write the pilot as a run (pilot_<first run>): "
                                                "simrec fidelity fits additive_pilot on it"),
):
    """Serve a GR model on this device to open-loop arrivals and log every job (needs torch).

    One FIFO worker serves the table's model to Poisson arrivals from a precomputed schedule;
    each run folder also holds the simrec scenario of the same system (scenario.yaml +
    trace.parquet), for `simrec fidelity`.

    Example: simrec testbed calibration/tables/h100_testbed --policy relay --loads 0.3,0.6,0.85 --out runs
    """
    try:
        try:
            import torch
            from simrec.calibration import testbed as tb
        except ImportError as e:
            raise InputError(f"simrec testbed needs torch ({e}); pip install 'simrec[calibrate]'") from None
        load_list = _floats(loads, "--loads")
        n = _ints(requests, "--requests")
        n = n * len(load_list) if len(n) == 1 else n
        rate_list = _floats(rates, "--rates") if rates else None
        if len(n) != len(load_list) or (rate_list and len(rate_list) != len(load_list)):
            raise InputError("need one value, or one per load", "--requests/--rates")
        try:
            base = tb.Workload(rate_qps=1.0, requests=1, users=users, zipf_s=zipf,
                               history_lens=tuple(_ints(history_lens, "--history-lens")),
                               length_weights=tuple(_floats(length_weights, "--length-weights")),
                               candidates=candidates, lead_ms=lead_ms, seed=seed)
            caches = _floats(cache_mib, "--cache-mib")
            caches = caches * len(load_list) if len(caches) == 1 else caches
            if len(caches) != len(load_list):
                raise InputError("need one value, or one per load", "--cache-mib")
            pol = [tb.Policy(policy, threshold, int(c * 2**20)) for c in caches]
            written = tb.run_series(table, out, pol, load_list, n, base, device, rate_list, pilot_s,
                                    keep_pilot=keep_pilot, log=lambda s: print(s, file=sys.stderr, flush=True))
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e), str(table)) from None
        except torch.OutOfMemoryError as e:
            raise InputError(f"out of device memory: {str(e).splitlines()[0]}", str(table)) from None
    except InputError as e:
        _fail(e)
    for p in written:
        print(p)


def fit(
    runs: list[Path] = typer.Argument(..., help="a serving-log folder (jobs.parquet or jobs.csv + run.yaml; "
                                               "calibration/FORMAT.md); more logs of the same "
                                               "system after it set the between-run level"),
    out: Path = typer.Option(..., "--out", "-o", help="profile file to write (JSON)"),
):
    """Fit a serving profile from a serving log against its cost table.

    The profile holds the in-serving excess over the table (per phase, job size and how long
    the device idled) and the slow episodes found in the log (rate, durations, slowdowns,
    from a two-state hidden Markov model over windows of jobs). Use it in a scenario as
    `service: {kind: gr, table: T, profile: FILE}`.

    Given more logs, the profile is still fitted on the first; each log's in-serving level
    (its excess over the one the profile expects) sets a between-run level, drawn once per
    replication, so a prediction interval spans how runs of the system differ.

    Example: simrec fit calibration/testbed_runs/h200_eager/full_u50_long --out full_u50.profile.json
    """
    from . import fidelity as fid
    from .serving_log import load_log
    from .serving_profile import save
    try:
        if out.exists() and not _is_profile(out):
            raise InputError("exists and is not a serving profile: not replaced", str(out))
        logs = [load_log(r) for r in runs]
        log = logs[0]
        profile, _ = fid.fit_log(log)
        if len(logs) > 1:
            names = [g.name for g in logs]
            if len(set(names)) != len(names):
                raise InputError(f"log names must be unique (got {names})", str(runs[0]))
            profile = fid.levelled(profile, logs)
        save(profile, out)
    except InputError as e:
        _fail(e)
    except OSError as e:
        _fail(InputError(f"cannot write: {e.strerror}", str(out)))
    print(profile_summary(profile, log.name, out))


def _is_profile(path: Path) -> bool:
    """An earlier profile may be replaced; any other file is the user's."""
    from .serving_profile import FORMAT
    try:
        return path.is_file() and path.stat().st_size < 2**24 and f'"{FORMAT}"' in path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def profile_summary(profile, name: str, out: Path) -> str:
    """One screen: what was fitted, the excess by phase, the episodes and the model choice."""
    import numpy as np
    f = profile.info["fit"]
    q = profile.quantiles
    lines = [f"serving profile of {name}: {f['jobs']} jobs after warm-up, table {profile.info['table']['name']}",
             "in-serving excess over the table median (ms), all idle states:",
             "  phase           size class <= ms     n-pools  p50     p90     p99"]
    for phase, ex in sorted(profile.phases.items()):
        edges = ex.base_edges_ms + [float("inf")]
        for (b, i), pool in sorted(ex.pools.items()):
            if i != -1 or b < 0:
                continue
            n = sum(1 for k in ex.pools if k[0] == b)
            p50, p90, p99 = (float(np.interp(x, q, pool)) for x in (0.5, 0.9, 0.99))
            lines.append(f"  {phase:15s} {edges[b]:>16.3f}   {n:>7d}  {p50:6.3f}  {p90:6.3f}  {p99:6.3f}")
    lines.append(f"slow episodes: windows of {f['window_s']} s ({f['windows_seen']} of {f['windows']} with "
                 f"enough jobs); BIC one state / i.i.d. mixture / HMM: "
                 + " / ".join(f"{v:.0f}" for v in f.get("bic", {}).values()))
    if profile.episodes is None:
        lines.append(f"  none: {f.get('reason', 'no slow windows')}")
    else:
        d, s = f["duration_s"], f["slowdown"]
        lines.append(f"  {f['episodes']} episodes, {f['rate_per_min']:.2f} per minute of normal running, "
                     f"{f['time_in_episodes']:.1%} of the time; duration s median {d['median']} "
                     f"[{d['min']}, {d['max']}]; slowdown median x{s['median']} [{s['min']}, {s['max']}]")
    lv = profile.info.get("level")
    if lv:
        sd = "none (one log per cell)" if lv["sd_log"] is None else f"{lv['sd_log']:.3f} (log, df {lv['df']})"
        lines.append(f"between-run level, from {len(lv['runs'])} logs; sd {sd}; centre per cell:")
        lines += [f"  {c:24s} x{math.exp(m):.3f} ({lv['runs_per_cell'][c]} logs)" for c, m in lv["centre_log"].items()]
    lines.append(f"written: {out}")
    return "\n".join(lines)


def fidelity(
    runs: list[Path] = typer.Argument(..., help="serving-log folders, or folders holding them"),
    out: Path = typer.Option(Path("results/fidelity"), "--out", "-o", help="report folder"),
    fit_run: Optional[str] = typer.Option(None, help="log the profile is fitted on (default: the longest)"),
    cross_fit: bool = typer.Option(False, "--cross-fit", help="fit the profile on every log in turn and "
                                                             "judge it on all (one row per pair)"),
    replications: int = typer.Option(10, min=2, help="replications per simulated source (the prediction "
                                                     "interval's sample)"),
    sources: Optional[str] = typer.Option(None, help="comma-separated subset of: replay, table, profile"),
    bootstrap: int = typer.Option(1000, min=100, help="block-bootstrap resamples for measured intervals"),
    jobs: int = typer.Option(0, min=0, help="processes (0: one per core)"),
    levels: bool = typer.Option(False, "--levels", help="with 3 or more logs, carry the between-run "
                                "level of the logs other than the judged one into its profile (its "
                                "prediction interval then spans run-to-run variation; on the "
                                "testbed's mixed H200 logs it covered 84% of pairs, not 66%, at "
                                "4.2x the measured interval's width, not 1.5x)"),
):
    """Compare simulated with measured ranking latency of serving logs (simrec's error).

    Each log is simulated from the scenario simrec derives from it, with the logged times
    (replay), the cost table (table) and the table under a serving profile fitted on one log
    (profile). fidelity.csv has one row per (run, source, fit run): measured P50/P99 with a
    block-bootstrap interval, simulated P50/P99 with a 95% prediction interval for a window
    of the run's length. Also fidelity.md, fidelity.json, fidelity.png and profiles/.

    Example: simrec fidelity calibration/testbed_runs/h200_eager --cross-fit --out results/fidelity
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import fidelity as fid
    try:
        chosen = fid.SOURCES
        if sources:
            chosen = tuple(s.strip() for s in sources.split(",") if s.strip())
            bad = [s for s in chosen if s not in fid.SOURCES]
            if bad or not chosen:
                raise InputError(f"unknown source(s) {bad} (known: {', '.join(fid.SOURCES)})", "--sources")
        with Progress(TextColumn("[bold]fidelity[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("simulations", total=None)
            report = fid.run_fidelity(runs, out, fit_run, cross_fit, replications, chosen, bootstrap,
                                      jobs or os.cpu_count() or 1,
                                      lambda k, n: bar.update(task, completed=k, total=n), levels)
    except InputError as e:
        _fail(e)
    print(report.markdown())
    print(f"results: {out}")
