"""Sweeps: a grid (and named variants) over scenario fields, one summary per point.

A sweep file references a base scenario and says what to vary:

    base: ../scenarios/default.yaml          # relative to the sweep file
    x: workload.rate_qps                     # the x-axis of the plots (default: first grid key)
    metric: stages.ranking.p99_ms            # the P99 that is judged (default: e2e.p99_ms)
    slo_ms: 30                               # its budget (default: the scenario's SLO for it)
    grid:                                    # cartesian product of these
      workload.rate_qps: [500, 1000, 1500]
    variants:                                # one line per variant in the plots
      relay: {}
      no-relay: {relay.trigger: {kind: none}}
    set: {run.replications: 3}               # applied to every point

The output folder holds `sweep.json` (the spec, the base scenario) and `points.parquet`:
one row per point with its parameters and `flat_metrics` (figure, _lo, _hi).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError
from .executors import run_points
from .folders import atomic_folder
from .loader import load_scenario, parse_override, with_overrides
from .results import flat_metrics
from .scenario import Scenario


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str
    x: str | None = None
    metric: str = "e2e.p99_ms"
    slo_ms: float | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)


def load_spec(path: Path) -> tuple[SweepSpec, Scenario]:
    """A sweep file and its base scenario."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"cannot read sweep file ({e.strerror})", str(path)) from None
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {getattr(e, 'problem', e)}", str(path)) from None
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(err["msg"], str(path), ".".join(map(str, err["loc"]))) from None
    return spec, load_scenario(path.parent / spec.base)


def spec_from_cli(grid: list[str], variants: list[str], sets: list[str]) -> dict:
    """`--grid a.b=1,2,3`, `--variant name:a.b=1;c.d=x`, `--set a.b=1` -> spec fields."""
    out: dict = {"grid": {}, "variants": {}, "set": {}}
    for item in grid:
        keys, _ = parse_override(item)
        raw = item.split("=", 1)[1]
        out["grid"][".".join(keys)] = [parse_override(f"v={v}")[1] for v in raw.split(",")]
    for item in variants:
        if ":" not in item:
            raise InputError(f"variant {item!r} must look like name:path=value;path=value", "--variant")
        name, body = item.split(":", 1)
        out["variants"][name] = dict((".".join(k), v) for k, v in
                                     (parse_override(x) for x in body.split(";") if x.strip()))
    for item in sets:
        keys, value = parse_override(item)
        out["set"][".".join(keys)] = value
    return out


def expand(base: Scenario, spec: SweepSpec) -> list[tuple[dict, Scenario]]:
    """(parameters, scenario) per point: variants x grid, every point validated."""
    variants = spec.variants or {"base": {}}
    axes = list(spec.grid)
    points = []
    for name, overrides in variants.items():
        for combo in itertools.product(*(spec.grid[a] for a in axes)):
            params = dict(zip(axes, combo))
            try:
                scenario = with_overrides(base, {**spec.set, **overrides, **params})
            except InputError as e:
                raise InputError(f"{e.message} (variant {name!r}, {params})", "sweep", e.path) from None
            points.append(({"variant": name, **params}, scenario))
    return points


def run_sweep(base: Scenario, spec: SweepSpec, out: Path, executor: str = "local",
              workers: int | None = None, cache_dir: Path | None = None,
              ray_address: str | None = None,
              progress: Callable[[int, int], None] | None = None, report: bool = False) -> pd.DataFrame:
    """Run every point (cached points are free) and write the sweep folder atomically."""
    points = expand(base, spec)
    data = [sc.model_dump(mode="json") for _, sc in points]
    summaries = run_points(data, executor, workers, cache_dir, ray_address, progress)
    table = points_table([p for p, _ in points], summaries)
    x = spec.x or (next(iter(spec.grid)) if spec.grid else None)
    with atomic_folder(out, report) as tmp:
        (tmp / "sweep.json").write_text(json.dumps({
            "base": base.model_dump(mode="json"), "grid": spec.grid, "variants": spec.variants,
            "set": spec.set, "x": x, "metric": spec.metric,
            "slo_p99_ms": spec.slo_ms or slo_for(base, spec.metric)}, indent=2) + "\n")
        table.to_parquet(tmp / "points.parquet", index=False)
    return table


def slo_for(scenario: Scenario, metric: str) -> float:
    """The scenario's budget for a P99 metric: a stage budget, else the end-to-end one."""
    parts = metric.split(".")
    if parts[0] == "stages" and len(parts) > 1 and parts[1] in scenario.slo.stage_p99_ms:
        return scenario.slo.stage_p99_ms[parts[1]]
    return scenario.slo.p99_ms


def points_table(params: list[dict], summaries: list[dict]) -> pd.DataFrame:
    rows = [{"point": i, **p, "replications": s["replications"], **flat_metrics(s),
             "warnings": "; ".join(s.get("warnings", []))}
            for i, (p, s) in enumerate(zip(params, summaries))]
    return pd.DataFrame(rows)
