"""The `simrec` command: a thin layer that turns library calls into output and exit codes.

Every bad input, including a bad flag, ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from .cli_calibrate import calibrate
from .cli_fidelity import fidelity, fit, testbed
from .errors import InputError
from .folders import check_target, safe_name
from .loader import load_scenario
from .scenario import Scenario


class _OneLineErrors(TyperGroup):
    """Click prints usage errors with a usage block and exit 2; we want one line and 1.

    SIGTERM is handled like SIGINT (Ctrl-C): the work in progress is abandoned, its temp
    folder removed and the target left as it was; the exit status is 130."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        previous = _term_as_interrupt()
        try:
            code = super().main(*args, **kwargs)   # non-standalone: Exit(n) comes back as n
        except typer.Exit as e:
            code = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            cmd = f"{ctx.command_path}: " if ctx is not None else ""
            print(f"error: {cmd}{_one_line(e.format_message())}", file=sys.stderr)
            sys.exit(1)
        except InputError as e:       # from a command without its own handler
            print(_one_line(str(e)), file=sys.stderr)
            sys.exit(1)
        except MemoryError:
            print("error: out of memory (shorten the run or lower the load)", file=sys.stderr)
            sys.exit(1)
        except Exception as e:        # a bug: still one line (SIMREC_DEBUG=1 shows the traceback)
            if os.environ.get("SIMREC_DEBUG"):
                raise
            print(f"error: internal error ({type(e).__name__}: {_one_line(str(e))}); please report "
                  f"it with the command that caused it", file=sys.stderr)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if code == 130:                # typer's answer to KeyboardInterrupt
            print("interrupted", file=sys.stderr)
        sys.exit(code if isinstance(code, int) else 0)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _term_as_interrupt():
    """Install the SIGTERM handler (main thread only); returns the one it replaced."""
    try:
        return signal.signal(signal.SIGTERM, _interrupt) or signal.SIG_DFL
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="simrec: simulate recommendation serving cascades (retrieval -> "
                       "pre-processing -> ranking) on GPU/NPU nodes.")
err = Console(stderr=True)
out = Console(soft_wrap=True)


def _fail(e: InputError, scenario: Path | None = None) -> None:
    if e.source is None and scenario is not None:
        e.source = str(scenario)
    print(_one_line(str(e)), file=sys.stderr)
    raise typer.Exit(1)


def _load(path: Path, sets: list[str], seed: Optional[int]) -> Scenario:
    overrides = list(sets or [])
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    return load_scenario(path, overrides)


SetOpt = typer.Option(None, "--set", "-s", metavar="PATH=VALUE",
                      help="Override a scenario field, e.g. --set stages.ranking.nodes.count=8")
ReportOpt = typer.Option(True, "--report/--no-report", help="also draw plots and report.html")
ExecutorOpt = typer.Option("local", help="local (process pool), serial, or ray")
WorkersOpt = typer.Option(None, min=1, max=4096, help="processes for the local executor (default: all cores)")
RayOpt = typer.Option(None, "--ray-address", help="Ray cluster address (default: start a local one)")
CacheOpt = typer.Option(None, help="finished-point cache (default: .simrec-cache beside the output)")
RefreshOpt = typer.Option(False, "--refresh", help="recompute every point, ignoring (and replacing) "
                                                   "cached ones")


@contextmanager
def _bar(unit: str):
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeElapsedColumn(), console=err, transient=True) as bar:
        yield bar, bar.add_task("", total=None)


def _cache_for(target: Path) -> Path:
    return target.parent / ".simrec-cache"





@app.command()
def run(scenario: Path = typer.Argument(..., help="scenario YAML file"),
        set_: Optional[list[str]] = SetOpt,
        seed: Optional[int] = typer.Option(None, help="override run.seed"),
        out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                               help="results folder (default: results/<scenario name>)"),
        report_: bool = ReportOpt,
        prediction_interval: bool = typer.Option(
            False, "--prediction-interval", help="also print each P99 as a central value and a 95% prediction "
                                                 "interval for one run of this length (what one measured "
                                                 "window would show, slow episodes included)")):
    """Simulate one scenario and write a results folder (plots and report.html included).

    Example: simrec run scenarios/default.yaml --set workload.rate_qps=2000 --seed 3 --out results/x
    """
    from .simulate import simulate
    try:
        sc = _load(scenario, set_, seed)
        target = out_dir if out_dir is not None else Path("results") / safe_name(sc.name)
        check_target(target)                   # refuse before the run, not after it
        with _bar("replications") as (bar, task):
            bar.update(task, description=sc.name, total=sc.run.replications)
            results = simulate(sc, progress=lambda done, total: bar.update(task, completed=done,
                                                                           total=total))
        target = results.write(target, report_)
    except InputError as e:
        _fail(e, scenario)
    out.print(key_figures(results))
    if prediction_interval:
        out.print(p99_prediction_intervals(results.summary["metrics"]))
    for w in [*results.summary["warnings"], *_missed_target(sc, results.summary)]:
        err.print(f"[yellow]warning:[/] {w}")
    out.print(f"results: {target}")


