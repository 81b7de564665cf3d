"""The `simrec` command: a thin layer that turns library calls into output and exit codes.

Every bad input, including a bad flag, ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
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

from .errors import InputError
from .loader import load_scenario
from .scenario import Scenario


class _OneLineErrors(TyperGroup):
    """Click prints usage errors with a usage block and exit 2; we want one line and 1."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)   # non-standalone: Exit(n) comes back as n
        except typer.Exit as e:
            code = e.exit_code
        except typer.Abort:
            sys.exit(1)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            cmd = f"{ctx.command_path}: " if ctx is not None else ""
            print(f"error: {cmd}{e.format_message()}", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="simrec: simulate recommendation serving cascades (retrieval -> "
                       "pre-processing -> ranking) on GPU/NPU nodes.")
err = Console(stderr=True)
out = Console(soft_wrap=True)


def _fail(e: InputError, scenario: Path | None = None) -> None:
    if e.source is None and scenario is not None:
        e.source = str(scenario)
    print(str(e), file=sys.stderr)
    raise typer.Exit(1)


def _load(path: Path, sets: list[str], seed: Optional[int]) -> Scenario:
    overrides = list(sets or [])
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    return load_scenario(path, overrides)


SetOpt = typer.Option(None, "--set", "-s", metavar="PATH=VALUE",
                      help="Override a scenario field, e.g. --set stages.ranking.nodes.count=8")


@app.command()
def run(scenario: Path = typer.Argument(..., help="scenario YAML file"),
        set_: Optional[list[str]] = SetOpt,
        seed: Optional[int] = typer.Option(None, help="override run.seed"),
        out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                               help="results folder (default: results/<scenario name>)")):
    """Simulate one scenario and write a results folder.

    Example: simrec run scenarios/default.yaml --set workload.rate_qps=2000 --seed 3 --out results/x
    """
    from .simulate import simulate
    try:
        sc = _load(scenario, set_, seed)
        with Progress(TextColumn("[bold]simulating[/] {task.description}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("replications"), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task(sc.name, total=sc.run.replications)
            results = simulate(sc, progress=lambda done, total: bar.update(task, completed=done))
        target = results.write(out_dir or Path("results") / sc.name)
    except InputError as e:
        _fail(e, scenario)
    out.print(key_figures(results))
    out.print(f"results: {target}")


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


def main() -> None:
    app()
