"""Where do the testbed's latency spikes come from: the host, the VM, or the GPU?

The first H100 testbed runs showed clusters of slow jobs about every 1.5 s (each job 10x its
usual time for ~50-70 ms). This probe separates the candidates, each for ``--seconds``:

- ``spin``: a tight host loop on one CPU (no GPU) recording every gap in the clock longer
  than ``--gap-ms``: the vCPU being descheduled shows here;
- ``spin2``: two such loops in two processes pinned to different CPUs at once: are the
  gaps VM-wide (simultaneous) or per-vCPU;
- ``sleep``: 1 ms sleeps: wake-up lateness;
- ``eager`` / ``graph``: a closed loop of one GR full_forward per call, host-timed, eager and
  as one CUDA graph replay; with a CUDA event pair per call (GPU-side time);
- ``gpu_only``: graph replays queued back to back (no host wait between), events between
  them: spikes here are the GPU's own (clocks, other tenants), not the host's.

Also read: /proc/stat steal time and cgroup CPU throttling around each probe, nvidia-smi
clocks and throttle reasons. Writes ``probe.json`` and prints a summary. torch + numpy only::

    python -m calibration.stall_probe --out /tmp/probe --seconds 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path

import numpy as np


def cpu_counters() -> dict:
    out = {}
    try:
        fields = open("/proc/stat").readline().split()[1:]
        names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
        out["proc_stat_jiffies"] = {n: int(v) for n, v in zip(names, fields)}
    except OSError:
        pass
    for f in ("/sys/fs/cgroup/cpu.stat", "/sys/fs/cgroup/cpu.max"):
        try:
            out[f] = open(f).read().strip()
        except OSError:
            pass
    return out


def gaps_summary(t_ms: np.ndarray, d_ms: np.ndarray, seconds: float) -> dict:
    """Gap starts t (ms) and lengths d (ms): count, total, quantiles, spacing of big ones."""
    big = d_ms >= 5.0
    spacing = np.diff(t_ms[big]) / 1000.0
    return {"n_gaps": int(len(d_ms)), "gap_ms_total": round(float(d_ms.sum()), 3),
            "fraction_of_time": round(float(d_ms.sum()) / (seconds * 1000.0), 5),
            "gap_ms_q50_q90_q99_max": [round(float(x), 3) for x in np.quantile(d_ms, [.5, .9, .99, 1])]
            if len(d_ms) else [],
            "n_ge_5ms": int(big.sum()),
            "spacing_s_of_ge_5ms_q10_q50_q90": [round(float(x), 3) for x in np.quantile(spacing, [.1, .5, .9])]
            if len(spacing) > 2 else [],
            "first_ge_5ms": [[round(float(a), 1), round(float(b), 2)] for a, b in
                             zip(t_ms[big][:20], d_ms[big][:20])]}


def spin(seconds: float, gap_ms: float, cpu: int | None = None, t_zero: float | None = None):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    clock = time.perf_counter
    t0 = clock() if t_zero is None else t_zero
    end = clock() + seconds
    gap = gap_ms / 1000.0
    starts, lens = [], []
    prev = clock()
    while prev < end:
        now = clock()
        if now - prev > gap:
            starts.append((prev - t0) * 1000.0)
            lens.append((now - prev) * 1000.0)
        prev = now
    return np.array(starts), np.array(lens)


def _spin_child(args):
    seconds, gap_ms, cpu, wall0 = args
    # a shared wall-clock zero so the two processes' gaps can be lined up
    s, d = spin(seconds, gap_ms, cpu)
    off = (time.time() - wall0) * 1000.0 - seconds * 1000.0
    return (s + off).tolist(), d.tolist()


def sleep_probe(seconds: float) -> dict:
    late = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        time.sleep(0.001)
        late.append((time.perf_counter() - t) * 1000.0 - 1.0)
    late = np.array(late)
    return {"n": len(late), "oversleep_ms_q50_q99_q999_max":
            [round(float(x), 3) for x in np.quantile(late, [.5, .99, .999, 1])],
            "n_over_5ms": int((late > 5).sum())}


def gpu_probes(seconds: float, L: int, M: int) -> dict:
    import torch
    from .gr_models import GRSpec, build_model
    dev = torch.device("cuda")
    spec = GRSpec(arch="transformer", layers=4, d_model=512, heads=8, ffn=2048, dtype="bfloat16",
                  short_term_tokens=32)
    model = build_model(spec, dev, 0)

    def tok(t):
        return torch.randn(1, t, spec.d_model, device=dev, dtype=spec.torch_dtype)
    h, s, c = tok(L), tok(spec.short_term_tokens), tok(M)
    out = {}
    with torch.inference_mode():
        for _ in range(20):
            model.full_forward(h, s, c)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model.full_forward(h, s, c)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model.full_forward(h, s, c)
        torch.cuda.synchronize()

        def loop(fn, name):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            host, gpu, t_start = [], [], []
            clock = time.perf_counter
            t0 = clock()
            end = t0 + seconds
            while True:
                a = clock()
                if a > end:
                    break
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                b = clock()
                host.append((b - a) * 1000.0)
                gpu.append(e0.elapsed_time(e1))
                t_start.append((a - t0) * 1000.0)
            host, gpu, t_start = map(np.array, (host, gpu, t_start))
            med = float(np.median(host))
            slow = host > max(5 * med, med + 3.0)
            out[name] = {"calls": int(len(host)),
                         "host_ms_q50_q99_q999_max": [round(float(x), 4) for x in np.quantile(host, [.5, .99, .999, 1])],
                         "gpu_ms_q50_q99_q999_max": [round(float(x), 4) for x in np.quantile(gpu, [.5, .99, .999, 1])],
                         "slow_calls": int(slow.sum()),
                         "slow_calls_gpu_time_also_slow": int((slow & (gpu > 3 * np.median(gpu))).sum()),
                         "slow_extra_ms_total": round(float((host[slow] - med).sum()), 2),
                         "slow_starts_s": [round(float(x) / 1000, 3) for x in t_start[slow][:40]]}

        loop(lambda: model.full_forward(h, s, c), "eager")
        loop(g.replay, "graph")
        # GPU only: batches of 200 replays queued without host waits, events between them
        n = 200
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        per, rounds = [], 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            evs[0].record()
            for i in range(n):
                g.replay()
                evs[i + 1].record()
            evs[-1].synchronize()
            per += [evs[i].elapsed_time(evs[i + 1]) for i in range(n)]
            rounds += 1
        per = np.array(per)
        med = float(np.median(per))
        out["gpu_only"] = {"replays": int(len(per)), "ms_q50_q99_q999_max":
                           [round(float(x), 4) for x in np.quantile(per, [.5, .99, .999, 1])],
                           "over_3x_median": int((per > 3 * med).sum())}
    out["shape"] = {"L": L, "M": M, "model": spec.to_dict()}
    return out


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "-q", "-d", "PERFORMANCE,CLOCK"], capture_output=True,
                              text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.stall_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--gap-ms", type=float, default=0.3)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--M", type=int, default=128)
    p.add_argument("--no-gpu", action="store_true")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
                 "loadavg": open("/proc/loadavg").read().strip()}
    try:
        res["top"] = subprocess.run(["ps", "-eo", "pid,pcpu,rss,comm", "--sort=-pcpu"], capture_output=True,
                                    text=True, timeout=10).stdout.splitlines()[:15]
    except (OSError, subprocess.SubprocessError):
        pass

    def probe(name, fn):
        before = cpu_counters()
        t = time.perf_counter()
        r = fn()
        res[name] = {"result": r, "seconds": round(time.perf_counter() - t, 2),
                     "counters_before": before, "counters_after": cpu_counters()}
        print(name, json.dumps(r)[:900], flush=True)

    probe("spin", lambda: gaps_summary(*spin(a.seconds, a.gap_ms), a.seconds))
    cpus = sorted(os.sched_getaffinity(0))
    pair = [cpus[0], cpus[-1]]

    def spin2():
        wall0 = time.time() + 0.5
        with mp.get_context("spawn").Pool(2) as pool:
            rs = pool.map(_spin_child, [(a.seconds, a.gap_ms, c, wall0) for c in pair])
        sums = [gaps_summary(np.array(s), np.array(d), a.seconds) for s, d in rs]
        # big gaps of process 0 that overlap a big gap of process 1
        s0, d0 = map(np.array, rs[0])
        s1, d1 = map(np.array, rs[1])
        b0, b1 = d0 >= 5, d1 >= 5
        both = sum(bool(np.any((s1[b1] < a0 + l0) & (s1[b1] + d1[b1] > a0))) for a0, l0 in zip(s0[b0], d0[b0]))
        return {"cpus": pair, "per_process": sums, "ge_5ms_gaps_of_p0_overlapping_p1": int(both),
                "ge_5ms_gaps_p0": int(b0.sum())}
    probe("spin2", spin2)
    probe("sleep", lambda: sleep_probe(a.seconds))
    if not a.no_gpu:
        res["nvidia_smi_before"] = nvidia_smi()
        probe("gpu", lambda: gpu_probes(a.seconds, a.L, a.M))
        res["nvidia_smi_after"] = nvidia_smi()
    (a.out / "probe.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
