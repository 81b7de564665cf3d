"""The `simrec` command: a thin layer that turns library calls into output and exit codes.

Every bad input, including a bad flag, ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click; older releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException

from .cli_calibrate import calibrate
from .cli_fidelity import fidelity, fit, testbed
from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

    from .scenario import Scenario

# Everything heavy (pydantic, numpy, pandas, pyarrow, matplotlib, scipy, rich's tables and
# progress bars) is imported inside the command that needs it: `simrec --help` and
# `simrec --version` then cost a fraction of the full import (benchmarks/startup.py).

ARGV: list[str] = []      # this invocation's arguments, recorded in summary.json by `run`


class _OneLineErrors(TyperGroup):
    """Click prints usage errors with a usage block and exit 2; we want one line and 1.

    SIGTERM is handled like SIGINT (Ctrl-C): the work in progress is abandoned, its temp
    folder removed and the target left as it was; the exit status is 130."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        given = kwargs.get("args", args[0] if args else None)
        ARGV[:] = [str(a) for a in (sys.argv[1:] if given is None else given)]
        previous = _term_as_interrupt()
        try:
            code = super().main(*args, **kwargs)   # non-standalone: Exit(n) comes back as n
        except typer.Exit as e:
            code = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":    # bare `simrec`: the help was shown
                sys.exit(0)
            ctx = getattr(e, "ctx", None)
            cmd = f"{ctx.command_path}: " if ctx is not None else ""
            print(f"error: {cmd}{_one_line(e.format_message())}", file=sys.stderr)
            sys.exit(1)
        except InputError as e:       # from a command without its own handler
            print(_error_lines(e), file=sys.stderr)
            sys.exit(1)
        except MemoryError:
            print("error: out of memory (shorten the run or lower the load)", file=sys.stderr)
            sys.exit(1)
        except OSError as e:          # the system's answer, not a bug: stdout on a full disk, a
            where = e.filename or "error"      # path too long for the file system, ...
            print(f"{where}: {e.strerror or _one_line(str(e))}", file=sys.stderr)
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


def _error_lines(e: InputError) -> str:
    """An input error and the further errors of the same input, one line each."""
    return "\n".join([e.one_line(), *(o.one_line() for o in e.others)])


# Plain click help (rich_markup_mode=None): rich's help panels cost more CPU than the rest
# of `simrec --help` together. Examples sit in \b blocks, so click never rewraps them.
app = typer.Typer(cls=_OneLineErrors, add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="simrec: simulate recommendation serving cascades (retrieval -> "
                       "pre-processing -> ranking) on GPU/NPU nodes. Start with `simrec list "
                       "scenarios`, `simrec init default` and `simrec run default.yaml`.")


@lru_cache(maxsize=None)
def _console(stderr: bool):
    """rich consoles, made on first use (rich.console is not needed for --help)."""
    from rich.console import Console
    return Console(stderr=True) if stderr else Console(soft_wrap=True)


def _warn(text: str) -> None:
    _console(True).print(f"[yellow]warning:[/] {text}")


