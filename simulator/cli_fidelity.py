"""`simrec testbed` and `simrec fidelity`: command functions, registered by cli.py.

Torch is imported only inside `testbed`, so `simrec --help` works without it.
"""

from __future__ import annotations

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


def fidelity(
    runs: list[Path] = typer.Argument(..., help="testbed run folders, or folders holding them"),
    out: Path = typer.Option(Path("results/fidelity"), "--out", "-o", help="report folder"),
    table: Optional[Path] = typer.Option(None, help="cost table to use instead of each run's own"),
    replications: int = typer.Option(5, min=1, help="replications per simulated source"),
    fit_run: Optional[str] = typer.Option(None, help="run the correction is fitted on "
                                                     "(default: the relay run nearest 60% load; "
                                                     "additive_pilot fits each run's own pilot)"),
    sources: Optional[str] = typer.Option(None, help="comma-separated subset of: replay, replay_kernel, "
                                                     "table, table_idle, ratio_iid, levels_temporal, "
                                                     "additive_iid, additive_temporal, additive_pilot"),
    bootstrap: int = typer.Option(1000, min=100, help="block-bootstrap resamples for measured CIs"),
    jobs: int = typer.Option(0, min=0, help="processes, one run each at a time (0: one per core)"),
    cross_fit: bool = typer.Option(False, "--cross-fit", help="also fit additive_iid on every run in turn "
                                                             "and judge it on all (cross_fit.csv)"),
):
    """Compare simulated with measured ranking latency of testbed runs (simrec's error).

    Each run's scenario is simulated with several service-time sources; measured and
    simulated P50/P90/P99/mean and hit rate go to fidelity.csv, fidelity.md, fidelity.json,
    and fidelity.png (latency CDFs).

    Example: simrec fidelity calibration/testbed_runs --out results/fidelity --replications 5
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import fidelity as fid
    try:
        chosen = fid.SOURCES
        if sources:
            chosen = tuple(s.strip() for s in sources.split(",") if s.strip())
            bad = [s for s in chosen if s not in fid.SOURCES]
            if bad or not chosen:
                raise InputError(f"unknown source(s) {bad} (known: {', '.join(fid.SOURCES)})", "--sources")
        with Progress(SpinnerColumn(), TextColumn("[bold]fidelity[/] {task.description}"),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("loading runs")
            report = fid.run_fidelity(runs, out, str(table) if table else None, replications, fit_run,
                                      chosen, bootstrap, lambda s: bar.update(task, description=f"{s} done"),
                                      jobs or os.cpu_count() or 1, cross_fit)
    except InputError as e:
        _fail(e)
    main = tuple(s for s in fid.MAIN_SOURCES if s in chosen) or chosen
    print(report.markdown(main))
    if report.cross is not None:
        print("\n" + fid.cross_fit_markdown(report.cross))
    print(f"results: {out}")
