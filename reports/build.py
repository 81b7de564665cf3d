"""`build_report`: recognise a results folder, draw its plots, write them and report.html.

A folder is recognised by the file it holds, checked in this order: `capacity.json` (a
capacity search), `sweep.json` (a sweep), `summary.json` (a single run).

Everything is rendered in memory first; then each file is written to a temporary name
and renamed into place, the HTML last, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from simrec.errors import InputError, malformed
from simrec.folders import umask

from .capacity import capacity, verdict
from .figures import png_bytes
from .html import Plot
from .latency import latency_cdf, p99_breakdown
from .occupancy import MEMORY_COLUMNS, occupancy
from .pages import capacity_page, run_page, sweep_page
from .queues import queue_lengths
from .sweep import facet_axes, metric_label, metric_vs_x, variants_in_order
from .utilisation import utilisation

MARKERS = ("capacity.json", "sweep.json", "summary.json")


def build_report(folder: str | Path) -> list[Path]:
    """Write `folder/plots/*.png` and `folder/report.html`; return the paths written.

    Raises InputError (one line) when the folder is missing, holds none of the marker
    files, or its files are unreadable or lack what the report needs. Never prints.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("no such results folder", source=str(folder))
    marker = next((folder / m for m in MARKERS if (folder / m).is_file()), None)
    if marker is None:
        raise InputError("not a results folder: expected summary.json (run), sweep.json (sweep) "
                         "or capacity.json (capacity search)", source=str(folder))
    build = {"capacity.json": capacity_report, "sweep.json": sweep_report,
             "summary.json": run_report}[marker.name]
    spec = read_json(marker)
    with warnings.catch_warnings():   # a library report never prints, warnings included
        warnings.simplefilter("ignore")
        with malformed(str(marker)):
            plots, html = build(folder, spec)
    return write_report(folder, plots, html)


# ------------------------------------------------------------------ reading
def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg}", source=str(path), line=e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read: {e}", source=str(path)) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", source=str(path))
    return data


def read_parquet(path: Path, columns: list[str] | None = None, required: bool = True) -> pd.DataFrame | None:
    """Read the given columns (all if None); a missing file or column is an InputError."""
    if not path.is_file():
        if not required:
            return None
        raise InputError(f"missing {path.name}, which this folder's report needs", source=str(path.parent))
    try:
        schema = pq.read_schema(path)
        absent = [c for c in columns or [] if c not in schema.names]
        if absent:
            raise InputError(f"missing column(s) {', '.join(absent)}", source=str(path))
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file ({e})".replace("\n", " "), source=str(path)) from None


def render(name: str, caption: str, fig) -> Plot:
    return Plot(name, caption, png_bytes(fig))


# ------------------------------------------------------------------ the three kinds
def run_report(folder: Path, summary: dict) -> tuple[list[Plot], str]:
    sc = summary["scenario"]
    stages = list(sc["stages"])
    slo = sc["slo"]["p99_ms"]
    per_stage = [f"{s}_{k}_ms" for s in stages for k in ("wait", "service", "hop")]
    req = read_parquet(folder / "requests.parquet", ["replication", "warmup", "latency_ms", *per_stage])
    relay = sc.get("relay")
    ts_cols = ["replication", "time_ms", "stage", "node", "queue_len"]
    pool_cols = ["emb_bytes", "kv_capacity_bytes", "emb_filled_bytes"] if sc.get("hbm") else []
    ts = read_parquet(folder / "timeseries.parquet",
                      ts_cols + (list(MEMORY_COLUMNS) + pool_cols if relay else []))
    warmup = (summary.get("requests", {}).get("warmup_ms") or [None])[0]
    name = sc.get("name", "")
    plots = [
        render("latency_cdf", "End-to-end latency of measured requests: CDF and tail, with the SLO.",
               latency_cdf(req, slo, name)),
        render("p99_breakdown", "Mean queue wait, service and network hop per stage for the requests "
               "near the end-to-end P99 (P98.5–P99.5, pooled), against those near the median.",
               p99_breakdown(req, stages, slo)),
        render("utilisation", "Utilisation per stage over the measurement window: mean over nodes "
               "with its confidence interval, and each node.", utilisation(summary)),
        render("queue_length", "Requests waiting per stage over simulated time (first replication).",
               queue_lengths(ts, stages, warmup)),
    ]
    if relay:
        nodes = sc["stages"][relay.get("stage", "ranking")]["nodes"]["count"]
        plots.append(render("memory", "Prefix-cache HBM (used, pinned) and host-DRAM expander "
                            "occupancy over simulated time on the relay stage (first replication).",
                            occupancy(ts, relay, nodes, warmup)))
    return plots, run_page(summary, plots)


