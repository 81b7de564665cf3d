"""Study S7c: a workload regime switch in the middle of a run, and how each HBM partition
policy follows it: the EMB:KV boundary over time and the time to recover the SLO.

`simulate_policies` runs one scenario (whose arrivals or embedding drift change at some
time) under several partition policies with the same seed, so every policy sees the same
requests. `switch_table` then reads, per policy, from the requests and the time series:

- the ranking P99 and SLO attainment before and after the switch;
- the mean EMB share of the pool before the switch and over the last quarter of the run;
- the share of `window_s` windows after the switch whose ranking P99 (by arrival, pooled
  over replications) is over the stage budget;
- settle: the time from the switch until the mean boundary first comes within 0.05 of
  its mean over the last quarter of the run (0 for a static split);
- recovery: the time from the switch until that windowed P99 is back under the budget and
  stays there for `hold` windows in a row (and for 90% of the windows after); 0 if it
  never left, None (NaN in the table) if it never came back.

Run from a shell (prints a table, writes one results folder per policy under --out):

    simrec regime scenarios/helm_switch.yaml --switch-s 40 --static 0.55 --static 0.2
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import scenario as sc
from .errors import InputError
from .folders import atomic_folder, check_target, is_simrec_folder
from .loader import load_scenario, with_overrides
from .results import Results, warmup_ms

ADAPTIVE = {
    "marginal": {"hbm.partition": {"kind": "marginal"}},
    "miss_curve": {"hbm.partition": {"kind": "miss_curve"}},
    "miss_curve+hbm_aware": {"hbm.partition": {"kind": "miss_curve"}, "stages.ranking.router": "hbm_aware"},
}


def switch_time_s(scenario: sc.Scenario) -> float:
    """The last time the workload changes: a piecewise rate step or an embedding drift step."""
    times = [0.0]
    arrivals = scenario.workload.arrivals
    if isinstance(arrivals, sc.PiecewiseArrivals):
        times += [s.start_s for s in arrivals.steps]
    if scenario.embedding is not None:
        times += [d.start_s for d in scenario.embedding.drift]
    return max(times)


def policies(static: list[float], start: float) -> dict[str, dict]:
    """Static splits (named static-<f>) and the adaptive controllers started at `start`."""
    out = {f"static-{f:g}": {"hbm.partition": {"kind": "static", "emb_fraction": f}} for f in static}
    for name, over in ADAPTIVE.items():
        over = {**over, "hbm.partition": {**over["hbm.partition"], "start_emb_fraction": start}}
        out[name] = over
    return out


def simulate_policies(scenario: sc.Scenario, named: dict[str, dict]) -> dict[str, Results]:
    from .simulate import simulate
    scenarios = {name: with_overrides(scenario, over) for name, over in named.items()}   # all checked first
    return {name: simulate(s) for name, s in scenarios.items()}


def windowed_p99(results: Results, stage: str, window_s: float) -> pd.DataFrame:
    """Per window of arrivals (pooled over replications): start time (s), the stage's P99
    sojourn (ms) and the share of requests within every SLO."""
    req = results.requests.to_pandas()
    t = req["arrival_ms"].to_numpy() / 1000.0
    sojourn = (req[f"{stage}_wait_ms"] + req[f"{stage}_service_ms"]).to_numpy()
    sojourn = np.where(np.isnan(sojourn), np.inf, sojourn)
    k = np.floor(t / window_s).astype(int)
    frame = pd.DataFrame({"w": k, "sojourn": sojourn, "ok": req["within_slo"].to_numpy()})
    g = frame.groupby("w")
    out = pd.DataFrame({"start_s": g.size().index * window_s,
                        "p99_ms": g["sojourn"].quantile(0.99).to_numpy(),
                        "within_slo": g["ok"].mean().to_numpy(),
                        "requests": g.size().to_numpy()})
    return out


def recovery_s(windows: pd.DataFrame, switch_s: float, budget_ms: float, hold: int) -> float | None:
    """Seconds from the switch until the windowed P99 is under budget for `hold` windows in
    a row (the end of the first window after which it stays under); None if never."""
    after = windows[windows["start_s"] >= switch_s].reset_index(drop=True)
    ok = (after["p99_ms"] <= budget_ms).to_numpy()
    if len(ok) == 0:
        return None
    if ok.all():
        return 0.0
    for i in range(len(ok) - hold + 1):
        if ok[i:i + hold].all() and (i == 0 or not ok[i - 1]):
            if ok[i:].mean() >= 0.9:     # stays under (allowing a rare noisy window)
                return float(after["start_s"][i] - switch_s)
    return None


def boundary(results: Results) -> pd.DataFrame:
    """Mean EMB share of the pool over the relay stage's nodes, per sample time (replication 0)."""
    relay = results.scenario.relay
    ts = results.timeseries.to_pandas()
    x = ts[(ts["stage"] == relay.stage) & (ts["node"] >= 0) & (ts["replication"] == 0)]
    pool = results.replications[0].relay.hbm.pool_bytes
    g = x.groupby("time_ms")["emb_bytes"].mean() / pool
    return pd.DataFrame({"time_s": g.index.to_numpy() / 1000.0, "emb_fraction": g.to_numpy()})


