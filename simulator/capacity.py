"""Capacity search: the largest load (or history length), or the fewest instances, at
which a P99 stays under its SLO.

A point *passes* only if the upper confidence bound of its P99 is under the SLO, *fails*
only if the lower bound is over it, and is *undecided* otherwise. The search expands from
a start value until it has a passing and a failing point, then bisects the gaps between
the largest pass, any undecided points, and the smallest fail (geometric midpoints for
continuous parameters, integers for counts). The reported bracket [largest pass, smallest
fail] holds the true boundary at the stated confidence; the largest pass is the
conservative capacity. Every point uses the scenario's seed (common random numbers).

The search runs in rounds of `width` candidates (default 2) evaluated together on the
sweep's executors (a local process pool by default): the first round is the start and its
next worse neighbour, each later expansion round steps on `width` values, and each
bisection round splits the open gaps into `width` + 1 parts (or takes each gap's
midpoint). Which candidates a round holds depends only on the verdicts before it, so the
serial, pool and Ray executors give byte-identical results.
"""

from __future__ import annotations

import json
import math
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import InputError
from .executors import kept_pool, run_points
from .folders import atomic_folder
from .loader import with_overrides
from .results import flat_metrics, short_replication_warning
from .scenario import Scenario
from .sweep import check_metric, points_table


WIDTH = 2      # candidates per round: a fixed default (not the core count), so results never
               # depend on the machine; 2 keeps two cores busy


@dataclass
class Capacity:
    parameter: str
    metric: str
    slo_ms: float
    worse_when_higher: bool
    passing: float | None = None     # best passing value found
    failing: float | None = None     # nearest failing value on the other side
    undecided: list[float] = field(default_factory=list)
    plateau: bool = False            # failing values stopped improving: the SLO looks unreachable
    points: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"parameter": self.parameter, "metric": self.metric, "slo_ms": self.slo_ms,
                "worse_when_higher": self.worse_when_higher,
                "bracket": [self.passing, self.failing], "undecided": sorted(self.undecided),
                "evaluations": len(self.points), "plateau": self.plateau,
                "warnings": self.warnings(), "points": self.points}

    def warnings(self) -> list[str]:
        """The bracket's ends whose P99 interval the run itself doubts (short replications)."""
        ends = {"passing": self.passing, "failing": self.failing}
        doubt = [f"{k} end ({v:g})" for k, v in ends.items() if v is not None and any(
            p["value"] == v and p["short_replications"] for p in self.points)]
        verb = "rest" if len(doubt) > 1 else "rests"
        return [f"the bracket's {' and '.join(doubt)} {verb} on replications short for the P99, "
                f"its bound less sure than 95% (see that point's warnings): lengthen run.requests "
                f"or run.duration_s"] if doubt else []