def p99_prediction_intervals(metrics: dict) -> str:
    """One line per stage (and end to end): P99 centre and 95% prediction interval."""
    from .stats import prediction_interval
    lines = []
    for name, m in {"e2e": metrics["e2e"], **metrics.get("stages", {})}.items():
        reps = m.get("p99_ms", {}).get("replications") if isinstance(m, dict) else None
        if not reps or any(v is None or v <= 0 for v in reps):
            continue
        c, lo, hi = prediction_interval(reps)
        span = "needs 2 replications" if lo != lo else f"[{lo:.2f}, {hi:.2f}]"
        lines.append(f"{name} P99 {c:.2f} ms, 95% prediction interval for one run {span} ({len(reps)} replications)")
    return "\n".join(lines)


@app.command()
def sweep(spec: Path = typer.Argument(..., help="a sweep file (with `base:`), or a scenario file"),
          grid: Optional[list[str]] = typer.Option(None, "--grid", "-g", metavar="PATH=V1,V2,...",
                                                   help="a grid axis, e.g. --grid workload.rate_qps=500,1000"),
          variant: Optional[list[str]] = typer.Option(None, "--variant", metavar="NAME:PATH=V;PATH=V",
                                                      help="a named variant, one line in the plots"),
          set_: Optional[list[str]] = SetOpt,
          x: Optional[str] = typer.Option(None, help="x-axis parameter (default: the first grid axis)"),
          out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="default: results/sweep-<name>"),
          executor: str = ExecutorOpt, workers: Optional[int] = WorkersOpt,
          ray_address: Optional[str] = RayOpt, cache: Optional[Path] = CacheOpt,
          refresh: bool = RefreshOpt, report_: bool = ReportOpt):
    """Run a grid of scenario variants in parallel; one row per point with confidence bounds.

    Example: simrec sweep scenarios/default.yaml --grid workload.rate_qps=500,1000,1500 --variant small:stages.ranking.nodes.count=2 --variant big:stages.ranking.nodes.count=8
    """
    from .loader import read_yaml
    from .sweep import build_spec, load_spec, run_sweep, spec_from_cli
    try:
        data, _ = read_yaml(spec, "sweep file")
        extra = spec_from_cli(grid or [], variant or [], set_ or [])
        if isinstance(data, dict) and "base" in data:
            spec_obj, base = load_spec(spec)
            spec_obj = build_spec({**spec_obj.model_dump(),
                                   "grid": {**spec_obj.grid, **extra["grid"]},
                                   "variants": {**spec_obj.variants, **extra["variants"]},
                                   "set": {**spec_obj.set, **extra["set"]}, "x": x or spec_obj.x},
                                  "--grid/--variant")
        else:
            base = load_scenario(spec)
            spec_obj = build_spec({"base": str(spec), "x": x, **extra}, "--grid/--variant")
        target = out_dir if out_dir is not None else Path("results") / f"sweep-{safe_name(spec.stem)}"
        check_target(target)
        with _bar("points") as (bar, task):
            bar.update(task, description=spec.stem)
            table = run_sweep(base, spec_obj, target, executor, workers, cache or _cache_for(target),
                              ray_address, lambda d, t: bar.update(task, completed=d, total=t), report_,
                              refresh=refresh)
    except InputError as e:
        _fail(e, spec)
    m = spec_obj.metric
    show = [c for c in ("variant", *spec_obj.grid, m, m + "_lo", m + "_hi", "goodput_rps",
                        "slo_attainment", "relay.prefix_hit_rate") if c in table.columns]
    out.print(table[show].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out.print(f"results: {target}")


@app.command()
def capacity(scenario: Path = typer.Argument(..., help="scenario YAML file"),
             param: str = typer.Option("workload.rate_qps", "--param", "-p",
                                       help="the field to search, e.g. workload.rate_qps, "
                                            "workload.users.history_len.value, stages.ranking.nodes.count"),
             start: Optional[float] = typer.Option(None, help="first value tried (default: its current value)"),
             metric: str = typer.Option("e2e.p99_ms", help="metric path, e.g. stages.ranking.p99_ms"),
             slo: Optional[float] = typer.Option(None, help="budget in ms (default: the scenario's "
                                                              "SLO for that metric)"),
             fewest: bool = typer.Option(False, "--fewest", help="search the fewest (e.g. instances) "
                                                                  "instead of the most (e.g. QPS)"),
             integer: Optional[bool] = typer.Option(None, help="integer parameter (default: inferred)"),
             rel_tol: float = typer.Option(0.02, help="stop when the bracket is this narrow (relative)"),
             max_evals: int = typer.Option(20, min=1, max=1000, help="most simulations to spend"),
             min_value: Optional[float] = typer.Option(None, help="never search below this value"),
             max_value: Optional[float] = typer.Option(None, help="never search above this value "
                                                                  "(e.g. the cost table's largest L)"),
             set_: Optional[list[str]] = SetOpt,
             out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="default: results/capacity-<name>"),
             cache: Optional[Path] = CacheOpt, refresh: bool = RefreshOpt, report_: bool = ReportOpt):
    """Largest QPS (or L), or fewest instances, whose P99 upper confidence bound meets the SLO.

    Example: simrec capacity scenarios/default.yaml --param workload.rate_qps --metric stages.ranking.p99_ms
    """
    from .capacity import search, write_capacity
    from .sweep import slo_for
    from .loader import get_path
    try:
        sc = _load(scenario, set_, None)
        current = get_path(sc.model_dump(mode="json"), param.split("."), "--param")
        first = start if start is not None else current
        if not isinstance(first, (int, float)) or isinstance(first, bool):
            raise InputError(f"{param} is not a number (got {first!r}); give --start", "--param")
        budget = slo if slo is not None else slo_for(sc, metric)
        is_int = integer if integer is not None else isinstance(current, int)
        target = out_dir if out_dir is not None else Path("results") / f"capacity-{safe_name(sc.name)}"
        check_target(target)
        with _bar("simulations") as (bar, task):
            bar.update(task, description=param, total=max_evals)
            cap, summaries = search(sc, param, metric, budget, first, worse_when_higher=not fewest,
                                    integer=is_int, rel_tol=rel_tol, max_evals=max_evals,
                                    cache_dir=cache or _cache_for(target), bounds=(min_value, max_value),
                                    progress=lambda d, t: bar.update(task, completed=d), refresh=refresh)
        write_capacity(cap, summaries, target, report_)
    except InputError as e:
        _fail(e, scenario)
    d = cap.as_dict()
    out.print(f"{param}: passing {d['bracket'][0]}, failing {d['bracket'][1]} "
              f"({metric} upper 95% bound vs {budget} ms; {d['evaluations']} simulations"
              f"{', undecided ' + str(d['undecided']) if d['undecided'] else ''}"
              f"{'; the metric stopped improving: the SLO looks unreachable' if d['plateau'] else ''})")
    out.print(f"results: {target}")