def load_points(folder: Path, spec: dict, required: bool = True) -> pd.DataFrame | None:
    points = read_parquet(folder / "points.parquet", required=required)
    if points is None:
        return None
    if "variant" not in points:
        points["variant"] = "base"
    points["variant"] = points["variant"].fillna("base").astype(str)
    return points


def lead_columns(points: pd.DataFrame, spec: dict, x: str) -> list[str]:
    grid = [k for k in (spec.get("grid") or {}) if k in points and k != x]
    lead = [c for c in ("point", "variant") if c in points]
    return lead + [x] * (x in points and x not in lead) + grid + ["replications"] * ("replications" in points)


def sort_points(points: pd.DataFrame, spec: dict) -> pd.DataFrame:
    order = {v: i for i, v in enumerate(variants_in_order(points, spec))}
    keys = [k for k in facet_axes(points, spec)] + [spec["x"]]
    return (points.assign(_v=points["variant"].map(order))
            .sort_values(["_v", *keys], kind="stable").drop(columns="_v"))


def sweep_report(folder: Path, spec: dict) -> tuple[list[Plot], str]:
    x = spec.setdefault("x", None) or "variant"   # a sweep of variants only: one point each
    spec["x"] = x
    points = load_points(folder, spec)
    if x not in points:
        raise InputError(f"no column for the x parameter {x!r}", source=str(folder / "points.parquet"))
    metric = spec.setdefault("metric", "e2e.p99_ms")
    for col in (metric, "goodput_rps"):
        if col not in points:
            raise InputError(f"missing column {col}", source=str(folder / "points.parquet"))
    slo = spec.get("slo_p99_ms")
    if slo is None:
        slo = ((spec.get("base") or {}).get("slo") or {}).get("p99_ms")
    points = sort_points(points, spec)
    plots = [
        render("p99_vs_x", f"{metric_label(metric)} against {x}, one line per variant, with the "
               "confidence band and the SLO.",
               metric_vs_x(points, spec, metric, f"{metric_label(metric).split(' (')[0]} vs {x}",
                           slo_ms=slo)),
        render("goodput_vs_x", f"SLO-compliant throughput (goodput) against {x}, one line per variant.",
               metric_vs_x(points, spec, "goodput_rps", f"Goodput vs {x}",
                           offered=x == "workload.rate_qps")),
    ]
    if "relay.prefix_hit_rate" in points:
        plots.append(render("hit_rate_vs_x", f"Prefix hit rate at ranking against {x}, one line per "
                            "variant.", metric_vs_x(points, spec, "relay.prefix_hit_rate",
                                                     f"Prefix hit rate vs {x}")))
    spec = {**spec, "slo_p99_ms": slo}
    return plots, sweep_page(spec, points, lead_columns(points, spec, x), plots)


def capacity_report(folder: Path, spec: dict) -> tuple[list[Plot], str]:
    param = spec["parameter"]
    if not isinstance(spec.get("points"), list):
        raise InputError("'points' must be a list of evaluations", source=str(folder / "capacity.json"))
    for p in spec["points"]:
        p["value"], verdict(p)   # noqa: B018 (KeyError -> InputError naming the field)
    points = load_points(folder, spec, required=False)
    lead: list[str] = []
    if points is not None:
        lead = [c for c in ("point", param) if c in points]
        if param in points:
            points = points.sort_values(param, kind="stable")
    plots = [render("capacity", f"Capacity search: {spec.get('metric', 'P99')} with its confidence "
                    f"interval at each evaluated {param}, pass/fail, the SLO and the bracket.",
                    capacity(spec))]
    return plots, capacity_page(spec, points, lead, plots)


# ------------------------------------------------------------------ writing
def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())   # as open() would make it: mkstemp's 0600 would hide it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(folder: Path, plots: list[Plot], html: str) -> list[Path]:
    out = folder / "plots"
    written = []
    try:
        out.mkdir(exist_ok=True)
        for p in plots:
            _write_atomic(out / f"{p.name}.png", p.png)
            written.append(out / f"{p.name}.png")
        _write_atomic(folder / "report.html", html.encode("utf-8"))
    except OSError as e:      # a file named plots, a read-only or full folder: one line
        raise InputError(f"cannot write the report ({e.strerror})", source=str(e.filename or folder)) from None
    return written + [folder / "report.html"]