def search(base: Scenario, parameter: str, metric: str, slo_ms: float, start: float,
           worse_when_higher: bool = True, integer: bool = False, rel_tol: float = 0.02,
           max_evals: int = 20, cache_dir: Path | None = None,
           bounds: tuple[float | None, float | None] = (None, None),
           progress: Callable[[int, int], None] | None = None,
           refresh: bool = False, executor: str = "local", workers: int | None = None,
           width: int = WIDTH, ray_address: str | None = None) -> tuple[Capacity, list[dict]]:
    """The search, in rounds of `width` candidates evaluated together on `executor` (see
    executors.run_points). The candidates depend only on the verdicts so far, never on the
    executor or the worker count, so every executor gives byte-identical results."""
    if base.run.replications < 2:
        raise InputError("capacity search needs run.replications >= 2 (it uses the P99's "
                         "upper confidence bound)", "run.replications")
    check_search(slo_ms, start, rel_tol, max_evals, bounds)
    if not isinstance(width, int) or not 1 <= width <= 64:
        raise InputError(f"must be an integer from 1 to 64 (got {width!r})", "--width")
    check_metric(metric, [base], "--metric")
    start = min(max(start, bounds[0] or start), bounds[1] or start)     # inside the bounds
    cap = Capacity(parameter, metric, slo_ms, worse_when_higher)
    summaries: list[dict] = []
    verdicts: dict[float, str] = {}

    def record(value: float, summary: dict) -> None:
        row = flat_metrics(summary)
        if metric not in row:
            raise InputError(f"unknown metric {metric!r} (e.g. e2e.p99_ms, stages.<name>.p99_ms)",
                             "--metric")
        lo, hi = row[metric + "_lo"], row[metric + "_hi"]
        if lo is None and hi is None:     # a percentile the data cannot bound above: its
            node = summary["metrics"]      # one-sided lower bound still decides a fail
            for part in metric.split("."):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            lo = node.get("lo_one_sided") if isinstance(node, dict) else None
        if hi is not None and hi <= slo_ms:
            verdict = "pass"
        elif row[metric] is None or lo is not None and lo > slo_ms:
            verdict = "fail"     # (a P99 that is unbounded fails)
        else:
            verdict = "undecided"
        verdicts[value] = verdict
        short = short_replication_warning(summary.get("replication_length")) is not None
        cap.points.append({"value": value, "p99": row[metric], "p99_lo": lo, "p99_hi": hi,
                           "verdict": verdict, "passed": verdict == "pass",
                           "short_replications": short})
        summaries.append(summary)
        if verdict == "pass":
            cap.passing = value if cap.passing is None else (
                max(cap.passing, value) if worse_when_higher else min(cap.passing, value))
        elif verdict == "fail":
            cap.failing = value if cap.failing is None else (
                min(cap.failing, value) if worse_when_higher else max(cap.failing, value))
        else:
            cap.undecided.append(value)

    def evaluate(candidates: list[float]) -> int:
        """Evaluate a round's new candidates together; recorded in the order given."""
        values = list(dict.fromkeys(int(v) if integer else float(v) for v in candidates))
        values = [v for v in values if v not in verdicts][:max_evals - len(cap.points)]
        if not values:
            return 0
        points = [with_overrides(base, {parameter: v}).model_dump(mode="json") for v in values]
        done_before = len(cap.points)
        tick = (lambda d, t: progress(done_before + d, max_evals)) if progress else None
        for v, summary in zip(values, run_points(points, executor, workers, cache_dir, ray_address,
                                                 tick, refresh)):
            record(v, summary)
        return len(values)

    def toward_worse(v: float) -> float:
        if worse_when_higher:
            return v * 2
        return max(1, v // 2) if integer else v / 2

    def toward_better(v: float) -> float:
        if worse_when_higher:
            return max(1, v // 2) if integer else v / 2
        return v * 2

    limits = (start / 1024 if bounds[0] is None else bounds[0],
              start * 1024 if bounds[1] is None else bounds[1])

    def clamp(x: float) -> float:
        return min(max(x, limits[0]), limits[1])

    def walk(v: float, step: Callable[[float], float], n: int) -> list[float]:
        """Up to n new values stepping from v (never past the bounds, never re-evaluated)."""
        out = []
        while len(out) < n:
            nxt = clamp(step(v))
            if nxt == v:
                break              # nothing left to try in that direction
            v = nxt
            if (int(v) if integer else v) not in verdicts:
                out.append(v)
        return out

    def better_order(v: float) -> float:
        return -v if worse_when_higher else v

    # Expand from the start value (never past 1024x it or the bounds) until a pass and a
    # fail are found: the first round is the start and its next worse (then better)
    # neighbours; each later round steps on from the farthest value in the direction the
    # verdicts point (toward better while nothing passed, toward worse while nothing failed).
    def rounds() -> None:
        worse, better = walk(start, toward_worse, width), walk(start, toward_better, width)
        first = [start, *(x for pair in zip_longest(worse, better) for x in pair if x is not None)]
        evaluate(first[:width])
        while len(cap.points) < max_evals and (cap.passing is None or cap.failing is None):
            if cap.passing is None:
                ranked = sorted(cap.points, key=lambda p: -better_order(p["value"]))   # best first
                if len(ranked) >= 2 and _stalled(ranked[1], ranked[0]):
                    cap.plateau = True     # a better value did not lower the P99 beyond its CI
                    break
                cands = walk(ranked[0]["value"], toward_better, width)
            else:
                cands = walk(min((p["value"] for p in cap.points), key=better_order), toward_worse, width)
            if not evaluate(cands):
                break
        while cap.passing is not None and len(cap.points) < max_evals:
            # Narrow the gaps on either side of the undecided zone: between the largest pass and
            # the nearest undecided point, and between the farthest undecided point and the fail
            # (with no fail found, the farthest end is the nearest undecided point beyond the pass).
            p = cap.passing
            beyond = [u for u in cap.undecided if (u > p if worse_when_higher else u < p)]
            far = cap.failing
            if far is None:
                if not beyond:
                    break
                far = min(beyond) if worse_when_higher else max(beyond)
            inside = [u for u in beyond if min(p, far) < u < max(p, far)]
            edge = sorted([p, far, *([min(inside), max(inside)] if inside else [])])
            pairs = [(edge[0], edge[1]), (edge[-2], edge[-1])] if inside else [(edge[0], edge[1])]
            gaps = [(a, b) for a, b in pairs if not _narrow(a, b, rel_tol, integer)]
            if not gaps:
                break
            gaps.sort(key=lambda g: -(abs(math.log(g[1] / g[0])) if g[0] > 0 else g[1] - g[0]))
            shares = [width // len(gaps) + (i < width % len(gaps)) for i in range(len(gaps))]
            cands = [x for (a, b), n in zip(gaps, shares) for x in _split(a, b, n, integer)]
            if not evaluate(cands):
                break

    with kept_pool(executor, min(workers or width, width)):     # one pool for all the rounds
        rounds()
    return cap, summaries


def _split(a: float, b: float, n: int, integer: bool) -> list[float]:
    """n points splitting [a, b] into n + 1 parts: geometric for a continuous parameter
    (the serial bisection's midpoint when n = 1), even for an integer one."""
    if integer:
        return [a + (b - a) * i // (n + 1) for i in range(1, n + 1)]
    if a > 0:
        return [math.sqrt(a * b) if n == 1 else a * (b / a) ** (i / (n + 1)) for i in range(1, n + 1)]
    return [a + (b - a) * i / (n + 1) for i in range(1, n + 1)]


def check_search(slo_ms: float, start: float, rel_tol: float, max_evals: int,
                 bounds: tuple[float | None, float | None]) -> None:
    """The search's own settings, each refused in one line naming its flag."""
    lo, hi = bounds
    checks = [
        ("--slo", slo_ms, _finite(slo_ms) and slo_ms > 0, "must be a finite budget > 0 ms"),
        ("--start", start, _finite(start) and start > 0,
         "must be a finite value > 0 (the search doubles and halves it)"),
        ("--rel-tol", rel_tol, _finite(rel_tol) and 0 < rel_tol < 1, "must be in (0, 1)"),
        ("--max-evals", max_evals, isinstance(max_evals, int) and 1 <= max_evals <= 1000,
         "must be an integer from 1 to 1000"),
        ("--min-value", lo, lo is None or _finite(lo) and lo > 0, "must be a finite value > 0"),
        ("--max-value", hi, hi is None or _finite(hi) and hi > 0, "must be a finite value > 0"),
        ("--min-value", lo, lo is None or hi is None or lo <= hi, f"must be <= --max-value ({hi})"),
    ]
    for flag, value, ok, message in checks:
        if not ok:
            raise InputError(f"{message} (got {value!r})", flag)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stalled(prev: dict, last: dict) -> bool:
    return (prev["verdict"] == last["verdict"] == "fail" and prev["p99_lo"] is not None
            and last["p99"] is not None and last["p99"] >= prev["p99_lo"])


def _narrow(a: float, b: float, rel_tol: float, integer: bool) -> bool:
    if integer:
        return abs(a - b) <= 1
    return abs(a - b) <= rel_tol * max(abs(a), abs(b))


def write_capacity(cap: Capacity, summaries: list[dict], out: Path, report: bool = False) -> None:
    params = [{"variant": "capacity", cap.parameter: p["value"]} for p in cap.points]
    with atomic_folder(out, report) as tmp:
        (tmp / "capacity.json").write_text(json.dumps(cap.as_dict(), indent=2) + "\n")
        points_table(params, summaries).to_parquet(tmp / "points.parquet", index=False)