@app.command()
def report(folder: Path = typer.Argument(..., help="a results folder from run, sweep or capacity")):
    """Draw the plots and write report.html for a results folder.

    Example: simrec report results/default-cascade
    """
    from .folders import build_report
    try:
        paths = build_report(folder)
    except InputError as e:
        _fail(e)
    out.print(f"wrote {len(paths)} files: {folder / 'report.html'}")


@app.command()
def validate(scenario: Path = typer.Argument(..., help="scenario YAML file"),
             set_: Optional[list[str]] = SetOpt):
    """Check a scenario (schema, devices, cost tables, trace, shapes) without running it.

    Example: simrec validate scenarios/default.yaml --set workload.rate_qps=2000
    """
    from .cascade import prepare
    try:
        sc = _load(scenario, set_, None)
        reqs = prepare(sc, 0).requests
    except InputError as e:
        _fail(e, scenario)
    out.print(f"{scenario}: ok ({len(sc.stages)} stages, {len(reqs)} requests per replication, "
              f"{sc.run.replications} replications)")


@app.command()
def schema():
    """Print the JSON Schema of the scenario format (for editors and validators).

    Example: simrec schema > scenario.schema.json
    """
    print(json.dumps(Scenario.model_json_schema(), indent=2))


def _missed_target(sc: Scenario, summary: dict) -> list[str]:
    """A stopping rule that ran out of replications before its precision target."""
    rel, p99 = sc.run.p99_halfwidth_rel, summary["metrics"]["e2e"]["p99_ms"]
    if rel is None or p99.get("lo") is None or not p99.get("mean"):
        return []
    half = (p99["hi"] - p99["lo"]) / 2 / p99["mean"]
    if half <= rel or any("p99_halfwidth_rel" in w for w in summary["warnings"]):
        return []
    return [f"run.p99_halfwidth_rel: stopped at max_replications ({summary['replications']}) with the "
            f"P99's CI half-width at {half:.3g} of the P99, above the {rel:g} target"]


def _ci(m: dict, digits: int = 2) -> str:
    if m["mean"] is None:
        return "unbounded"
    if m["lo"] is None:
        return f"{m['mean']:.{digits}f}"
    return f"{m['mean']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def key_figures(results) -> Table:
    s = results.summary
    table = Table(title=f"{s['scenario']['name']}: {s['replications']} replications, "
                        f"95% CI in brackets (ms unless stated)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    m = s["metrics"]
    for k in ("p50_ms", "p99_ms", "p99_9_ms", "mean_ms"):
        table.add_row(f"end-to-end {k[:-3].replace('_', '.')}", _ci(m["e2e"][k]))
    for name, st in m["stages"].items():
        util = m["utilisation"][name]["stage"]
        table.add_row(f"{name} p99 / utilisation", f"{_ci(st['p99_ms'])} / {_ci(util, 3)}")
    table.add_row("throughput (req/s)", _ci(m["throughput_rps"], 1))
    table.add_row("goodput (req/s within SLO)", _ci(m["goodput_rps"], 1))
    table.add_row("SLO attainment", _ci(m["slo_attainment"], 4))
    return table


app.command()(calibrate)
app.command()(testbed)
app.command()(fidelity)
app.command()(fit)


def main() -> None:
    app()