def switch_table(runs: dict[str, Results], switch_s: float, window_s: float = 2.0,
                 hold: int = 5) -> pd.DataFrame:
    rows = []
    for name, res in runs.items():
        scen = res.scenario
        stage = scen.relay.stage
        budget = scen.slo.stage_p99_ms.get(stage, scen.slo.p99_ms)
        req = res.requests.to_pandas()
        cut = warmup_ms(scen, res.replications[0]) / 1000.0
        t = req["arrival_ms"] / 1000.0
        soj = (req[f"{stage}_wait_ms"] + req[f"{stage}_service_ms"]).fillna(np.inf)
        before, after = (t >= cut) & (t < switch_s), t >= switch_s
        b = boundary(res)
        end = b["time_s"].max()
        windows = windowed_p99(res, stage, window_s)
        rec = recovery_s(windows, switch_s, budget, hold)
        after_w = windows[windows["start_s"] >= switch_s]
        final = float(b.loc[b["time_s"] >= end - (end - switch_s) / 4, "emb_fraction"].mean())
        b_after = b[b["time_s"] >= switch_s]
        close = b_after[(b_after["emb_fraction"] - final).abs() <= 0.05]
        settle = float(close["time_s"].iloc[0] - switch_s) if len(close) else math.nan
        if b["emb_fraction"].nunique() == 1:      # a static split never moves
            settle = 0.0
        rows.append({
            "policy": name,
            "p99_before_ms": float(np.quantile(soj[before], 0.99)) if before.any() else math.nan,
            "p99_after_ms": float(np.quantile(soj[after], 0.99)) if after.any() else math.nan,
            "slo_after": float(req.loc[after, "within_slo"].mean()) if after.any() else math.nan,
            "emb_fraction_before": float(b.loc[(b["time_s"] >= cut) & (b["time_s"] < switch_s),
                                               "emb_fraction"].mean()),
            "emb_fraction_end": final,
            "settle_s": settle,
            "windows_over": float((after_w["p99_ms"] > budget).mean()) if len(after_w) else math.nan,
            "recovery_s": rec,
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m simrec.regime_switch", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario")
    ap.add_argument("--static", type=float, action="append", default=[],
                    help="a static EMB share of the pool to compare (repeatable)")
    ap.add_argument("--start", type=float, default=None,
                    help="adaptive controllers' starting EMB share (default: the scenario's split)")
    ap.add_argument("--switch-s", type=float, default=None,
                    help="when the regime switches (default: the last rate or drift step)")
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--hold", type=int, default=5, help="windows in a row under the SLO to count as recovered")
    ap.add_argument("--out", default=None, help="write one results folder per policy here")
    args = ap.parse_args(argv)
    scenario = load_scenario(args.scenario)
    check_args(scenario, args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_target(out, is_regime_folder)       # before the simulations, not after them
    start = args.start if args.start is not None else scenario.hbm.bounds()[0]
    runs = simulate_policies(scenario, policies(args.static, start))
    switch = args.switch_s if args.switch_s is not None else switch_time_s(scenario)
    table = switch_table(runs, switch, args.window_s, args.hold)
    print(f"switch at {switch:g} s; ranking budget "
          f"{scenario.slo.stage_p99_ms.get(scenario.relay.stage, scenario.slo.p99_ms):g} ms; "
          f"recovery: P99 over {args.window_s:g} s windows back under budget for {args.hold} windows")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if out is not None:
        with atomic_folder(out, replaces=is_regime_folder) as tmp:    # all of it, or none
            for name, res in runs.items():
                res.write(tmp / name)
            table.to_csv(tmp / "switch.csv", index=False)
            pd.concat([boundary(r).assign(policy=n) for n, r in runs.items()]).to_csv(
                tmp / "boundary.csv", index=False)
        print(f"results: {out}")


def check_args(scenario: sc.Scenario, args: argparse.Namespace) -> None:
    """What the study needs, refused in one line before any simulation."""
    if scenario.relay is None or scenario.hbm is None:
        raise InputError("the regime study moves the HBM boundary: the scenario needs a relay "
                         "and an hbm block", None, "hbm")
    for flag, v in [("--static", f) for f in args.static] + [("--start", args.start)]:
        if v is not None and not 0 <= v <= 1:
            raise InputError(f"must be an EMB share of the pool, in [0, 1] (got {v:g})", flag)
    end = scenario.run.duration_s
    if args.switch_s is not None and not 0 <= args.switch_s <= (end if end is not None else math.inf):
        raise InputError(f"must be a time in the run, 0..{end if end is not None else 'its end'} s "
                         f"(got {args.switch_s:g})", "--switch-s")
    if not (math.isfinite(args.window_s) and args.window_s > 0):
        raise InputError(f"must be a finite time > 0 (got {args.window_s:g})", "--window-s")
    if args.hold < 1:
        raise InputError(f"must be >= 1 (got {args.hold})", "--hold")


def is_regime_folder(path: Path) -> bool:
    """What --out may replace: an empty folder, or an earlier study's (switch.csv,
    boundary.csv and one results folder per policy)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return not names or ({"switch.csv", "boundary.csv"} <= set(names) and all(
        n in ("switch.csv", "boundary.csv") or ((path / n).is_dir() and is_simrec_folder(path / n))
        for n in names))


if __name__ == "__main__":
    main()