def _show_version(value: bool) -> None:
    if value:
        from . import version_info
        v = version_info()
        commit = f" (git {v['git_commit'][:12]})" if v.get("git_commit") else ""
        print(f"simrec {v['simrec']}{commit}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="print the simrec version (and git commit) and exit")):
    """The options before a command (the app's help text is Typer's `help`)."""


def _fail(e: InputError, scenario: Path | None = None) -> None:
    if e.source is None and scenario is not None:
        e.source = str(scenario)
    print(_error_lines(e), file=sys.stderr)
    raise typer.Exit(1)


def _load(path: Path, sets: list[str], seed: Optional[int]) -> Scenario:
    from .loader import load_scenario
    overrides = list(sets or [])
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    return load_scenario(path, overrides)


def scenarios_dir() -> Path | None:
    """The shipped scenarios: `simrec/scenarios` in an installed wheel (package data), or
    the checkout's `scenarios/` folder beside the package when run from source."""
    here = Path(__file__).resolve().parent
    for d in (here / "scenarios", here.parent / "scenarios"):
        if (d / "default.yaml").is_file() and (d == here / "scenarios" or (here.parent / "pyproject.toml").is_file()):
            return d
    return None


def shipped(name: str) -> Path | None:
    """The shipped scenario or sweep file called `name` (with or without .yaml), if any."""
    d = scenarios_dir()
    if d is None or not name or "/" in name or name.startswith("."):
        return None
    for cand in (d / name, d / f"{name}.yaml"):
        try:
            if cand.suffix == ".yaml" and cand.is_file():
                return cand
        except OSError:        # e.g. a name too long for a file name: not a shipped one
            return None
    return None


def _scenario_arg(path: Path) -> Path:
    """A path as given, or, where nothing exists there, the shipped file of that name: so
    `simrec run default` works from any folder and for a pip user without a checkout."""
    if os.path.lexists(path):
        return path
    return shipped(str(path)) or path


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
def _bar(unit: str, pooled: bool = False):
    """A progress bar with an ETA that moves by simulated time within a replication
    (simrec.progress); `pooled`: the points run in pool workers, which report through a
    shared board."""
    from .progress import Bar, installed, new_board
    board = new_board() if pooled else None
    with Bar(unit, _console(True), board) as bar:
        if board is None:
            yield bar
        else:
            with installed(board):
                yield bar


def _cache_for(target: Path, cache: Path | None = None) -> Path:
    """The point cache: --cache, else .simrec-cache beside the output. Not the output folder
    nor inside it: cached points written there made the folder the user's, and the finished
    sweep was then refused (after every point had run)."""
    if cache is None:
        return target.parent / ".simrec-cache"
    c, t = Path(os.path.abspath(cache)), Path(os.path.abspath(target))
    if c == t or t in c.parents:
        raise InputError(f"the point cache must be outside the output folder {target}", str(cache))
    return cache


@app.command()
def run(scenario: Path = typer.Argument(..., help="scenario YAML file, or the name of a shipped one "
                                                  "(simrec list scenarios)"),
        set_: Optional[list[str]] = SetOpt,
        seed: Optional[int] = typer.Option(None, help="override run.seed"),
        out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                               help="results folder (default: results/<scenario name>-<8 hex "
                                                    "digits of the effective scenario's hash>, one per "
                                                    "scenario, overrides and seed)"),
        report_: bool = ReportOpt,
        prediction_interval: bool = typer.Option(
            False, "--prediction-interval", help="also print each P99 as a central value and a 95% prediction "
                                                 "interval for one run of this length (what one measured "
                                                 "window would show, slow episodes included)"),
        shards: int = typer.Option(1, min=1, max=4096, help="split an affinity-routed fleet into this many "
                                                            "independent sub-clusters by user hash (shard.py)"),
        executor: str = ExecutorOpt, workers: Optional[int] = WorkersOpt):
    """Simulate one scenario and write a results folder (plots and report.html included).

    \b
    Example: simrec run scenarios/default.yaml --set workload.rate_qps=1200 --seed 3 --out results/x
    """
    from .folders import check_target
    from .results import record_invocation, run_id
    from .simulate import simulate
    scenario = _scenario_arg(scenario)
    try:
        sc = _load(scenario, set_, seed)
        target = out_dir if out_dir is not None else Path("results") / run_id(sc)
        check_target(target)                   # refuse before the run, not after it
        with _bar("replications", pooled=executor == "local") as bar:
            bar.describe(sc.name, sc.run.replications)
            tick = bar.done
            if shards > 1:
                from .shard import simulate_sharded
                results = simulate_sharded(sc, shards, executor, workers, progress=tick)
            else:
                results = simulate(sc, progress=tick, executor=executor, workers=workers)
        record_invocation(results, ["simrec", *ARGV], list(set_ or []), str(scenario))
        target = results.write(target, report_)
    except InputError as e:
        _fail(e, scenario)
    _console(False).print(key_figures(results))
    if prediction_interval:
        _console(False).print(p99_prediction_intervals(results.summary["metrics"]))
    for w in [*results.summary["warnings"], *_missed_target(sc, results.summary)]:
        _warn(w)
    _console(False).print(f"results: {target}")


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
def sweep(spec: Path = typer.Argument(..., help="a sweep file (with `base:`), or a scenario file; or "
                                                "the name of a shipped one"),
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

    \b
    Example: simrec sweep scenarios/default.yaml --grid workload.rate_qps=300,600 --variant four:stages.ranking.nodes.count=4 --variant eight:stages.ranking.nodes.count=8
    """
    from .folders import check_target, safe_name
    from .loader import load_scenario, read_yaml
    from .sweep import build_spec, load_spec, run_sweep, spec_from_cli
    spec = _scenario_arg(spec)
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
        with _bar("points", pooled=True) as bar:
            bar.describe(spec.stem)
            table = run_sweep(base, spec_obj, target, executor, workers, _cache_for(target, cache),
                              ray_address, bar.done, report_, refresh=refresh)
    except InputError as e:
        _fail(e, spec)
    m = spec_obj.metric
    show = [c for c in ("variant", *spec_obj.grid, m, m + "_lo", m + "_hi", "goodput_rps",
                        "slo_attainment", "relay.prefix_hit_rate") if c in table.columns]
    _console(False).print(table[show].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    _console(False).print(f"results: {target}")


@app.command()
def capacity(scenario: Path = typer.Argument(..., help="scenario YAML file, or the name of a shipped one"),
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
             cache: Optional[Path] = CacheOpt, refresh: bool = RefreshOpt, report_: bool = ReportOpt,
             executor: str = ExecutorOpt, workers: Optional[int] = WorkersOpt):
    """Largest QPS (or L), or fewest instances, whose P99 upper confidence bound meets the SLO.

    \b
    Example: simrec capacity scenarios/default.yaml --param workload.rate_qps --metric stages.ranking.p99_ms
    """
    from .capacity import search, write_capacity
    from .folders import check_target, safe_name
    from .loader import get_path
    from .sweep import slo_for
    scenario = _scenario_arg(scenario)
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
        with _bar("simulations", pooled=True) as bar:
            bar.describe(param, max_evals)
            cap, summaries = search(sc, param, metric, budget, first, worse_when_higher=not fewest,
                                    integer=is_int, rel_tol=rel_tol, max_evals=max_evals,
                                    cache_dir=_cache_for(target, cache), bounds=(min_value, max_value),
                                    progress=lambda d, t: bar.done(d), refresh=refresh,
                                    executor=executor, workers=workers)
        write_capacity(cap, summaries, target, report_)
    except InputError as e:
        _fail(e, scenario)
    d = cap.as_dict()
    _console(False).print(f"{param}: passing {d['bracket'][0]}, failing {d['bracket'][1]} "
              f"({metric} upper 95% bound vs {budget} ms; {d['evaluations']} simulations"
              f"{', undecided ' + str(d['undecided']) if d['undecided'] else ''}"
              f"{'; the metric stopped improving: the SLO looks unreachable' if d['plateau'] else ''})")
    for w in d["warnings"]:
        _warn(w)
    _console(False).print(f"results: {target}")


@app.command()
def report(folder: Path = typer.Argument(..., help="a results folder from run, sweep or capacity")):
    """Draw the plots and write report.html for a results folder.

    \b
    Example: simrec report results/x
    """
    from .folders import build_report
    try:
        paths = build_report(folder)
    except InputError as e:
        _fail(e)
    _console(False).print(f"wrote {len(paths)} files: {folder / 'report.html'}")


@app.command()
def regime(scenario: Path = typer.Argument(..., help="a scenario whose arrivals or embedding drift "
                                                      "change mid-run, or the name of a shipped one"),
           static: list[float] = typer.Option([], "--static", help="a static EMB share of the pool to "
                                                                  "compare (repeatable)"),
           start: Optional[float] = typer.Option(None, help="adaptive controllers' starting EMB share "
                                                            "(default: the scenario's split)"),
           switch_s: Optional[float] = typer.Option(None, help="when the regime switches (default: the "
                                                               "last rate or drift step)"),
           window_s: float = typer.Option(2.0, min=0.001, help="P99 window for the recovery time"),
           hold: int = typer.Option(5, min=1, help="windows in a row under the SLO to count as recovered"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="one results folder per policy")):
    """Study S7c: a workload regime switch mid-run under each HBM partition policy (the same
    requests for all): the EMB:KV boundary over time and the time to recover the SLO.

    \b
    Example: simrec regime scenarios/helm_switch.yaml --switch-s 40 --static 0.55 --static 0.2
    """
    from . import regime_switch
    argv = [str(_scenario_arg(scenario)), "--window-s", str(window_s), "--hold", str(hold)]
    for share in static:
        argv += ["--static", str(share)]
    for flag, value in (("--start", start), ("--switch-s", switch_s), ("--out", out)):
        if value is not None:
            argv += [flag, str(value)]
    try:
        regime_switch.main(argv)
    except InputError as e:
        _fail(e, scenario)


@app.command()
def compare(folders: list[Path] = typer.Argument(..., metavar="DIR", help="run, sweep or capacity "
                                                                            "folders; the first is the reference"),
            out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                                   help="default: results/compare-<8 hex of the folders>")):
    """Put runs (and sweep or capacity points) side by side: figures with intervals and
    differences from the first; writes compare.csv, report.html and plots.

    \b
    Example: simrec compare results/x results/sweep-default --out results/x-vs-sweep
    """
    from .compare import compare as run_compare, default_out
    target = out_dir if out_dir is not None else default_out(folders)
    try:
        _, _, text = run_compare(folders, target)
    except InputError as e:
        _fail(e)
    _console(False).print(text, soft_wrap=True)
    _console(False).print(f"results: {target}")


@app.command()
def validate(scenario: Path = typer.Argument(..., help="scenario YAML file, or the name of a shipped one"),
             set_: Optional[list[str]] = SetOpt):
    """Check a scenario (schema, devices, cost tables, trace, shapes) without running it.

    \b
    Example: simrec validate scenarios/default.yaml --set workload.rate_qps=1200
    """
    from .cascade import prepare
    scenario = _scenario_arg(scenario)
    try:
        sc = _load(scenario, set_, None)
        reqs = prepare(sc, 0).requests
    except InputError as e:
        _fail(e, scenario)
    print(f"{scenario}: ok ({len(sc.stages)} stages, {len(reqs)} requests per replication, "
          f"{sc.run.replications} replications)")


LISTS = ("devices", "tables", "scenarios")


@app.command("list")
def list_(what: str = typer.Argument(..., metavar="devices|tables|scenarios", autocompletion=lambda: list(LISTS),
                                     help="what to list: device presets, built-in cost tables, or "
                                          "the shipped scenario and sweep files")):
    """List the device presets, the built-in cost tables or the shipped scenarios.

    \b
    Example: simrec list scenarios
    """
    try:
        if what not in LISTS:
            raise InputError(f"choose devices, tables or scenarios (got {what!r})", "list")
        rows = {"devices": _devices, "tables": _tables, "scenarios": _scenarios}[what]()
    except InputError as e:
        _fail(e)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def _devices() -> list[tuple[str, ...]]:
    from .devices import PRESETS
    rows = [("preset", "HBM", "TFLOP/s", "HBM GB/s", "host GB/s", "device")]
    for key, d in PRESETS.items():
        gb = d["hbm_bytes"]
        size = f"{gb / 2**30:g} GiB" if gb % 2**30 == 0 else f"{gb / 1e9:g} GB"
        rows.append((key, size, f"{d['peak_tflops']:g}", f"{d['hbm_gbps']:g}",
                     f"{d['host_link_gbps']:g}", d["name"]))
    return rows


def _tables() -> list[tuple[str, ...]]:
    """The built-in cost tables, from their manifests alone (no table file is read)."""
    import simrec.calibration
    tables = Path(simrec.calibration.__file__).resolve().parent / "tables"
    rows = [("table", "label", "model", "L grid", "M grid", "device")]
    for d in sorted(tables.iterdir()) if tables.is_dir() else []:
        try:
            m = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        grid, model = m.get("grid") or {}, m.get("model") or {}
        span = lambda v: f"{min(v)}..{max(v)}" if v else "-"   # noqa: E731
        rows.append((d.name, str(m.get("label", "?")),
                     f"{model.get('arch', '?')} {model.get('layers', '?')}x{model.get('d_model', '?')}",
                     span(grid.get("history_len")), span(grid.get("candidates")),
                     str((m.get("device") or {}).get("name", "?"))))
    return rows


def _scenarios() -> list[tuple[str, ...]]:
    """The shipped files: a scenario's `description`, or a sweep file's first comment line."""
    import yaml
    d = scenarios_dir()
    if d is None:
        raise InputError("no shipped scenarios found (a broken install?)", "list")
    rows = [("name", "kind", "description")]
    for p in sorted(d.glob("*.yaml")):
        text = p.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        kind = "sweep" if isinstance(data, dict) and "base" in data else "scenario"
        desc = data.get("description") if isinstance(data, dict) else None
        if not desc:
            desc = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        rows.append((p.stem, kind, str(desc)))
    return rows


@app.command()
def init(name: str = typer.Argument(..., help="a shipped scenario or sweep file (simrec list scenarios)",
                                    autocompletion=lambda: _shipped_names()),
         out: Optional[Path] = typer.Option(None, "--out", "-o", help="where to write it (a file, or a "
                                                                     "folder; default: ./NAME.yaml)")):
    """Copy a shipped scenario (or sweep file) out, to edit it; never overwrites a file.

    \b
    Example: simrec init default --out my.yaml
    """
    try:
        src = shipped(name)
        if src is None:
            known = ", ".join(_shipped_names())
            raise InputError(f"no shipped scenario {name!r} (shipped: {known or 'none'})", "init")
        dest = out if out is not None else Path(src.name)
        if dest.is_dir():
            dest = dest / src.name
        try:
            with open(dest, "xb") as f:         # exclusive: an existing file is never replaced
                f.write(src.read_bytes())
        except FileExistsError:
            raise InputError("exists: refusing to overwrite it; choose another --out", str(dest)) from None
        except OSError as e:
            raise InputError(f"cannot write ({e.strerror})", str(dest)) from None
    except InputError as e:
        _fail(e)
    print(f"wrote {dest}")
    base = _sweep_base(dest)
    if base and not (dest.parent / base).exists():
        print(f"note: this sweep file's base is {base}; copy it beside it: simrec init "
              f"{Path(base).stem} --out {dest.parent / base}")


def _shipped_names() -> list[str]:
    d = scenarios_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d is not None else []


def _sweep_base(path: Path) -> str | None:
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return str(data["base"]) if isinstance(data, dict) and "base" in data else None


@app.command()
def schema(sweep_: bool = typer.Option(False, "--sweep", help="the schema of sweep files (a `base:` "
                                                              "scenario and what to vary) instead")):
    """Print the JSON Schema (draft 2020-12) of scenario files, or of sweep files (for
    editors and validators: every file in scenarios/ is one or the other).

    \b
    Example: simrec schema > scenario.schema.json
    """
    from .schema import json_schema
    print(json.dumps(json_schema("sweep" if sweep_ else "scenario"), indent=2))


def _missed_target(sc: Scenario, summary: dict) -> list[str]:
    """A stopping rule that ran out of replications before its precision target."""
    rel, p99 = sc.run.p99_halfwidth_rel, summary["metrics"]["e2e"]["p99_ms"]
    if rel is None or not p99.get("mean") or any("p99_halfwidth_rel" in w for w in summary["warnings"]):
        return []
    if p99.get("lo") is None or p99.get("hi") is None:     # the data cannot bound it yet
        return [f"run.p99_halfwidth_rel: stopped at max_replications ({summary['replications']}) "
                f"without a bounded P99 interval, short of the {rel:g} target"]
    half = (p99["hi"] - p99["lo"]) / 2 / p99["mean"]
    if half <= rel:
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
    from rich.table import Table
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
