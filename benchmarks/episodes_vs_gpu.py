"""Are a serving log's slow episodes the GPU's or the host's? Join the episodes `simrec fit`
finds with the testbed's once-a-second GPU log (nvidia-smi: SM clock, power, utilisation).

    python benchmarks/episodes_vs_gpu.py calibration/testbed_runs/h200_eager gpu_h.csv:full_u50,relay_u50,full_u70 ...

Each argument after the folder is GPU_LOG:RUN,RUN,... (the runs that log covers). A run's
time zero in wall-clock time is its `meta.date` (written right after the run) minus
`meta.wall_s`, good to about a second, the GPU log's resolution. Per run it prints the SM
clock, power and utilisation in and out of episodes, and per size class of job how much an
episode slows it (the fitted elasticities): a host slowdown stretches host-bound (short)
jobs, a GPU slowdown (clock) long ones.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pandas as pd


def gpu_log(path: Path) -> pd.DataFrame:
    g = pd.read_csv(path, skipinitialspace=True)
    g.columns = ["time", "sm_mhz", "mem_mhz", "power_w", "temp_c", "util_pct"]
    g["time"] = pd.to_datetime(g["time"], format="%Y/%m/%d %H:%M:%S.%f", utc=True)
    return g


def main(argv: list[str]) -> int:
    from simrec.fidelity import fit_log
    from simrec.serving_log import load_log
    folder = Path(argv[0])
    for spec in argv[1:]:
        log_name, runs = spec.split(":")
        g = gpu_log(folder / log_name)
        for run in runs.split(","):
            log = load_log(folder / run)
            meta = log.extra["meta"]
            t0 = datetime.datetime.fromisoformat(meta["date"]) - datetime.timedelta(seconds=meta["wall_s"])
            profile, jobs = fit_log(log)
            sec = (g["time"] - pd.Timestamp(t0)).dt.total_seconds()
            inside = g[(sec >= 0) & (sec <= meta["wall_s"])].assign(s=sec)
            # a second is 'in an episode' when most of its jobs are
            per_s = jobs.assign(s=(jobs["start_ms"] // 1000).astype(int)).groupby("s")["in_episode"].mean()
            lab = per_s.reindex(inside["s"].astype(int)).to_numpy() > 0.5
            f = profile.info["fit"]
            print(f"{run}: {f['episodes']} episodes, {f['time_in_episodes']:.0%} of the time; "
                  f"{len(inside)} GPU samples")
            for name, sel in (("in episodes", lab), ("outside", ~lab)):
                x = inside[sel]
                if len(x):
                    print(f"  {name:12s} n={len(x):4d}  SM {x['sm_mhz'].median():6.0f} MHz (min {x['sm_mhz'].min():.0f})"
                          f"  power {x['power_w'].median():6.1f} W  util {x['util_pct'].median():5.1f}%")
            for phase, ex in sorted(profile.phases.items()):
                if ex.elasticity:
                    edges = [0.0, *ex.base_edges_ms]
                    print(f"  elasticity {phase:14s} " + "  ".join(
                        f">{edges[b]:.2f} ms: {e:.2f}" for b, e in sorted(ex.elasticity.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
