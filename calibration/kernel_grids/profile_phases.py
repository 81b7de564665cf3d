"""Profile real phase calls beside the kernel grid's timings of their operators (issue 18).

For each case (a model of calibration/gr_models.py, a phase, L, M) it times the eager call as
bench.py does (CUDA events, device synchronised, inputs rotating: two cached K/V sets), the
same call captured as one CUDA graph (the device's time without the host's launches), and
records one torch.profiler trace of two eager calls (Chrome JSON, with input shapes), so the
kernels launched can be matched against `simrec.operators.graph`. Then each distinct operator
of the graph is timed as calibration/kernel_grid.py times it (isolated and as a graph) and
profiled too. Run from the repository root with ``simrec`` importable::

    python calibration/kernel_grids/profile_phases.py --out /tmp/prof
    python calibration/kernel_grids/profile_phases.py --device cpu --cases tiny --out /tmp/p  # smoke

Writes ``<out>/<case>.trace.json`` and ``<out>/<case>.ops.trace.json`` (torch.profiler),
``<out>/<case>.ops.csv`` (per operator: isolated and graph ms) and ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from simrec import operators as opg

from calibration.bench import Clock
from calibration.gr_models import GRModel, GRSpec
from calibration.kernel_grid import Kernels, Shape, graph_times, host_times

CASES = {   # name: (arch, layers, d_model, heads, ffn, phase, L, M)
    "hstu24x1024_rank_L16384_M64": ("hstu", 24, 1024, 4, 4096, "rank_cached", 16384, 64),
    "hstu24x1024_rank_L1024_M64": ("hstu", 24, 1024, 4, 4096, "rank_cached", 1024, 64),
    "t12x2048_rank_L16384_M64": ("transformer", 12, 2048, 16, 8192, "rank_cached", 16384, 64),
    "t12x2048_rank_L8192_M64": ("transformer", 12, 2048, 16, 8192, "rank_cached", 8192, 64),
    "t24x1024_rank_L16384_M256": ("transformer", 24, 1024, 4, 4096, "rank_cached", 16384, 256),
    "hstu24x1024_prefix_L1024": ("hstu", 24, 1024, 4, 4096, "prefix_encode", 1024, 0),
    "hstu24x1024_prefix_L16384": ("hstu", 24, 1024, 4, 4096, "prefix_encode", 16384, 0),
    "hstu24x1024_full_L4096_M64": ("hstu", 24, 1024, 4, 4096, "full_forward", 4096, 64),
    "t24x1024_prefix_L8192": ("transformer", 24, 1024, 4, 4096, "prefix_encode", 8192, 0),
    "t24x1024_full_L8192_M64": ("transformer", 24, 1024, 4, 4096, "full_forward", 8192, 64),
    "t12x2048_full_L16384_M64": ("transformer", 12, 2048, 16, 8192, "full_forward", 16384, 64),
    "tiny": ("hstu", 2, 64, 2, 256, "rank_cached", 64, 8),      # a CPU smoke test
}


def _median_ms(clock, fn, sets, n):
    return float(np.median([clock.time(fn, sets[i % len(sets)]) for i in range(n)]))


def _graph_ms(fn, sets, clock, est, n):
    return float(np.median(graph_times(fn, sets, clock, est, n))) if clock.cuda else None


def profile_case(name, case, out: Path, dev) -> dict:
    arch, layers, d, h, ffn, phase, L, M = case
    spec = GRSpec(arch=arch, layers=layers, d_model=d, heads=h, ffn=ffn, dtype="bfloat16", short_term_tokens=32)
    torch.manual_seed(0)
    with torch.device(dev):         # weights made on the device: a 12x2048 model took 7 s on the host
        model = GRModel(spec).to(dtype=spec.torch_dtype).eval()
    s, clock = spec.short_term_tokens, Clock(dev)
    tok = lambda t: torch.randn(1, t, d, device=dev, dtype=torch.bfloat16)      # noqa: E731
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    sync = torch.cuda.synchronize if clock.cuda else (lambda: None)
    res = {"case": case}
    with torch.inference_mode():
        if phase == "rank_cached":
            fn = model.rank_cached
            sets = [(model.encode_prefix(tok(L)), tok(s), tok(M)) for _ in range(2)]
        elif phase == "full_forward":
            fn, sets = model.full_forward, [(tok(L), tok(s), tok(M)) for _ in range(2)]
        else:
            fn, sets = model.encode_prefix, [(tok(L),) for _ in range(2)]
        for i in range(5):
            fn(*sets[i % 2])
        sync()
        res["eager_ms"] = _median_ms(clock, fn, sets, 20)
        if clock.cuda:
            res["host_issue_ms"] = float(np.median(host_times(fn, sets, res["eager_ms"], 5)))
        model.mask_cache_limit = None
        res["graph_ms"] = _graph_ms(fn, sets, clock, res["eager_ms"], 10)
        with profile(activities=acts, record_shapes=True) as prof:
            for i in range(2):
                with record_function(f"call{i}"):
                    fn(*sets[i % 2])
            sync()
        prof.export_chrome_trace(str(out / f"{name}.trace.json"))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        res["profiled_kernels_per_call"] = len(kernels) / 2
        res["profiled_kernel_ms_per_call"] = sum(e.time_range.elapsed_us() for e in kernels) / 2 / 1e3
        del sets
        # the graph's operators, timed as the kernel grid times them
        kern = Kernels(dev, torch.bfloat16, s, 128 * 2**20)
        seen, rows = {}, []
        for op in opg.ops(opg.graph(spec, phase, L, M)):
            dims = tuple(int(v) for v in op.dims) + (0,) * (3 - len(op.dims))
            key = (op.kind, dims)
            if key in seen:
                seen[key]["count"] += 1
                continue
            sh = Shape(op.kind, dims, arch if op.kind.startswith("attn") else "",
                       h if op.kind.startswith("attn") or op.kind in opg.LAYOUT_KINDS else 0)
            ofn, inputs = kern.setup(sh)
            for i in range(3):
                ofn(*inputs[i % len(inputs)])
            sync()
            iso = _median_ms(clock, ofn, inputs, 20)
            gr = _graph_ms(ofn, inputs, clock, iso, 10)
            host = float(np.median(host_times(ofn, inputs, gr, 5))) if clock.cuda else None
            seen[key] = {"name": op.name, "kind": op.kind, "dims": list(dims), "count": 1,
                         "launches_declared": int(op.launches), "isolated_ms": iso, "graph_ms": gr,
                         "host_ms": host,
                         "shape": sh, "fn": ofn, "inputs": inputs[:1]}
            rows.append(seen[key])
        with profile(activities=acts, record_shapes=True) as prof:
            for r in rows:
                with record_function(f"op {r['name']} {r['kind']} {r['dims']}"):
                    r["fn"](*r["inputs"][0])
                sync()
        prof.export_chrome_trace(str(out / f"{name}.ops.trace.json"))
    with open(out / f"{name}.ops.csv", "w") as f:
        f.write("name,kind,dim_a,dim_b,dim_c,count,launches_declared,isolated_ms,graph_ms,host_ms\n")
        for r in rows:
            f.write(f"{r['name']},{r['kind']},{','.join(map(str, r['dims']))},{r['count']},"
                    f"{r['launches_declared']},{r['isolated_ms']:.5f},{r['graph_ms'] or 0:.5f},"
                    f"{r['host_ms'] or 0:.5f}\n")
    res["ops_isolated_sum_ms"] = sum(r["isolated_ms"] * r["count"] for r in rows)
    res["ops_graph_sum_ms"] = sum((r["graph_ms"] or 0) * r["count"] for r in rows)
    res["ops_host_sum_ms"] = sum((r["host_ms"] or 0) * r["count"] for r in rows)
    res["graph_launches"] = int(opg.total(opg.graph(spec, phase, L, M), "launches"))
    del model, rows, seen, kern
    if clock.cuda:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default=",".join(c for c in CASES if c != "tiny"))
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    summary = {}
    for name in a.cases.split(","):
        t0 = time.monotonic()
        try:
            summary[name] = profile_case(name, CASES[name], a.out, dev)
        except Exception as e:              # one failed case must not cost the others
            summary[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        summary[name]["seconds"] = round(time.monotonic() - t0, 1)
        print(name, json.dumps(summary[name]), flush=True)
        (a.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
