"""Leave-one-model-out validation of the kernel cost model (simrec.kernel_model) on the H200.

Each model shape measured on the H200 has its phases (prefix_encode, rank_cached,
full_forward; isolated medians, batch 1) predicted without its own phase table:

- kernels: the other models' kernel tables. A kernel family none of them measured (the
  attention of an architecture only this model has) comes from the model's own kernel
  table, and the report says so; a model without kernels of its own gets none.
- the host side of the eager pipeline (s, g with the grid's host rows; h, e without):
  fitted on the other models' phase tables.
- a second pass thins the grid to a coarser L and M grid (SPARSE), so that the phase points
  between its rows test interpolation and the regressors rather than exact lookups.
- the roofline beside it: compute and memory efficiencies and launch scale fitted by least
  squares on log time over the same other models' phase tables, on the H200's peaks.

Errors are |predicted / measured - 1| per grid point; the launch-bound regime (the kernel
model's host launches outlast the device work) is reported apart. Then a simulation check:
scenarios/relay.yaml costed with ``kind: kernels`` for h200_gr_hstu's shape against the same
scenario with ``kind: gr, table: h200_gr_hstu`` (ranking P50/P99). Run from the repo root:

    python benchmarks/kernel_model_validation.py [--duration-s 30] [--replications 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from simrec.calibration.table import load_table
from simrec.errors import InputError
from simrec.kernel_model import (PHASES, KernelCosts, ModelSpec, _family, _head_dim, fit_overhead,
                                 load_kernels, phase_points)
from simrec.roofline import Efficiency, ModelShape, Roofline, table_peaks

ROOT = Path(__file__).resolve().parents[1]
GRID = "calibration/kernel_grids/h200_kernel_grid"      # python -m calibration.kernel_grid, one H200
# name -> (phase table folder, model key: tables of one model shape are left out together)
TABLES = {
    "h200_gr_transformer": ("calibration/tables/h200_gr_transformer", "transformer 24x1024 h4"),
    "h200_gr_hstu": ("calibration/tables/h200_gr_hstu", "hstu 24x1024 h4"),
    "h200_eager_h": ("calibration/testbed_runs/h200_eager/h200_eager_h", "transformer 8x1024 h8"),
    "h200_eager_j": ("calibration/testbed_runs/h200_eager/h200_eager_j", "transformer 8x1024 h8"),
    "h200_t8x512": ("calibration/tables/h200_t8x512", "transformer 8x512 h8"),
    "h200_t12x2048": ("calibration/tables/h200_t12x2048", "transformer 12x2048 h16"),
}


def _ref(name: str) -> str:
    return str(ROOT / TABLES[name][0])


def _restrict(kt, families: set[str]):
    """A kernel table keeping only the rows of these families."""
    def keep(rows):
        out = {}
        for kind, (dims, arch, heads, t) in rows.items():
            k = np.array([_family(kind, a, _head_dim(kind, d, h)) in families
                          for d, a, h in zip(dims, arch, heads)], bool)
            if k.any():
                out[kind] = (dims[k], arch[k], heads[k], t[k])
        return out
    return dataclasses.replace(kt, rows=keep(kt.rows), graph_rows=keep(kt.graph_rows))


SPARSE = {"history_len": (1024, 4096, 16384, 32768), "candidates": (64, 256, 1024)}


def _sparse(kt):
    """The grid with only the shapes of a coarser L and M grid (SPARSE: the first grid's), so
    the phase points at L = 2048, 8192, 12288 and M = 128, 512 fall between its rows."""
    from simrec.calibration.kernel_grid import grid_shapes
    g = kt.manifest["grid"]
    keep = {(sh.kind, sh.dims, sh.arch, sh.heads) for sh in grid_shapes(
        g["d_model"], g["heads"], SPARSE["history_len"], SPARSE["candidates"],
        kt.manifest["model"]["short_term_tokens"])}

    def cut(rows):
        out = {}
        for kind, (dims, arch, heads, t) in rows.items():
            k = np.array([(kind, tuple(int(v) for v in d), str(a), int(h)) in keep
                          for d, a, h in zip(dims, arch, heads)], bool)
            if k.any():
                out[kind] = (dims[k], arch[k], heads[k], t[k])
        return out
    return dataclasses.replace(kt, rows=cut(kt.rows), graph_rows=cut(kt.graph_rows), host_rows=cut(kt.host_rows))


def _needed(spec) -> set[str]:
    hd = spec.d_model // spec.heads
    return {"gemm", "memory", f"attn_causal:{spec.arch}:hd{hd}", f"attn_target:{spec.arch}:hd{hd}"}


def _stats(err) -> str:
    err = np.asarray(err)
    if not len(err):
        return "-"
    return f"{np.median(err):.1%} / {np.quantile(err, 0.9):.1%}"


def fit_roofline(shapes_points, peaks):
    """Efficiency fitted by least squares on log time over several models' points."""
    from scipy.optimize import least_squares

    def resid(theta):
        e = Efficiency(*np.exp(theta))
        return np.concatenate([np.log(Roofline(m, peaks, e).time_ms(ph, L, M)) - np.log(ms)
                               for m, pts in shapes_points for ph, L, M, ms in pts])
    lo, hi = np.log([1e-6, 1e-6, 1e-6]), np.log([1.0, 1.0, 1e6])
    best = min((least_squares(resid, np.log([ce, 0.5, 2.0]), bounds=(lo, hi)) for ce in (0.01, 0.1, 0.5)),
               key=lambda r: r.cost)
    return Efficiency(*np.exp(best.x))


def _roofline_points(name: str):
    from simrec.roofline import medians
    t = load_table(_ref(name))
    m = ModelShape.from_manifest(t.manifest.model, _ref(name))
    have = {p for p, c in t.curves if c == "isolated"}
    return m, [(ph, *medians(t, ph)) for ph in PHASES if ph in have]


def validate(source: str = "grid") -> tuple[list[str], dict]:
    """source 'grid': every model's kernels from the wide kernel grid alone (GRID, measured
    by calibration/kernel_grid.py in its own session); 'sparse': from that grid thinned to
    SPARSE's L and M (off-grid lookups: interpolation or the regressors); 'others': from the
    other models' kernel tables (bench.py's, at those models' shapes only)."""
    kernel_tables = {n: load_kernels(_ref(n)) for n in TABLES
                     if load_table(_ref(n)) and _has_kernels(n)}
    grid = {"grid": lambda: load_kernels(str(ROOT / GRID)),
            "sparse": lambda: _sparse(load_kernels(str(ROOT / GRID)))}.get(source, lambda: None)()
    lines = ["| left out | model | phase | kernel model median / P90 | roofline (same data) median / P90 | "
             "device-bound n, kernel median / P90 | launch-bound n, kernel median / P90 |",
             "|---|---|---|---|---|---|---|"]
    notes, pooled = [], {"device": [], "launch": [], "roof": []}
    for name, (_, key) in TABLES.items():
        table = load_table(_ref(name))
        spec = ModelSpec.from_dict(table.manifest.model)
        others = [GRID] if grid else [n for n in kernel_tables if TABLES[n][1] != key]
        ktabs = [grid] if grid else [kernel_tables[n] for n in others]
        have = {_family(k, a, _head_dim(k, d, h)) for kt in ktabs
                for k, (dims, arch, heads, _) in kt.rows.items() for d, a, h in zip(dims, arch, heads)}
        missing = _needed(spec) - have
        src = f"kernels of {', '.join(others)}"
        if missing and name in kernel_tables and not grid:
            ktabs.append(_restrict(kernel_tables[name], missing))
            src += f"; {', '.join(sorted(missing))} from its own kernel table (no other model has them)"
        elif missing:
            src += (f"; no table measured {', '.join(sorted(missing))}: costed from another head "
                    "layout's attention regressor (a different SDPA kernel)")
        costs = KernelCosts(ktabs)
        # The overhead is fitted on the other models' phases, costed from the other models'
        # kernels only; a model whose kernels only the left-out one has cannot be costed.
        fit_pts, fitted_on = [], []
        pool = KernelCosts([grid] if grid else [kernel_tables[k] for k in kernel_tables if TABLES[k][1] != key])
        for n in TABLES:
            if TABLES[n][1] == key:
                continue
            t = load_table(_ref(n))
            try:
                fit_pts += [(c, ms) for *_, c, ms in phase_points(t, ModelSpec.from_dict(t.manifest.model), pool)]
                fitted_on.append(n)
            except InputError:
                pass
        overhead = fit_overhead(fit_pts)
        peaks, _ = table_peaks(table.manifest, _ref(name))
        eff = fit_roofline([_roofline_points(n) for n in TABLES if TABLES[n][1] != key], peaks)
        roof = Roofline(ModelShape.from_manifest(table.manifest.model, _ref(name)), peaks, eff)
        pts = phase_points(table, spec, costs)
        for ph in PHASES:
            sel = [p for p in pts if p[0] == ph]
            if not sel:
                continue
            err = [abs(c.time_ms(overhead) / ms - 1) for _, _, _, c, ms in sel]
            bound = [c.host_bound(overhead) for _, _, _, c, _ in sel]
            rerr = [abs(float(roof.time_ms(ph, L, M)) / ms - 1) for _, L, M, _, ms in sel]
            dev = [e for e, b in zip(err, bound) if not b]
            lau = [e for e, b in zip(err, bound) if b]
            pooled["device"] += dev
            pooled["launch"] += lau
            pooled["roof"] += rerr
            lines.append(f"| {name} | {key} | {ph} | {_stats(err)} | {_stats(rerr)} | "
                         f"{len(dev)}: {_stats(dev)} | {len(lau)}: {_stats(lau)} |")
        notes.append(f"- {name} ({key}): {src}; overhead fitted on the phase tables of "
                     f"{', '.join(fitted_on)}; roofline on those of "
                     f"{', '.join(n for n in TABLES if TABLES[n][1] != key)}")
        notes.append(f"  overhead h={overhead.host_ms_per_launch * 1e3:.1f} us/launch, "
                     f"e={overhead.kernel_floor_ms * 1e3:.1f} us, c0={overhead.call_ms:.3f} ms, "
                     f"s={overhead.host_scale:.2f} x measured host, g={overhead.host_ms_per_op * 1e3:.1f} us/op; "
                     f"roofline compute {eff.compute:.3f}, memory {eff.memory:.3f}, launch x{eff.launch_scale:.2f}")
    lines.append(f"| all | | all | {_stats(pooled['device'] + pooled['launch'])} | {_stats(pooled['roof'])} | "
                 f"{len(pooled['device'])}: {_stats(pooled['device'])} | "
                 f"{len(pooled['launch'])}: {_stats(pooled['launch'])} |")
    return lines + [""] + notes, pooled


def _has_kernels(name: str) -> bool:
    try:
        return load_kernels(_ref(name)).n_shapes > 0
    except Exception:           # an empty kernels file: this table has no kernels
        return False


# history lengths at the phase table's own L points (weights near the lognormal's mass), so
# the table there is a measurement, not its interpolation: HSTU's causal attention runs in
# query blocks whose alignment makes its time jagged between those points (2.35 ms at
# L=6144, 1.70 at 8192: calibration/kernel_grids/h200_attn_dense), which no table
# interpolation follows
TABLE_L = ("workload.users.history_len={kind: empirical, values: [1024, 2048, 4096, 8192, 12288, 16384], "
           "weights: [0.25, 0.3, 0.25, 0.13, 0.04, 0.03]}")


def simulation_check(duration_s: float, replications: int) -> list[str]:
    """Ranking P50/P99 of scenarios/relay.yaml: costed with the gr table h200_gr_hstu, with
    kernels from that table (overhead fitted on its phase table), and with kernels from the
    grid, the host side fitted on h200_gr_hstu's phase table or on h200_gr_transformer's
    (nothing measured on HSTU); at the scenario's lognormal history lengths and at the
    table's own L points (TABLE_L)."""
    from simrec import load_scenario, simulate
    m = load_table("h200_gr_hstu").manifest.model
    model = (f"model: {{arch: hstu, layers: {m['layers']}, d_model: {m['d_model']}, heads: {m['heads']}, "
             f"ffn: {m['ffn']}, dtype: {m['dtype']}, short_term_tokens: {m['short_term_tokens']}}}")
    grid = f"kind: kernels, table: {ROOT / GRID}, {model}"
    variants = {
        "gr table h200_gr_hstu": [],
        "kernels: h200_gr_hstu's own": [f"stages.ranking.service={{kind: kernels, table: h200_gr_hstu, {model}}}"],
        "kernels: grid, host fitted on h200_gr_hstu": [
            f"stages.ranking.service={{{grid}, overhead_from: [h200_gr_hstu]}}"],
        "kernels: grid, host fitted on h200_gr_transformer": [
            f"stages.ranking.service={{{grid}, overhead_from: [h200_gr_transformer]}}"],
    }
    base = [f"run.duration_s={duration_s:g}", f"run.replications={replications}"]
    out = ["| history lengths | ranking stage costed with | P50 ms | P99 ms | P50 vs gr | P99 vs gr |",
           "|---|---|---|---|---|---|"]
    for lengths, extra in (("lognormal (relay.yaml)", []), ("the table's L points", [TABLE_L])):
        got = {}
        for label, ov in variants.items():
            r = simulate(load_scenario(str(ROOT / "scenarios/relay.yaml"), base + extra + ov))
            st = r.summary["metrics"]["stages"]["ranking"]
            got[label] = (st["p50_ms"]["mean"], st["p99_ms"]["mean"])
        ref = got["gr table h200_gr_hstu"]
        for label, (p50, p99) in got.items():
            out.append(f"| {lengths} | {label} | {p50:.2f} | {p99:.2f} | {p50 / ref[0] - 1:+.1%} | "
                       f"{p99 / ref[1] - 1:+.1%} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--replications", type=int, default=3)
    p.add_argument("--no-simulation", action="store_true")
    a = p.parse_args(argv)
    for source, title in (("grid", f"kernels from the wide kernel grid alone ({GRID})"),
                          ("sparse", f"the same grid without its rows at L = 2048, 8192, 12288 and "
                                     "M = 128, 512 (those phase points are off-grid)"),
                          ("others", "kernels from the other models' kernel tables")):
        lines, _ = validate(source)
        print(f"## Leave-one-model-out on the H200, {title}: |predicted / measured - 1|, median / P90\n")
        print("\n".join(lines) + "\n")
    print("Launch-bound: a point where the fitted host chain outlasts the device's work, so the "
          "phase time is the host's, flat in L and M (e.g. HSTU rank_cached up to L=8k). With the "
          "grid's host rows the chain is s x each operator's measured host issue time + g per "
          "operator, (s, g) fitted on the other models' tables; its error is the Python between "
          "the operators, which differs by architecture (the grid times each operator bare) and "
          "the host speed of the session a table was measured in, not the kernel lookups.")
    if not a.no_simulation:
        print("\n## Simulation check: scenarios/relay.yaml, ranking stage\n")
        print("\n".join(simulation_check(a.duration_s, a.replications)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
