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
one row per point with its parameters and `flat_metrics` (figure, _lo, _hi). The metric and
the x-axis are checked before any point runs; a sweep has at most MAX_POINTS points.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any, Callable

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError
from .executors import run_points
from .folders import atomic_folder
from .loader import _line_of, _message, load_scenario, parse_override, read_yaml, with_overrides
from .results import flat_metrics
from .scenario import Ms, Scenario, field_title

MAX_POINTS = 10_000
VariantName = Annotated[str, Field(min_length=1, max_length=100)]


class SweepSpec(BaseModel):
    """A sweep file: a base scenario, the fields to vary (a grid, named variants) and the
    metric judged (`simrec schema --sweep` is its JSON Schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              field_title_generator=field_title)

    base: str = Field(min_length=1, description="the base scenario file, relative to the sweep file")
    x: str | None = Field(None, description="the plots' x-axis: a grid parameter or 'variant' "
                                            "(default: the first grid parameter)")
    metric: str = Field("e2e.p99_ms", description="the metric plotted and judged against slo_ms, "
                                                  "e.g. stages.ranking.p99_ms")
    slo_ms: Ms | None = Field(None, description="the metric's budget (default: the base scenario's "
                                                "SLO for it)")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="field path -> values; the points are the cartesian "
                                          "product of these (times the variants)")
    variants: dict[VariantName, dict[str, Any]] = Field(
        default_factory=dict, description="name -> {field path: value}, one line per variant in "
                                          "the plots (default: one variant, 'base')")
    set: dict[str, Any] = Field(default_factory=dict, description="field path -> value, applied "
                                                                  "to every point")


def load_spec(path: Path) -> tuple[SweepSpec, Scenario]:
    """A sweep file and its base scenario."""
    data, root = read_yaml(path, "sweep file")
    spec = build_spec(data, str(path), root)
    return spec, load_scenario(path.parent / spec.base)


def build_spec(data: Any, source: str, root=None) -> SweepSpec:
    """A validated SweepSpec; the first problem becomes one InputError (with its line)."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        line = _line_of(root, loc) if root is not None else None
        raise InputError(_message(err), source, ".".join(loc) or None, line) from None


def spec_from_cli(grid: list[str], variants: list[str], sets: list[str]) -> dict:
    """`--grid a.b=1,2,3`, `--variant name:a.b=1;c.d=x`, `--set a.b=1` -> spec fields."""
    out: dict = {"grid": {}, "variants": {}, "set": {}}
    for item in grid:
        keys, _ = parse_override(item)
        raw = item.split("=", 1)[1]
        if ".".join(keys) in out["grid"]:       # as a duplicate key in a file: not the last silently
            raise InputError(f"axis {'.'.join(keys)} given twice", "--grid")
        out["grid"][".".join(keys)] = [parse_override(f"v={v}")[1] for v in raw.split(",")]
    for item in variants:
        if ":" not in item:
            raise InputError(f"variant {item!r} must look like name:path=value;path=value", "--variant")
        name, body = item.split(":", 1)
        if name in out["variants"]:
            raise InputError(f"variant {name!r} given twice", "--variant")
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
    total = len(variants) * math.prod(len(v) for v in spec.grid.values())
    if total > MAX_POINTS:
        raise InputError(f"{total:,} points (variants x grid) is over the limit of {MAX_POINTS:,}", "sweep")
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
              progress: Callable[[int, int], None] | None = None, report: bool = False,
              refresh: bool = False) -> pd.DataFrame:
    """Run every point (cached points are free, unless `refresh`) and write the sweep folder
    atomically. The metric and x-axis are checked first, so a typo costs no simulation."""
    points = expand(base, spec)
    x = spec.x or (next(iter(spec.grid)) if spec.grid else None)
    if x is not None and x not in spec.grid and x != "variant":
        raise InputError(f"must be a grid parameter or 'variant' (got {x!r}; grid: "
                         f"{', '.join(spec.grid) or 'none'})", "sweep", "x")
    check_metric(spec.metric, [sc for _, sc in points], "sweep", "metric")
    data = [sc.model_dump(mode="json") for _, sc in points]
    summaries = run_points(data, executor, workers, cache_dir, ray_address, progress, refresh)
    table = points_table([p for p, _ in points], summaries)
    with atomic_folder(out, report) as tmp:
        (tmp / "sweep.json").write_text(json.dumps({
            "base": base.model_dump(mode="json"), "grid": spec.grid, "variants": spec.variants,
            "set": spec.set, "x": x, "metric": spec.metric,
            "slo_p99_ms": spec.slo_ms or slo_for(base, spec.metric)}, indent=2) + "\n")
        table.to_parquet(tmp / "points.parquet", index=False)
    return table


# The figures `flat_metrics` gives a summary (tests check this list against real runs).
STAT_MS = ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms")
STAGE_ONLY = ("mean_wait_ms", "mean_service_ms", "mean_batch")
TOTALS = ("throughput_rps", "goodput_rps", "slo_attainment", "offered_rps")
RELAY = ("prefix_hit_rate", "hbm_hit_rate", "dram_hit_rate", "remote_fetch_rate", "triggered_fraction",
         "pre_infer.admitted", "pre_infer.used", "pre_infer.wasted", "pre_infer.cancelled",
         "pre_infer.rejected", "pre_infer.ran", "device_ms.pre_infer", "device_ms.ranking",
         "device_ms.pre_infer_share", "declined.dram_reload", "declined.remote_fetch",
         "hbm.evictions", "hbm.expired", "dram.hits", "dram.drops")
HBM = ("emb_hit_rate", "emb_ms_mean", "emb_fraction_mean", "emb_fraction_min", "emb_fraction_max",
       "boundary_moves", "emb_miss_bytes", "emb_refill_bytes", "emb_dropped_bytes", "gather_extrapolated")


def metric_names(scenario: Scenario) -> set[str]:
    """The metric names a run of this scenario reports."""
    names = {f"e2e.{m}" for m in STAT_MS} | set(TOTALS)
    for st in scenario.stages:
        names |= {f"stages.{st}.{m}" for m in (*STAT_MS, *STAGE_ONLY)} | {f"utilisation.{st}.stage"}
    if scenario.relay is not None:
        names |= {f"relay.{m}" for m in RELAY}
    if scenario.hbm is not None:
        names |= {f"hbm.{m}" for m in HBM}
    from . import history_store
    return names | history_store.metric_names(scenario)


def check_metric(metric: str, scenarios: list[Scenario], source: str, path: str | None = None) -> None:
    """Refuse a metric no scenario reports, before anything runs."""
    names = set().union(*(metric_names(sc) for sc in scenarios))
    if metric not in names:
        raise InputError(f"unknown metric {metric!r} (e.g. e2e.p99_ms, stages.<name>.p99_ms, "
                         f"slo_attainment, goodput_rps)", source, path)


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
