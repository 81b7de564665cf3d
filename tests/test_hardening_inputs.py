"""Issue 14, classes 2-4: hostile inputs through the CLI (typer's runner).

Every case must end in exit status 1, exactly one line on stderr, no traceback (and no
"internal error", the CLI's last-resort line), the user's files untouched and nothing new
on disk: no results folder, no temp folder, no cache. Most are refused before anything
runs, so the whole file takes a few seconds.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simrec.cli import app
from conftest import snapshot
from test_cli import GOOD          # the same small valid scenario

REPO = Path(__file__).resolve().parent.parent
RELAY = str(REPO / "scenarios" / "relay.yaml")
DEFAULT = str(REPO / "scenarios" / "default.yaml")

TRACE_HEAD = "arrival_ms,user_id,history_len,candidates\n"
TRACED = GOOD.replace("  rate_qps: 200\n", "  arrivals: {kind: trace, path: t.csv}\n").replace(
    "  requests: 2000\n", "")


def assert_refused(tmp_path: Path, args: list) -> str:
    """Run the CLI; check the contract (one line, or one line per error each naming where
    it is); return the first stderr line."""
    before = snapshot(tmp_path)
    r = CliRunner().invoke(app, [str(a) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1, (r.exit_code, r.output, r.stderr)
    assert len(lines) == 1 or all(": " in line for line in lines), r.stderr
    assert "Traceback" not in r.output + r.stderr and "internal error" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before          # nothing changed, nothing left behind
    return lines[0]


@pytest.fixture(autouse=True)
def _inside(tmp_path, monkeypatch):
    """Relative paths (a default results/, a cache) would land in tmp_path, and be seen."""
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ case builders
def scen(text: str, *extra, cmd: str = "run", files: dict | None = None):
    """Write `text` as s.yaml (and `files`), then run `cmd s.yaml --out res extra...`."""
    def setup(tmp: Path) -> list:
        (tmp / "s.yaml").write_text(textwrap.dedent(text))
        for name, body in (files or {}).items():
            target = tmp / name
            if isinstance(body, bytes):
                target.write_bytes(body)
            elif callable(body):
                body(target)
            else:
                target.write_text(body)
        out = ["--out", tmp / "res"] if cmd in ("run", "sweep", "capacity") else []
        return [cmd, tmp / "s.yaml", *out, *extra]
    return setup


def edit(old: str, new: str, *extra, base: str = GOOD, **kw):
    assert old in base, old
    return scen(base.replace(old, new), *extra, **kw)


def sets(*overrides: str, cmd: str = "run", base: str = GOOD):
    return scen(base, *[a for o in overrides for a in ("--set", o)], cmd=cmd)


def raw(data: bytes, *extra, cmd: str = "run"):
    def setup(tmp: Path) -> list:
        (tmp / "s.yaml").write_bytes(data)
        return [cmd, tmp / "s.yaml", "--out", tmp / "res", *extra]
    return setup


def path_case(make, cmd: str = "run"):
    """The scenario argument is a special path made by `make(tmp) -> path`."""
    def setup(tmp: Path) -> list:
        return [cmd, make(tmp), "--out", tmp / "res"]
    return setup


def on_repo(path: str, *extra, cmd: str = "run"):
    def setup(tmp: Path) -> list:
        return [cmd, path, "--out", tmp / "res", "--no-report", *extra]
    return setup


def fifo(name: str):
    def make(tmp: Path) -> Path:
        os.mkfifo(tmp / name)
        return tmp / name
    return make


def folder(name: str):
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        return tmp / name
    return make


def sparse(size: int):
    def make(target: Path) -> None:
        with open(target, "wb") as f:
            f.truncate(size)
    return make


def made(name: str, make):
    """A path maker: `make(tmp / name)`, then that path."""
    def at(tmp: Path) -> Path:
        make(tmp / name)
        return tmp / name
    return at


def mkfifo(target: Path) -> None:
    os.mkfifo(target)


def mkdir(target: Path) -> None:
    target.mkdir()


def deep(n: int) -> str:
    return "[" * n + "]" * n


BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))
BOMB = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + BOMB


def trace(rows: str, *extra):
    return scen(TRACED, *extra, files={"t.csv": TRACE_HEAD + rows})


def manifest_case(body, name: str = "m.json"):
    """The back stage reads a cost table whose manifest is `body` (text, bytes or maker)."""
    text = GOOD.replace("service: {kind: lognormal, mean_ms: 3, cv: 0.5}",
                        f"service: {{kind: table, table: {name}, phase: full_forward}}")
    return scen(text, files={name: body})


SWEEP = "base: s.yaml\ngrid:\n  workload.rate_qps: [100, 200]\n"


def sweep_file(text: str | bytes, *extra):
    def setup(tmp: Path) -> list:
        (tmp / "s.yaml").write_text(GOOD)
        f = tmp / "sw.yaml"
        f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
        return ["sweep", f, "--out", tmp / "res", "--executor", "serial", "--no-report", *extra]
    return setup


def sweep_cli(*extra):
    return scen(GOOD, "--executor", "serial", "--no-report", *extra, cmd="sweep")


def capacity(*extra):
    return scen(GOOD, "--no-report", *extra, cmd="capacity")


# ------------------------------------------------------------------ class 2: tracebacks
CLASS2 = {
    "utf16_bom": raw(GOOD.encode("utf-16")),
    "utf16_be": raw(b"\xfe\xff" + GOOD.encode("utf-16-be")),
    "utf16_no_bom": raw(GOOD.encode("utf-16-le")),
    "utf32": raw(GOOD.encode("utf-32")),
    "latin1": raw(GOOD.replace("tiny", "t\xefny").encode("latin-1")),
    "binary": raw(bytes(range(256)) * 4),
    "nul_bytes": raw(GOOD.encode() + b"\x00\x00"),
    "empty_file": raw(b""),
    "only_comment": raw(b"# nothing here\n"),
    "list_document": raw(b"- a\n- b\n"),
    "scalar_document": raw(b"just words\n"),
    "two_documents": raw(GOOD.encode() + b"---\n" + GOOD.encode()),
    "bad_indent": raw(b"name: x\n  workload: 1\n bad: [\n"),
    "tab_indent": raw(b"name: x\nworkload:\n\trate_qps: 1\n"),
    "nested_3000_lists": raw(f"name: x\nextra: {deep(3000)}\n".encode()),
    "nested_100_mappings": raw(("name: x\nd: " + "{a: " * 100 + "1" + "}" * 100 + "\n").encode()),
    "nested_70_in_description": raw(f"name: x\ndescription: {deep(70)}\n".encode()),
    "alias_bomb": raw((BOMB + GOOD).encode()),
    "recursive_alias": raw(b"name: &a [*a]\n"),
    "huge_integer": raw(GOOD.replace("requests: 2000", "requests: " + "9" * 5000).encode()),
    "bad_date": raw(GOOD.replace("name: tiny", "name: 2024-13-45").encode()),
    "python_tag": raw(GOOD.replace("name: tiny", "name: !!python/object/apply:os.system [ls]").encode()),
    "unhashable_key": raw(b"? [a, b]\n: 1\n"),
    "stages_list": edit("stages:\n  front:", "stages: [a]\nxstages:\n  front:"),
    "stages_scalar": scen("name: x\nworkload: {rate_qps: 1}\nstages: 5\nslo: {p99_ms: 1}\n"
                          "run: {requests: 10}\n"),
    "stage_scalar": scen("name: x\nworkload: {rate_qps: 1}\nstages: {a: 5}\nslo: {p99_ms: 1}\n"
                         "run: {requests: 10}\n"),
    "service_scalar": scen("name: x\nworkload: {rate_qps: 1}\nstages: {a: {service: 5}}\n"
                           "slo: {p99_ms: 1}\nrun: {requests: 10}\n"),
    "workload_scalar": edit("workload:\n  rate_qps: 200", "workload: 5"),
    "arrivals_scalar": edit("  rate_qps: 200", "  rate_qps: 200\n  arrivals: 5"),
    "trace_path_number": edit("  rate_qps: 200", "  arrivals: {kind: trace, path: 5}"),
    "trace_path_empty": edit("  rate_qps: 200", "  arrivals: {kind: trace, path: ''}"),
    "int_key": raw(GOOD.replace("slo:", "1: 2\nslo:").encode()),
    "null_name": edit("name: tiny", "name:"),
    "name_newline": edit("name: tiny", 'name: "a\\nb"'),
    "stage_name_dollar": edit("  back:", "  $back$:"),
    "stage_name_dot": edit("  back:", "  a.b:"),
    "scenario_is_folder": path_case(folder("d.yaml")),
    "scenario_is_fifo": path_case(fifo("f.yaml")),
    "scenario_dev_zero": path_case(lambda tmp: Path("/dev/zero")),
    "scenario_dev_null": path_case(lambda tmp: Path("/dev/null")),
    "scenario_missing": path_case(lambda tmp: tmp / "missing.yaml"),
    "scenario_too_large": path_case(made("big.yaml", sparse(9 * 2**20))),
    "validate_fifo": path_case(fifo("v.yaml"), cmd="validate"),
    "validate_utf16": raw(GOOD.encode("utf-16"), cmd="validate"),
    "sweep_scenario_fifo": path_case(fifo("sw.yaml"), cmd="sweep"),
    "sweep_scenario_folder": path_case(folder("sw.yaml"), cmd="sweep"),
    "capacity_scenario_utf16": raw(GOOD.encode("utf-16"), cmd="capacity"),
    # traces
    "trace_missing": scen(TRACED),
    "trace_folder": scen(TRACED, files={"t.csv": mkdir}),
    "trace_fifo": scen(TRACED, files={"t.csv": mkfifo}),
    "trace_dev_zero": edit("  rate_qps: 200", "  arrivals: {kind: trace, path: /dev/zero}"),
    "trace_sparse_500mb": scen(TRACED, files={"t.csv": sparse(500 * 2**20)}),
    "trace_utf16": scen(TRACED, files={"t.csv": (TRACE_HEAD + "0,1,2,3\n").encode("utf-16")}),
    "trace_binary": scen(TRACED, files={"t.csv": b"\x89PNG\r\n\x1a\n" + bytes(200)}),
    "trace_latin1": scen(TRACED, files={"t.csv": (TRACE_HEAD + "0,1,2,3\n\xe9,1,2,3\n").encode("latin-1")}),
    "trace_parquet_not_parquet": scen(TRACED.replace("t.csv", "t.parquet"),
                                      files={"t.parquet": TRACE_HEAD + "0,1,2,3\n"}),
    "trace_empty_file": scen(TRACED, files={"t.csv": ""}),
    "trace_header_only": trace(""),
    "trace_missing_column": scen(TRACED, files={"t.csv": "arrival_ms,user_id\n0,1\n"}),
    "trace_text_cell": trace("0,1,2,3\n1,x,2,3\n"),
    "trace_negative_time": trace("0,1,2,3\n-1,1,2,3\n"),
    "trace_decreasing": trace("5,1,2,3\n1,1,2,3\n"),
    "trace_fraction_user": trace("0,1.5,2,3\n"),
    "trace_zero_history": trace("0,1,0,3\n"),
    # cost-table manifests
    "manifest_folder": manifest_case(mkdir),
    "manifest_fifo": manifest_case(mkfifo),
    "manifest_utf16": manifest_case('{"format_version": 1}'.encode("utf-16")),
    "manifest_invalid_json": manifest_case("{not json"),
    "manifest_duplicate_key": manifest_case('{"format_version": 1, "format_version": 1}'),
    "manifest_deep": manifest_case("[" * 100_000 + "]" * 100_000),
    "manifest_wrong_fields": manifest_case('{"format_version": 2}'),
    "table_missing": edit("service: {kind: lognormal, mean_ms: 3, cv: 0.5}",
                          "service: {kind: table, table: nothere/, phase: full_forward}"),
    # flags
    "workers_negative": sweep_cli("--grid", "workload.rate_qps=100,200", "--workers", "-1"),
    "workers_zero": sweep_cli("--grid", "workload.rate_qps=100,200", "--workers", "0"),
    "workers_text": sweep_cli("--grid", "workload.rate_qps=100,200", "--workers", "many"),
    "cache_is_file": lambda tmp: [*scen(GOOD, files={"c.json": "{}"}, cmd="sweep")(tmp), "--grid",
                                  "workload.rate_qps=100,200", "--executor", "serial",
                                  "--cache", tmp / "c.json"],
    "executor_unknown": sweep_cli("--grid", "workload.rate_qps=100", "--executor", "warp"),
    "seed_negative": scen(GOOD, "--seed", "-1"),
    "seed_text": scen(GOOD, "--seed", "abc"),
    "seed_huge": scen(GOOD, "--seed", str(10**30)),
    "unknown_flag": scen(GOOD, "--bogus"),
    "set_no_equals": sets("workload.rate_qps"),
    "set_empty_segment": sets("workload..rate_qps=1"),
    "set_through_scalar": sets("name.x=1"),
    "set_path_too_deep": sets("workload." + "a." * 100 + "b=1"),
    "set_deep_value": sets("description=" + deep(3000)),
    "set_alias_bomb": sets("description={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                           "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                           "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], f: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]}"),
    # sweep files
    "sweep_utf16": sweep_file(SWEEP.encode("utf-16")),
    "sweep_binary": sweep_file(bytes(range(256))),
    "sweep_deep": sweep_file(SWEEP + f"set: {{description: {deep(3000)}}}\n"),
    "sweep_alias_bomb": sweep_file(BOMB + SWEEP),
    "sweep_grid_not_list": sweep_file("base: s.yaml\ngrid: {workload.rate_qps: 5}\n"),
    "sweep_grid_empty": sweep_file("base: s.yaml\ngrid: {workload.rate_qps: []}\n"),
    "sweep_variants_list": sweep_file(SWEEP + "variants: [a, b]\n"),
    "sweep_base_missing": sweep_file("base: nothere.yaml\n"),
    "sweep_base_folder": sweep_file("base: .\n"),
    "sweep_base_empty": sweep_file("base: ''\ngrid: {workload.rate_qps: [1]}\n"),
    "sweep_base_number": sweep_file("base: 5\n"),
    "sweep_unknown_key": sweep_file(SWEEP + "colour: blue\n"),
    "sweep_grid_bad_value": sweep_file("base: s.yaml\ngrid: {workload.rate_qps: [100, fast]}\n"),
    "sweep_too_many_points": sweep_file("base: s.yaml\ngrid:\n  workload.rate_qps: " +
                                        str(list(range(1, 201))) + "\n  run.seed: " +
                                        str(list(range(1, 101))) + "\n"),
    "variant_empty_name": sweep_cli("--variant", ":stages.back.nodes.count=2"),
    "variant_no_colon": sweep_cli("--variant", "stages.back.nodes.count=2"),
    "grid_no_equals": sweep_cli("--grid", "workload.rate_qps"),
}

# ------------------------------------------------------------------ class 3: inf, NaN, sizes
CLASS3 = {
    "duration_inf": edit("  requests: 2000", "  duration_s: .inf"),
    "duration_nan": edit("  requests: 2000", "  duration_s: .nan"),
    "duration_huge": edit("  requests: 2000", "  duration_s: 1.0e12"),
    "rate_inf_yaml": edit("rate_qps: 200", "rate_qps: .inf"),
    "rate_inf_set": sets("workload.rate_qps=inf"),
    "rate_plus_inf_set": sets("workload.rate_qps=+inf"),
    "rate_nan_set": sets("workload.rate_qps=nan"),
    "rate_1e308": edit("rate_qps: 200", "rate_qps: 1e308"),
    "rate_1e308_set": sets("workload.rate_qps=1e308"),
    "rate_huge_negative": sets("workload.rate_qps=-1e308"),
    "diurnal_phase_nan": edit("  rate_qps: 200", "  rate_qps: 200\n  arrivals: {kind: diurnal, phase_s: .nan}"),
    "diurnal_period_inf": edit("  rate_qps: 200", "  rate_qps: 200\n  arrivals: {kind: diurnal, period_s: .inf}"),
    "burst_factor_inf": edit("  rate_qps: 200", "  rate_qps: 200\n  arrivals: {kind: burst, burst_factor: .inf}"),
    "piecewise_factor_nan": edit("  rate_qps: 200", "  rate_qps: 200\n  arrivals: {kind: piecewise, "
                                 "steps: [{start_s: 0, factor: .nan}]}"),
    "sessions_gap_inf": sets("workload.users.sessions.mean_gap_s=inf"),
    "sessions_requests_inf": sets("workload.users.sessions.mean_requests=inf"),
    "sessions_requests_huge": sets("workload.users.sessions.mean_requests=1e9"),
    "users_count_1e12": sets("workload.users.count=1e12"),
    "users_count_1e9_memory": sets("workload.users.count=1e9", "run.replications=1"),
    "requests_1e12": sets("run.requests=1e12"),
    "requests_1e9_memory": sets("run.requests=1e9"),
    "rate_times_duration_memory": sets("run.requests=null", "run.duration_s=1e7", "workload.rate_qps=1e7"),
    "nodes_1e7": sets("stages.front.nodes.count=1e7"),
    "sample_interval_1e-6": sets("run.sample_interval_ms=1e-6"),
    "sample_interval_nan": sets("run.sample_interval_ms=nan"),
    "virtual_nodes_1e9": sets("stages.front.affinity.virtual_nodes=1e9", "stages.front.router=affinity"),
    "replications_1e9": sets("run.replications=1e9", "run.max_replications=1e9"),
    "slo_inf": edit("  p99_ms: 50", "  p99_ms: .inf"),
    "stage_slo_nan": edit("  p99_ms: 50", "  p99_ms: 50\n  stage_p99_ms: {back: .nan}"),
    "hop_nan": edit("    hop_ms: 0.5", "    hop_ms: .nan"),
    "hop_huge": edit("    hop_ms: 0.5", "    hop_ms: 1.0e300"),
    "service_mean_inf": edit("mean_ms: 2}", "mean_ms: .inf}"),
    "service_cv_huge": edit("cv: 0.5}", "cv: 1.0e6}"),
    "empirical_nan": edit("service: {kind: exponential, mean_ms: 2}",
                          "service: {kind: empirical, samples_ms: [1, .nan]}"),
    "history_value_1e300": sets("workload.users.history_len={kind: constant, value: 1e300}"),
    "history_weights_inf": sets("workload.users.history_len={kind: empirical, values: [1, 2], "
                                "weights: [1, .inf]}"),
    "candidates_huge": sets("stages.back.candidates=1e12"),
    "batch_huge": sets("stages.back.batch.max_size=1e9"),
    "device_tflops_inf": edit("slo:", "devices:\n  x: {name: x, hbm_bytes: 1000, peak_tflops: .inf, "
                              "hbm_gbps: 1, host_link_gbps: 1, launch_overhead_us: 1, "
                              "host_dram_bytes: 1000}\nslo:"),
    "device_hbm_1e30": edit("slo:", "devices:\n  x: {name: x, hbm_bytes: 1000000000000000000000000000000, "
                            "peak_tflops: 1, hbm_gbps: 1, host_link_gbps: 1, launch_overhead_us: 1, "
                            "host_dram_bytes: 1000}\nslo:"),
    "interference_rate_inf": edit("    hop_ms: 0.5", "    hop_ms: 0.5\n    interference: {rate_per_min: .inf, "
                                  "duration_s: {kind: constant, value: 1}, slowdown: {kind: constant, value: 2}}"),
    "interference_slowdown_nan": edit("    hop_ms: 0.5", "    hop_ms: 0.5\n    interference: {rate_per_min: 1, "
                                      "duration_s: {kind: constant, value: 1}, "
                                      "slowdown: {kind: constant, value: .nan}}"),
    "seed_inf_set": sets("run.seed=inf"),
    "warmup_nan": edit("  requests: 2000", "  requests: 2000\n  warmup_s: .nan"),
    "trace_user_1e20": trace("0,100000000000000000000,2,3\n1,1,2,3\n"),
    "trace_history_1e20": trace("0,1,100000000000000000000,3\n1,1,2,3\n"),
    "trace_candidates_1e20": trace("0,1,2,1e20\n1,1,2,3\n"),
    "trace_arrival_inf": trace("0,1,2,3\ninf,1,2,3\n"),
    "trace_arrival_nan": trace("0,1,2,3\nnan,1,2,3\n"),
    "trace_arrival_1e300": trace("0,1,2,3\n1e300,1,2,3\n"),
    "trace_all_at_zero": trace("".join(f"0,{i},100,10\n" for i in range(300))),
    "trace_nothing_before_duration": scen(TRACED.replace("  replications: 2", "  replications: 2\n  duration_s: 1"),
                                          files={"t.csv": TRACE_HEAD + "5000,1,2,3\n6000,1,2,3\n"}),
    "capacity_start_inf": capacity("--start", "inf"),
    "capacity_start_nan": capacity("--start", "nan"),
    "capacity_start_negative": capacity("--start", "-1"),
    "capacity_start_zero": capacity("--start", "0"),
    "capacity_slo_inf": capacity("--slo", "inf"),
    "capacity_slo_nan": capacity("--slo", "nan"),
    "capacity_min_inf": capacity("--min-value", "inf"),
    "capacity_max_nan": capacity("--max-value", "nan"),
    "capacity_rel_tol_nan": capacity("--rel-tol", "nan"),
    "sweep_slo_inf": sweep_file(SWEEP + "slo_ms: .inf\n"),
    "sweep_grid_inf": sweep_file("base: s.yaml\ngrid: {workload.rate_qps: [100, .inf]}\n"),
    "grid_nan_cli": sweep_cli("--grid", "workload.rate_qps=100,nan"),
}

# ------------------------------------------------------------------ class 4: nonsense
CLASS4 = {
    "duplicate_top_key": edit("  p99_ms: 50", "  p99_ms: 50\n  p99_ms: 60"),
    "duplicate_section": scen(GOOD + "slo:\n  p99_ms: 10\n"),
    "duplicate_flow_key": edit("{count: 2, device: cpu}", "{count: 2, count: 3, device: cpu}"),
    "duplicate_stage": edit("  back:", "  front:"),
    "duplicate_in_set_value": sets("workload.users.history_len={kind: constant, value: 1, value: 2}"),
    "duplicate_in_sweep_file": sweep_file(SWEEP + "grid: {run.seed: [1, 2]}\n"),
    "warmup_equals_duration": edit("  requests: 2000", "  duration_s: 10\n  warmup_s: 10"),
    "warmup_over_duration": edit("  requests: 2000", "  duration_s: 10\n  warmup_s: 20"),
    "warmup_over_duration_set": sets("run.requests=null", "run.duration_s=5", "run.warmup_s=6"),
    "warmup_over_trace_span": scen(TRACED.replace("  replications: 2", "  replications: 2\n  warmup_s: 10"),
                                   files={"t.csv": TRACE_HEAD + "".join(f"{i},1,2,3\n" for i in range(100))}),
    "rate_true": edit("rate_qps: 200", "rate_qps: true"),
    "rate_yes": edit("rate_qps: 200", "rate_qps: yes"),
    "rate_true_set": sets("workload.rate_qps=true"),
    "count_true": edit("{count: 1, device: h100}", "{count: true, device: h100}"),
    "replications_false": edit("  replications: 2", "  replications: false"),
    "seed_true": edit("  replications: 2", "  replications: 2\n  seed: true"),
    "hop_on": edit("    hop_ms: 0.5", "    hop_ms: on"),
    "name_empty": edit("name: tiny", "name: ''"),
    "name_empty_set": sets("name="),
    "max_evals_zero": capacity("--max-evals", "0"),
    "max_evals_negative": capacity("--max-evals", "-3"),
    "rel_tol_negative": capacity("--rel-tol", "-1"),
    "rel_tol_zero": capacity("--rel-tol", "0"),
    "rel_tol_two": capacity("--rel-tol", "2"),
    "slo_negative": capacity("--slo", "-5"),
    "slo_zero": capacity("--slo", "0"),
    "min_over_max": capacity("--min-value", "10", "--max-value", "5"),
    "min_negative": capacity("--min-value", "-1"),
    "capacity_metric_typo": capacity("--metric", "e2e.p98_ms"),
    "capacity_metric_stage_typo": capacity("--metric", "stages.bakc.p99_ms"),
    "capacity_param_text": capacity("--param", "name"),
    "capacity_param_missing": capacity("--param", "workload.colour"),
    "sweep_metric_typo": sweep_file(SWEEP + "metric: e2e.p98_ms\n"),
    "sweep_metric_relay_without_relay": sweep_file(SWEEP + "metric: relay.prefix_hit_rate\n"),
    "sweep_x_typo": sweep_cli("--grid", "workload.rate_qps=100,200", "--x", "workload.rate"),
    "sweep_x_set_key": sweep_file(SWEEP + "set: {run.seed: 3}\nx: run.seed\n"),
    "sweep_bad_point": sweep_cli("--grid", "stages.back.nodes.count=1,0"),
    "prefix_cache_one_byte": on_repo(RELAY, "--set", "relay.cache.hbm_bytes=1"),
    "prefix_cache_under_longest": on_repo(RELAY, "--set", "relay.cache.hbm_bytes=100000000"),
    "table_on_other_device": on_repo(DEFAULT, "--set", "stages.ranking.nodes.device=ascend910c"),
    "table_on_cpu": on_repo(DEFAULT, "--set", "stages.ranking.nodes.device=cpu"),
    "relay_validate_tiny_cache": on_repo(RELAY, "--set", "relay.cache.hbm_bytes=1", cmd="validate"),
}


def _ids(cases: dict) -> list:
    return [pytest.param(v, id=k) for k, v in cases.items()]


@pytest.mark.parametrize("setup", _ids(CLASS2))
def test_class2_no_traceback_on_input(tmp_path, setup):
    assert_refused(tmp_path, setup(tmp_path))


@pytest.mark.parametrize("setup", _ids(CLASS3))
def test_class3_inf_nan_and_absurd_sizes(tmp_path, setup):
    assert_refused(tmp_path, setup(tmp_path))


@pytest.mark.parametrize("setup", _ids(CLASS4))
def test_class4_nonsense_refused(tmp_path, setup):
    assert_refused(tmp_path, setup(tmp_path))


# ------------------------------------------------------------------ exact messages
def test_messages_name_file_field_and_line(tmp_path):
    s = tmp_path / "s.yaml"
    line = assert_refused(tmp_path, edit("  p99_ms: 50", "  p99_ms: 50\n  p99_ms: 60")(tmp_path))
    assert line == f"{s}:15 slo.p99_ms: duplicate key (also at line 14)"
    line = assert_refused(tmp_path, edit("rate_qps: 200", "rate_qps: true")(tmp_path))
    assert line == f"{s}:3 workload.rate_qps: must be a number, not a boolean (got true)"
    line = assert_refused(tmp_path, edit("rate_qps: 200", "rate_qps: .inf")(tmp_path))
    assert line == f"{s}:3 workload.rate_qps: input should be a finite number (got inf)"
    line = assert_refused(tmp_path, edit("  requests: 2000", "  duration_s: 10\n  warmup_s: 10")(tmp_path))
    assert line.startswith(f"{s}:17 run.warmup_s: must be < run.duration_s (10 s)")
    line = assert_refused(tmp_path, raw(GOOD.encode("utf-16"))(tmp_path))
    assert line == f"{s}: scenario file is UTF-16 text; save it as UTF-8"
    line = assert_refused(tmp_path, raw(GOOD.replace("tiny", "t\xefny").encode("latin-1"))(tmp_path))
    assert line == f"{s}:1: scenario file is not UTF-8 text (byte 0xef); save it as UTF-8"
    line = assert_refused(tmp_path, path_case(fifo("f.yaml"))(tmp_path))
    assert line.endswith("f.yaml: cannot read scenario file: not a regular file (a FIFO, socket or device)")
    line = assert_refused(tmp_path, sets("run.sample_interval_ms=1e-6")(tmp_path))
    assert line.startswith("--set run.sample_interval_ms: 1e-06 ms over a 10 s run gives")
    line = assert_refused(tmp_path, capacity("--max-evals", "0")(tmp_path))
    assert line.startswith("error: ") and "--max-evals" in line
    line = assert_refused(tmp_path, capacity("--rel-tol", "-1")(tmp_path))
    assert line == "--rel-tol: must be in (0, 1) (got -1.0)"


def test_metric_names_match_what_runs_report():
    """sweep.metric_names (checked before a sweep runs) lists exactly the flat metrics."""
    import simrec
    from simrec.results import flat_metrics
    from simrec.sweep import metric_names
    for path in (REPO / "scenarios" / "mmc.yaml", REPO / "scenarios" / "helm.yaml"):
        sc = simrec.load_scenario(path, ["run.requests=200", "run.duration_s=null",
                                         "run.replications=2", "run.warmup_s=0"])
        got = {k for k in flat_metrics(simrec.simulate(sc).summary) if not k.endswith(("_lo", "_hi"))}
        assert got == metric_names(sc)


def test_count_of_bad_inputs():
    assert len(CLASS2) + len(CLASS3) + len(CLASS4) >= 150


def test_stopping_rule_that_misses_its_target_warns(tmp_path):
    (tmp_path / "s.yaml").write_text(GOOD)
    r = CliRunner().invoke(app, ["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "res"),
                                 "--no-report", "--set", "run.requests=300",
                                 "--set", "run.p99_halfwidth_rel=0.0001", "--set", "run.max_replications=3"])
    assert r.exit_code == 0, r.stderr
    assert "run.p99_halfwidth_rel: stopped at max_replications (3)" in r.stderr
