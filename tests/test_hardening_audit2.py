"""Issue 14, the second audit: hostile inputs the first suites do not list, on the newer
surfaces (run's pool flags, compare, regime, fit and fidelity with serving logs and
profiles, calibrate --model, list/init/schema/report, kernels, history_store,
interference, relay and hbm sizes, odd names and paths, a full stdout).

Every case must end in exit status 1, exactly one line on stderr that says where (the
file, flag or field, and the expected part of it), no traceback and no "internal error",
the user's files untouched and nothing new on disk (no results, no temp folder, no cache).
Every case here passes; the fixes live in the modules that own each mechanism.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import snapshot
from simrec.cli import app
from test_cli import GOOD                                   # the small valid two-stage scenario
from test_hardening_inputs import BOMB, _inside, deep       # noqa: F401 (_inside: autouse, cwd = tmp_path)
from test_hardening_signals import MAIN                      # `simrec` in a subprocess
from test_serving_log import RUN, jobs_frame, make_log       # a valid tiny serving log

REPO = Path(__file__).resolve().parent.parent
SCEN = REPO / "scenarios"
REAL_LOG = REPO / "calibration" / "testbed_runs" / "eager" / "full_u30"
KERNEL_GRID = REPO / "calibration" / "kernel_grids" / "h200_kernel_grid"
TESTBED_TABLE = REPO / "calibration" / "testbed_runs" / "eager" / "h100_testbed_a"
ONE = GOOD.replace("  requests: 2000\n", "  requests: 300\n")        # quicker where a run happens


def refused(tmp_path: Path, args: list, expect: str = "") -> str:
    """Run the CLI; exit 1, one stderr line naming where (and holding `expect`), nothing changed."""
    before = snapshot(tmp_path)
    r = CliRunner().invoke(app, [str(a) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1, (r.exit_code, r.output, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output + r.stderr and "internal error" not in r.stderr, r.stderr
    assert ": " in lines[0], lines[0]                     # "<where>: <what>"
    assert expect in lines[0], (expect, lines[0])
    assert snapshot(tmp_path) == before                   # untouched, nothing left behind
    return lines[0]


def case(setup, expect: str = ""):
    return pytest.param(setup, expect)


def run_ids(cases: dict) -> list:
    return [pytest.param(*c.values, marks=c.marks, id=k) for k, c in cases.items()]


# ------------------------------------------------------------------ shared makers
def put(tmp: Path, files: dict) -> None:
    """name -> text, bytes, or a maker called with the path."""
    for name, body in files.items():
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(body):
            body(p)
        elif isinstance(body, bytes):
            p.write_bytes(body)
        else:
            p.write_text(body)


def cli(*args, files: dict | None = None, scenario: str = ONE):
    """s.yaml (and `files`) in the test folder, then the command; an argument may be a
    callable of that folder (for its paths)."""
    def setup(tmp: Path) -> list:
        (tmp / "s.yaml").write_text(scenario)
        put(tmp, files or {})
        return [a(tmp) if callable(a) else a for a in args]
    return setup


def at(name: str):
    return lambda tmp: tmp / name


def mkfifo(p: Path) -> None:
    os.mkfifo(p)


def mkdir(p: Path) -> None:
    p.mkdir()


def link_to(target: str):
    return lambda p: os.symlink(p.parent / target, p)


def sparse(size: int):
    def make(p: Path) -> None:
        with open(p, "wb") as f:
            f.truncate(size)
    return make


# ------------------------------------------------------------------ results folders
@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """A run, a second run, a sweep and a capacity search (small), made once."""
    root = tmp_path_factory.mktemp("made")
    (root / "s.yaml").write_text(ONE)
    base = ["--no-report", "--executor", "serial"]
    for args in (["run", root / "s.yaml", "--out", root / "run1", *base],
                 ["run", root / "s.yaml", "--out", root / "run2", "--seed", "3", *base],
                 ["sweep", root / "s.yaml", "--grid", "run.seed=1,2", "--out", root / "sweep", *base],
                 ["capacity", root / "s.yaml", "--max-evals", "2", "--out", root / "cap", "--no-report",
                  "--cache", root / "cache"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.stderr
    return root


def copy(which: str, edit=None):
    """A maker: a copy of a made folder, then `edit(folder)`."""
    def make(p: Path) -> None:
        shutil.copytree(Path(os.environ["SIMREC_AUDIT_MADE"]) / which, p)
        if edit:
            edit(p)
    return make


def json_edit(file: str, fn):
    def edit(folder: Path) -> None:
        data = json.loads((folder / file).read_text())
        out = fn(data)
        (folder / file).write_text(out if isinstance(out, str) else json.dumps(data if out is None else out))
    return edit


@pytest.fixture(autouse=True)
def _made_env(made, monkeypatch):
    monkeypatch.setenv("SIMREC_AUDIT_MADE", str(made))


def compare(*folders, out: str = "cmp", files: dict | None = None):
    """Folders (name, maker) made in the test folder, then `compare ... --out out`."""
    def setup(tmp: Path) -> list:
        put(tmp, files or {})
        names = []
        for f in folders:
            if isinstance(f, tuple):
                put(tmp, {f[0]: f[1]})
                names.append(tmp / f[0])
            else:
                names.append(tmp / f)
        return ["compare", *names, "--out", tmp / out]
    return setup


RUN1, RUN2 = ("a", copy("run1")), ("b", copy("run2"))


def run_metric(fn):
    return ("b", copy("run2", json_edit("summary.json", fn)))


def set_e2e_p99(value: dict):
    def fn(d):
        d["metrics"]["e2e"]["p99_ms"] = value
    return fn


COMPARE = {
    "one_run_only": case(compare(RUN1), "nothing to compare"),
    "missing_folder": case(compare(RUN1, "nope"), "nope: no such results folder"),
    "a_file": case(compare(RUN1, ("f.txt", "x")), "f.txt"),
    "empty_folder": case(compare(RUN1, ("e", mkdir)), "not a results folder"),
    "serving_log_folder": case(compare(RUN1, ("log", lambda p: shutil.copytree(REAL_LOG, p))),
                               "not a results folder"),
    "summary_truncated": case(compare(RUN1, run_metric(lambda d: json.dumps(d)[:100])), "summary.json:1"),
    "summary_a_list": case(compare(RUN1, run_metric(lambda d: [1, 2])), "expected a JSON object"),
    "summary_metrics_a_list": case(compare(RUN1, run_metric(lambda d: {**d, "metrics": []})), "'metrics'"),
    "summary_metric_mean_text": case(compare(RUN1, run_metric(set_e2e_p99(
        {"mean": "x", "lo": 1, "hi": 2, "replications": [1, 2]}))), "metrics.e2e.p99_ms"),
    "summary_replications_number": case(compare(RUN1, run_metric(set_e2e_p99(
        {"mean": 1, "lo": 1, "hi": 2, "replications": 5}))), "metrics.e2e.p99_ms"),
    "summary_slo_text": case(compare(RUN1, run_metric(lambda d: d["scenario"].update(slo="x"))), "b: "),
    "summary_warnings_number": case(compare(RUN1, run_metric(lambda d: d.update(warnings=5))), "b: "),
    "summary_stages_number": case(compare(RUN1, run_metric(lambda d: d["scenario"].update(stages=5))), "b: "),
    "summary_no_slo": case(compare(RUN1, run_metric(lambda d: d.update(scenario={}))), "'slo'"),
    "summary_utf16": case(compare(RUN1, ("b", copy("run2", lambda f: (f / "summary.json").write_bytes(
        (f / "summary.json").read_text().encode("utf-16"))))), "summary.json"),
    "summary_is_a_folder": case(compare(RUN1, ("b", copy("run2", lambda f: (
        (f / "summary.json").unlink(), (f / "summary.json").mkdir())))), "not a results folder"),
    "summary_is_a_fifo": case(compare(RUN1, ("b", copy("run2", lambda f: (
        (f / "summary.json").unlink(), os.mkfifo(f / "summary.json"))))), "not a results folder"),
    "run_requests_missing": case(compare(RUN1, ("b", copy("run2", lambda f: (f / "requests.parquet").unlink()))),
                                 "missing requests.parquet"),
    "run_requests_corrupt": case(compare(RUN1, ("b", copy("run2", lambda f: (f / "requests.parquet").write_bytes(
        b"garbage")))), "requests.parquet: not a readable Parquet file"),
    "sweep_json_truncated": case(compare(RUN1, ("b", copy("sweep", json_edit("sweep.json",
                                                                             lambda d: json.dumps(d)[:50])))),
                                 "sweep.json:1"),
    "sweep_points_missing": case(compare(RUN1, ("b", copy("sweep", lambda f: (f / "points.parquet").unlink()))),
                                 "missing points.parquet"),
    "sweep_points_csv": case(compare(RUN1, ("b", copy("sweep", lambda f: (f / "points.parquet").write_text(
        "a,b\n1,2\n")))), "points.parquet"),
    "sweep_base_a_list": case(compare(RUN1, ("b", copy("sweep", json_edit("sweep.json",
                                                                          lambda d: d.update(base=[1]))))),
                              "b: "),
    "capacity_json_null": case(compare(RUN1, ("b", copy("cap", json_edit("capacity.json", lambda d: "null")))),
                               "capacity.json: expected a JSON object"),
    "capacity_points_missing": case(compare(RUN1, ("b", copy("cap", lambda f: (f / "points.parquet").unlink()))),
                                    "missing points.parquet"),
    "out_is_an_input": case(compare(RUN1, RUN2, out="a"), "is (or holds) the folder being compared"),
    "out_inside_an_input": case(compare(RUN1, RUN2, out="a/sub"), "is inside the results folder"),
    "out_holds_the_inputs": case(compare(("x/a", copy("run1")), ("x/b", copy("run2")), out="x"),
                                 "is (or holds) the folder being compared"),
    "out_is_a_file": case(compare(RUN1, RUN2, out="n.txt", files={"n.txt": "mine"}), "not a folder"),
    "out_links_to_an_input": case(compare(RUN1, RUN2, out="l", files={"l": link_to("a")}),
                                  "is (or holds) the folder being compared"),
    "input_symlink_loop": case(compare(RUN1, ("loop", link_to("loop"))), "loop: no such results folder"),
}


# ------------------------------------------------------------------ run, sweep, capacity: flags and paths
def run(*extra, out=at("res"), scenario: str = ONE, files: dict | None = None):
    return cli("run", at("s.yaml"), "--out", out, "--no-report", "--executor", "serial", *extra,
               files=files, scenario=scenario)


def sets(*overrides: str):
    return run(*[a for o in overrides for a in ("--set", o)])


AFFINITY = ONE.replace("{count: 2, device: cpu}", "{count: 4, device: cpu}\n    router: affinity")
SWEEP_FILE = "base: s.yaml\ngrid: {run.seed: [1, 2]}\n"
SERVING_LOG = {"log": lambda p: shutil.copytree(REAL_LOG, p)}

RUN_FLAGS = {
    "executor_empty": case(cli("run", at("s.yaml"), "--out", at("res"), "--executor", ""), "--executor"),
    "executor_upper_case": case(cli("run", at("s.yaml"), "--out", at("res"), "--executor", "LOCAL"), "--executor"),
    "workers_fraction": case(run("--workers", "1.5"), "--workers"),
    "workers_over_4096": case(run("--workers", "4097"), "--workers"),
    "shards_text": case(run("--shards", "two"), "--shards"),
    "shards_over_4096": case(run("--shards", "100000", scenario=AFFINITY), "--shards"),
    "shards_without_affinity": case(run("--shards", "2"), "--shards: cannot shard"),
    "shards_over_nodes": case(run("--shards", "8", scenario=AFFINITY), "fewer than the 8 shards"),
    "shards_round_robin_stage": case(run("--shards", "2", scenario=AFFINITY), "--shards: cannot shard"),
    "seed_fraction": case(run("--seed", "1.5"), "--seed"),
    "seed_2_64": case(run("--seed", str(2**64)), "run.seed"),
    "set_equals_only": case(sets("="), "--set"),
    "set_trailing_dot": case(sets("workload.=1"), "empty path segment"),
    "set_leading_dot": case(sets(".workload.rate_qps=1"), "empty path segment"),
    "set_unicode_key_typo": case(sets("stagés.front.nodes.count=2"), "did you mean 'stages'"),
    "set_newline_in_number": case(sets("workload.rate_qps=1\n2"), "--set workload.rate_qps"),
    "set_nul_in_name": case(sets("name=a\x00b"), "--set name"),
    "set_stages_empty": case(sets("stages={}"), "--set stages"),
    "set_workload_null": case(sets("workload=null"), "--set workload"),
    "set_unclosed_flow": case(sets("workload={rate_qps: 1"), "--set workload"),
    "set_count_fraction": case(sets("stages.front.nodes.count=2.5"), "--set stages.front.nodes.count"),
    "set_name_spaces": case(sets("name=   "), "--set name"),
    "set_name_100k": case(sets("name=" + "x" * 100_000), "at most 200 characters"),
    "set_3000_then_bad": case(run(*[a for i in range(3000) for a in ("--set", f"run.seed={i}")],
                                  "--set", "run.seed=-1"), "--set run.seed"),
    "run_a_sweep_file": case(cli("run", at("sw.yaml"), "--out", at("res"), files={"sw.yaml": SWEEP_FILE}),
                             "sw.yaml:1 base: is a sweep file"),
    "validate_a_sweep_file": case(cli("validate", at("sw.yaml"), files={"sw.yaml": SWEEP_FILE}),
                                  "sw.yaml:1 base: is a sweep file"),
    "capacity_a_sweep_file": case(cli("capacity", at("sw.yaml"), "--out", at("res"), files={"sw.yaml": SWEEP_FILE}),
                                  "sw.yaml:1 base: is a sweep file"),
    "run_a_results_folder": case(cli("run", at("r"), "--out", at("res"), files={"r": copy("run1")}),
                                 "it is a folder"),
    "run_a_parquet_file": case(cli("run", at("r/requests.parquet"), "--out", at("res"),
                                   files={"r": copy("run1")}), "requests.parquet:1"),
    "run_name_too_long": case(cli("run", "a" * 5000, "--out", at("res")), "File name too long"),
    "run_unknown_user_home": case(cli("run", "~nonexistentuser/s.yaml", "--out", at("res")),
                                  "~nonexistentuser/s.yaml"),
    "out_name_too_long": case(run(out=lambda t: t / ("o" * 300)), "o" * 50),
    "out_path_too_long": case(run(out=lambda t: t / "/".join(["d" * 250] * 20)), "d" * 50),
    "out_inside_a_run": case(run(out=at("r/inner"), files={"r": copy("run1")}), "is inside the results folder"),
    "out_inside_a_sweep": case(run(out=at("sw/x/y"), files={"sw": copy("sweep")}), "is inside the results folder"),
    "out_is_a_serving_log": case(run(out=at("log"), files=SERVING_LOG), "log: exists and is not"),
    "sweep_out_is_a_serving_log": case(cli("sweep", at("s.yaml"), "--grid", "run.seed=1,2", "--executor", "serial",
                                           "--no-report", "--out", at("log"), files=SERVING_LOG),
                                       "log: exists and is not"),
    "capacity_out_is_a_serving_log": case(cli("capacity", at("s.yaml"), "--max-evals", "2", "--no-report",
                                              "--out", at("log"), files=SERVING_LOG), "log: exists and is not"),
}


def sweep(text: str, *extra):
    return cli("sweep", at("sw.yaml"), "--out", at("res"), "--executor", "serial", "--no-report", *extra,
               files={"sw.yaml": text})


def sweep_cli(*extra):
    return cli("sweep", at("s.yaml"), "--out", at("res"), "--executor", "serial", "--no-report", *extra)


B = "base: s.yaml\n"
SWEEPS = {
    "base_is_itself": case(sweep("base: sw.yaml\ngrid: {run.seed: [1, 2]}\n"), "sw.yaml:1 base: is a sweep file"),
    "base_is_a_sweep": case(cli("sweep", at("sw.yaml"), "--out", at("res"), "--executor", "serial",
                                files={"sw2.yaml": SWEEP_FILE, "sw.yaml": "base: sw2.yaml\n"}),
                            "sw2.yaml:1 base: is a sweep file"),
    "variant_value_a_list": case(sweep(B + "variants: {a: [1, 2]}\n"), "variants.a"),
    "variant_unknown_stage": case(sweep(B + "variants: {a: {stages.nosuch.nodes.count: 2}}\n"), "variant 'a'"),
    "variant_empty_name": case(sweep(B + "variants: {'': {run.seed: 2}}\n"), "variants."),
    "grid_empty_key": case(sweep(B + "grid: {'': [1, 2]}\n"), "unknown key ''"),
    "grid_unknown_key": case(sweep(B + "grid: {workload.colour: [1, 2]}\n"), "workload.colour"),
    "grid_nested_lists": case(sweep(B + "grid: {workload.rate_qps: [[100], [200]]}\n"), "workload.rate_qps"),
    "grid_mapping_and_number": case(sweep(B + "grid: {workload: [{rate_qps: 1}, 5]}\n"), "sweep workload"),
    "metric_a_number": case(sweep(SWEEP_FILE + "metric: 5\n"), "sw.yaml:3 metric"),
    "x_a_list": case(sweep(SWEEP_FILE + "x: [a]\n"), "sw.yaml:3 x"),
    "set_a_list": case(sweep(SWEEP_FILE + "set: [1]\n"), "sw.yaml:3 set"),
    "set_bad_value": case(sweep(SWEEP_FILE + "set: {workload.rate_qps: fast}\n"), "workload.rate_qps"),
    "slo_text": case(sweep(SWEEP_FILE + "slo_ms: soon\n"), "sw.yaml:3 slo_ms"),
    "cli_grid_no_values": case(sweep_cli("--grid", "workload.rate_qps="), "workload.rate_qps"),
    "cli_grid_trailing_comma": case(sweep_cli("--grid", "workload.rate_qps=100,"), "workload.rate_qps"),
    "cli_variant_without_value": case(sweep_cli("--variant", "a:stages.front.nodes.count"), "--set"),
    "cli_variant_twice": case(sweep_cli("--variant", "a:run.seed=2", "--variant", "a:run.seed=3"),
                              "--variant: variant 'a' given twice"),
    "cli_grid_axis_twice": case(sweep_cli("--grid", "run.seed=1,2", "--grid", "run.seed=3,4"),
                                "--grid: axis run.seed given twice"),
    "cli_x_not_on_grid": case(sweep_cli("--grid", "run.seed=1,2", "--x", "workload.rate_qps"), "sweep x"),
    "cache_is_the_out": case(sweep_cli("--grid", "run.seed=1,2", "--cache", at("res")),
                             "must be outside the output folder"),
    "cache_inside_the_out": case(sweep_cli("--grid", "run.seed=1,2", "--cache", at("res/c")),
                                 "must be outside the output folder"),
    "capacity_cache_is_the_out": case(cli("capacity", at("s.yaml"), "--max-evals", "2", "--no-report",
                                          "--out", at("res"), "--cache", at("res")),
                                      "must be outside the output folder"),
    "cache_is_the_scenario": case(sweep_cli("--grid", "run.seed=1,2", "--cache", at("s.yaml")),
                                  "the point cache must be a folder"),
    "cache_under_a_file": case(cli("sweep", at("s.yaml"), "--out", at("res"), "--executor", "serial", "--no-report",
                                   "--grid", "run.seed=1,2", "--cache", at("n.txt/c"), files={"n.txt": "mine"}),
                               "n.txt/c"),
}


# ------------------------------------------------------------------ regime
SWITCH = SCEN / "helm_switch.yaml"


def regime(*extra, scenario: Path | None = SWITCH, files: dict | None = None):
    return cli("regime", scenario if scenario is not None else at("s.yaml"), *extra, files=files)


REGIME = {
    "no_relay_no_hbm": case(regime(scenario=None), "s.yaml hbm: the regime study"),
    "missing_scenario": case(regime(scenario=Path("/nonexistent/s.yaml")), "/nonexistent/s.yaml"),
    "a_sweep_file": case(cli("regime", at("sw.yaml"), files={"sw.yaml": SWEEP_FILE}), "is a sweep file"),
    "static_over_one_after_a_good_one": case(regime("--static", "0.5", "--static", "1.5"), "--static"),
    "static_nan": case(regime("--static", "nan"), "--static"),
    "static_negative": case(regime("--static", "-0.1"), "--static"),
    "start_inf": case(regime("--start", "inf"), "--start"),
    "switch_nan": case(regime("--switch-s", "nan"), "--switch-s"),
    "switch_negative": case(regime("--switch-s", "-5"), "--switch-s"),
    "switch_after_the_end": case(regime("--switch-s", "1000"), "--switch-s"),
    "window_inf": case(regime("--window-s", "inf"), "--window-s"),
    "window_zero": case(regime("--window-s", "0"), "--window-s"),
    "hold_zero": case(regime("--hold", "0"), "--hold"),
    "out_is_a_file": case(regime("--out", at("n.txt"), files={"n.txt": "mine"}), "n.txt: exists and is not a folder"),
    "out_is_a_user_folder": case(regime("--out", at("d"), files={"d/switch.csv": "mine", "d/notes.txt": "x"}),
                                 "d: exists and is not"),
    "out_inside_a_run": case(regime("--out", at("r/s7c"), files={"r": copy("run1")}),
                             "is inside the results folder"),
}


# ------------------------------------------------------------------ fit and fidelity (serving logs)
def log(run: dict | None = None, jobs=None, fmt: str = "parquet", edit=None):
    """A tiny serving log (test_serving_log's) at log/, edited by `edit(folder)`."""
    def make(p: Path) -> None:
        make_log(p, jobs, run, fmt)
        if edit:
            edit(p)
    return make


def run_yaml(text: str):
    return log(edit=lambda f: (f / "run.yaml").write_text(text))


def jobs_file(data: bytes, name: str = "jobs.parquet"):
    return log(edit=lambda f: ((f / "jobs.parquet").unlink(), (f / name).write_bytes(data)))


def real_log(p: Path) -> None:
    """The eager full_u30 testbed log, its table path made absolute (a copy elsewhere)."""
    shutil.copytree(REAL_LOG, p)
    text = (p / "run.yaml").read_text().replace("table: ../h100_testbed_a", f"table: {TESTBED_TABLE}")
    (p / "run.yaml").write_text(text)


def fit(made_log, *extra, out: str = "p.json", files: dict | None = None):
    return cli("fit", at("log"), "--out", at(out), *extra, files={"log": made_log, **(files or {})})


def fidelity(*extra, logs=("log",), files: dict | None = None):
    return cli("fidelity", *[at(x) for x in logs], "--sources", "replay", "--replications", "2",
               "--bootstrap", "100", *extra, files={"log": real_log, **(files or {})})


GOOD_RUN = yaml.safe_dump(RUN, sort_keys=False)
FIT = {
    "run_yaml_a_list": case(fit(run_yaml("- a\n- b\n")), "run.yaml:1"),
    "run_yaml_policy_text": case(fit(run_yaml(GOOD_RUN.replace("policy:\n  kind: relay",
                                                               "policy: relay\nxpolicy:\n  kind: relay"))),
                                 "run.yaml:3 policy"),
    "run_yaml_device_number": case(fit(run_yaml(GOOD_RUN.replace("device: cpu", "device: 5"))), "run.yaml:1 device"),
    "run_yaml_warmup_text": case(fit(run_yaml(GOOD_RUN.replace("warmup_s: 0.0", "warmup_s: soon"))),
                                 "run.yaml:8 warmup_s"),
    "run_yaml_warmup_nan": case(fit(run_yaml(GOOD_RUN.replace("warmup_s: 0.0", "warmup_s: .nan"))),
                                "run.yaml:8 warmup_s"),
    "run_yaml_lead_bool": case(fit(run_yaml(GOOD_RUN.replace("lead_ms: 2.0", "lead_ms: true"))),
                               "run.yaml:7 lead_ms"),
    "run_yaml_duplicate_key": case(fit(run_yaml(GOOD_RUN + "device: gpu\n")), "run.yaml:11 device: duplicate key"),
    "run_yaml_nested_3000": case(fit(run_yaml(GOOD_RUN + f"meta2: {deep(3000)}\n")), "nested too deeply"),
    "run_yaml_alias_bomb": case(fit(run_yaml(BOMB + GOOD_RUN)), "run.yaml"),
    "run_yaml_utf16": case(fit(log(edit=lambda f: (f / "run.yaml").write_bytes(GOOD_RUN.encode("utf-16")))),
                           "run.yaml:1: not UTF-8"),
    "run_yaml_table_missing": case(fit(run_yaml(GOOD_RUN.replace("table: cpu_gr_small", "table: ./nothere"))),
                                   "nothere"),
    "run_yaml_table_unknown": case(fit(run_yaml(GOOD_RUN.replace("table: cpu_gr_small", "table: nosuchtable"))),
                                   "nosuchtable"),
    "run_yaml_table_is_run_yaml": case(fit(run_yaml(GOOD_RUN.replace("table: cpu_gr_small", "table: ./run.yaml"))),
                                       "run.yaml"),
    "jobs_truncated": case(fit(log(edit=lambda f: (f / "jobs.parquet").write_bytes(
        (f / "jobs.parquet").read_bytes()[:-30]))), "jobs.parquet: cannot read file"),
    "jobs_garbage_parquet": case(fit(jobs_file(b"PAR1" + bytes(100) + b"PAR1")), "jobs.parquet: cannot read file"),
    "jobs_csv_binary": case(fit(jobs_file(bytes(range(256)), "jobs.csv")), "jobs.csv"),
    "jobs_csv_utf16": case(fit(jobs_file("kind,request_id\nrank,1\n".encode("utf-16"), "jobs.csv")), "jobs.csv"),
    "jobs_csv_empty": case(fit(jobs_file(b"", "jobs.csv")), "jobs.csv"),
    "jobs_csv_open_quote": case(fit(jobs_file(b'kind,request_id,user_id,history_len,candidates,arrival_ms,'
                                              b'start_ms,end_ms,outcome\n"rank,0,1,2,3,0,0,1,none\n', "jobs.csv")),
                                "jobs.csv"),
    "jobs_a_folder": case(fit(log(edit=lambda f: ((f / "jobs.parquet").unlink(), (f / "jobs.parquet").mkdir()))),
                          "jobs.parquet: not a regular file"),
    "jobs_dangling_link": case(fit(log(edit=lambda f: ((f / "jobs.parquet").unlink(),
                                                       os.symlink(f / "none", f / "jobs.parquet")))),
                               "jobs.parquet: file not found"),
    "jobs_list_cells": case(fit(log(jobs=jobs_frame().assign(arrival_ms=[[1.0]] * 5))), "column arrival_ms"),
    "jobs_kind_numbers": case(fit(log(jobs=jobs_frame().assign(kind=[1, 2, 3, 4, 5]))), "column kind"),
    "too_few_jobs": case(fit(log()), "too few executed jobs"),
    "log_is_a_file": case(cli("fit", at("x"), "--out", at("p.json"), files={"x": "x"}),
                          "x: not a serving-log folder"),
    "log_is_a_results_folder": case(cli("fit", at("r"), "--out", at("p.json"), files={"r": copy("run1")}),
                                    "run.yaml: file not found"),
    "out_is_a_user_file": case(fit(log(), out="n.json", files={"n.json": "{}"}),
                               "n.json: exists and is not a serving profile"),
    "out_links_to_a_user_file": case(fit(log(), out="l.json", files={"n.json": "{}", "l.json": link_to("n.json")}),
                                     "l.json: exists"),
    "out_is_a_fifo": case(fit(log(), out="f.json", files={"f.json": mkfifo}), "f.json: exists"),
    "out_is_the_folder": case(fit(log(), out="."), "exists and is not a serving profile"),
    "out_is_the_logs_jobs": case(fit(log(), out="log/jobs.parquet"), "jobs.parquet: exists"),
    "out_under_a_file": case(fit(real_log, out="n.txt/p.json", files={"n.txt": "mine"}),
                             "n.txt/p.json: cannot write"),
}

FIDELITY = {
    "sources_empty": case(fidelity("--sources", ","), "--sources"),
    "no_logs_in_folder": case(cli("fidelity", at("e"), files={"e": mkdir}), "no serving logs found"),
    "a_file": case(cli("fidelity", at("x"), files={"x": "x"}), "x: not a serving-log folder"),
    "a_bad_log_among_good": case(fidelity(logs=("log", "bad"), files={"bad": run_yaml("device: [\n")}),
                                 "bad/run.yaml:2: invalid YAML"),
    "out_is_the_log": case(fidelity("--out", at("log")), "log: exists and is not"),
    "out_is_a_file": case(fidelity("--out", at("n.txt"), files={"n.txt": "mine"}),
                          "n.txt: exists and is not a folder"),
    "out_is_a_user_folder": case(fidelity("--out", at("d"), files={"d/k.txt": "mine"}), "d: exists and is not"),
    "replications_one": case(fidelity("--replications", "1"), "--replications"),
    "jobs_negative": case(fidelity("--jobs", "-1"), "--jobs"),
    "fit_run_unknown_without_profile": case(fidelity("--fit-run", "nosuch"), "--fit-run"),
}


# ------------------------------------------------------------------ a serving profile in a scenario
PROFILED = ONE.replace("{count: 2, device: cpu}", "{count: 1, device: h100}").replace(
    "service: {kind: exponential, mean_ms: 2}", f"service: {{kind: gr, table: {TESTBED_TABLE}, profile: p.json}}")
PROFILED = PROFILED.replace("  rate_qps: 200\n", "  rate_qps: 50\n  users: {count: 100, history_len: "
                            "{kind: constant, value: 1024}}\n  candidates: {kind: constant, value: 128}\n")


@pytest.fixture(scope="session")
def profile_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "p.json"
    r = CliRunner().invoke(app, ["fit", str(REAL_LOG), "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    return json.loads(out.read_text())


def profile(body):
    """validate a scenario whose front stage is a gr service under the profile p.json:
    `body` is text, bytes, a maker, or a function editing a copy of a fitted profile."""
    def setup(tmp: Path) -> list:
        (tmp / "s.yaml").write_text(PROFILED)
        p = tmp / "p.json"
        if isinstance(body, str):
            p.write_text(body)
        elif isinstance(body, bytes):
            p.write_bytes(body)
        elif getattr(body, "edits", False):
            data = json.loads(os.environ["SIMREC_AUDIT_PROFILE"])
            body(data)
            p.write_text(json.dumps(data))
        elif body is not None:
            body(p)
        return ["validate", tmp / "s.yaml"]
    return setup


def edits(fn):
    fn.edits = True
    return fn


def each_phase(fn):
    return edits(lambda d: [fn(ph) for ph in d["excess_ms"]["phases"].values()])


PROFILES = {
    "truncated": case(profile('{"format": "simrec-serving-profile", "version": 1, "excess_ms": {'), "p.json"),
    "empty": case(profile(""), "p.json stages.front.service.profile: serving profile is not JSON"),
    "a_list": case(profile("[1]"), "not a serving profile"),
    "utf16": case(profile('{"format": 1}'.encode("utf-16")), "p.json"),
    "a_fifo": case(profile(mkfifo), "p.json"),
    "a_folder": case(profile(mkdir), "p.json"),
    "missing": case(profile(None), "serving profile not found"),
    "sparse_30mb": case(profile(sparse(30 * 2**20)), "p.json"),
    "version_2": case(profile(edits(lambda d: d.update(version=2))), "version"),
    "no_format": case(profile(edits(lambda d: d.pop("format"))), "not a serving profile"),
    "quantiles_text": case(profile(edits(lambda d: d["excess_ms"].update(quantiles="x"))), "excess_ms"),
    "phases_a_list": case(profile(edits(lambda d: d["excess_ms"].update(phases=[]))), "excess_ms"),
    "pool_nan": case(profile(each_phase(lambda ph: [v.__setitem__(0, float("nan")) for v in ph["pools"].values()])),
                     "excess_ms"),
    "pool_key_bad": case(profile(each_phase(lambda ph: ph.update(pools={"a|b": list(ph["pools"].values())[0]}))),
                         "excess_ms"),
    "base_range_text": case(profile(each_phase(lambda ph: ph.update(base_range_ms="ab"))), "excess_ms"),
    "elasticity_a_list": case(profile(each_phase(lambda ph: ph.update(elasticity=[1]))), "excess_ms"),
    "edges_null": case(profile(each_phase(lambda ph: ph.update(base_edges_ms=None))), "excess_ms"),
    "edges_text": case(profile(each_phase(lambda ph: ph.update(base_edges_ms=["a"]))), "excess_ms"),
    "episodes_negative_rate": case(profile(edits(lambda d: d.update(episodes={"rate_per_min": -1}))), "episodes"),
    "episodes_a_list": case(profile(edits(lambda d: d.update(episodes=[1]))), "episodes"),
    "level_out_of_range": case(profile(edits(lambda d: d.update(level={"log_levels": {"a": 1e9}, "centre_log": 0}))),
                               "level"),
    "on_an_exponential_service": case(cli("validate", at("s.yaml"), scenario=ONE.replace(
        "service: {kind: exponential, mean_ms: 2}", "service: {kind: exponential, mean_ms: 2, profile: p.json}")),
        "s.yaml:7 stages.front.service.profile: unknown key"),
    "nested_100000": case(profile("[" * 100_000 + "]" * 100_000), "p.json"),
}


# ------------------------------------------------------------------ calibrate --model
def calibrate(model: str | None, *extra, files: dict | None = None, out: str = "t"):
    head = ["calibrate"] + (["--model", model] if model is not None else [])
    return cli(*head, "--device", "cpu", "--history-lens", "32", "--candidates", "4", "--conditions",
               "isolated", "--out", at(out), *extra, files=files)


def user_model(module: str, code: str):
    """--model module:build, with module.py (this code) in the working folder."""
    return calibrate(f"{module}:build", files={f"{module}.py": code + "\n"})


TINY = "simrec.calibration.examples.tiny_gr:build"
CALIBRATE = {
    "model_no_colon": case(calibrate("simrec.calibration.examples.tiny_gr"), "--model: expected"),
    "model_empty": case(calibrate(""), "--model: expected"),
    "model_colon_only": case(calibrate(":"), "--model: expected"),
    "model_two_colons": case(calibrate("a:b:c"), "--model: cannot import a"),
    "model_relative": case(calibrate(".tiny:build"), "--model: cannot import .tiny"),
    "model_slash": case(calibrate("a/b:build"), "--model: cannot import"),
    "model_missing_module": case(calibrate("audit_nosuchmod:build"), "--model: cannot import audit_nosuchmod"),
    "model_raises_on_import": case(user_model("audit_raises", "raise RuntimeError('boom')"),
                                   "--model: cannot import audit_raises: RuntimeError: boom"),
    "model_exits_on_import": case(user_model("audit_exits", "import sys\nsys.exit(3)"),
                                  "--model: cannot import audit_exits: SystemExit"),
    "model_exits_with_text": case(user_model("audit_exits2", "import sys\nsys.exit('bye')"),
                                  "--model: cannot import audit_exits2: SystemExit: bye"),
    "model_syntax_error": case(user_model("audit_syntax", "def (:"),
                               "--model: cannot import audit_syntax: SyntaxError"),
    "factory_not_callable": case(user_model("audit_nc", "build = 5"), "--model: audit_nc has no callable 'build'"),
    "factory_returns_int": case(user_model("audit_int", "def build():\n    return 5"), "not a torch.nn.Module"),
    "factory_returns_linear": case(user_model("audit_lin", "import torch\n"
                                                           "def build():\n    return torch.nn.Linear(2, 2)"),
                                   "Linear has no encode_prefix()"),
    "factory_raises": case(user_model("audit_fr", "def build():\n    raise ValueError('no')"),
                           "--model: audit_fr:build() failed: ValueError: no"),
    "factory_exits": case(user_model("audit_fx", "import sys\ndef build():\n    sys.exit(0)"),
                          "--model: audit_fx:build() failed: SystemExit"),
    "factory_needs_arguments": case(user_model("audit_fa", "def build(x):\n    return x"),
                                    "--model: audit_fa:build() failed: TypeError"),
    "factory_a_dunder": case(calibrate("os:__name__"), "--model: os has no callable '__name__'"),
    "factory_print": case(calibrate("builtins:print"), "returned a NoneType"),
    "out_is_a_user_file": case(calibrate(TINY, out="notes.txt", files={"notes.txt": "mine"}),
                               "notes.txt: exists and is not a folder"),
    "out_is_a_user_folder": case(calibrate(TINY, out="data", files={"data/keep.csv": "a,b\n"}),
                                 "data: exists and is not"),
    "out_under_a_file": case(calibrate(TINY, out="notes.txt/t", files={"notes.txt": "mine"}), "notes.txt/t"),
    "out_inside_a_run": case(calibrate(TINY, out="r/t", files={"r": copy("run1")}), "is inside the results folder"),
    "history_lens_text": case(cli("calibrate", "--device", "cpu", "--history-lens", "a,b", "--out", at("t")),
                              "--history-lens"),
    "history_lens_zero": case(cli("calibrate", "--device", "cpu", "--history-lens", "0", "--out", at("t")),
                              "--history-lens"),
    "device_unknown": case(calibrate(None, "--device", "warp9"), "warp9"),
    "dtype_unknown": case(calibrate(None, "--dtype", "float7"), "float7"),
    "condition_unknown": case(cli("calibrate", "--device", "cpu", "--conditions", "hot", "--history-lens", "32",
                                  "--candidates", "4", "--out", at("t")), "hot"),
    "errors_only_missing": case(cli("calibrate", "--errors-only", at("nothere")), "nothere"),
    "errors_only_a_file": case(cli("calibrate", "--errors-only", at("x.txt"), files={"x.txt": "x"}), "x.txt"),
    "errors_only_copy_exists": case(cli("calibrate", "--errors-only", "cpu_gr_small", "--out", at("d"),
                                        files={"d": mkdir}), "d: exists"),
    "errors_only_empty": case(cli("calibrate", "--errors-only", ""), "no cost table"),
    "no_out": case(cli("calibrate", "--device", "cpu"), "--out"),
}


# ------------------------------------------------------------------ list, init, schema, report
def report(make):
    return cli("report", at("r"), files={"r": make})


def run_copy(edit):
    return copy("run1", edit)


LIST_INIT = {
    "list_unknown": case(cli("list", "things"), "list: choose"),
    "list_empty": case(cli("list", ""), "list: choose"),
    "list_missing": case(cli("list"), "Missing argument"),
    "list_two": case(cli("list", "devices", "tables"), "unexpected extra argument"),
    "init_unknown": case(cli("init", "nosuch"), "init: no shipped scenario 'nosuch'"),
    "init_traversal": case(cli("init", "../scenarios/default"), "init: no shipped scenario"),
    "init_absolute": case(cli("init", str(SCEN / "default.yaml")), "init: no shipped scenario"),
    "init_dotfile": case(cli("init", ".hidden"), "init: no shipped scenario"),
    "init_empty": case(cli("init", ""), "init: no shipped scenario ''"),
    "init_nul": case(cli("init", "def\x00ault"), "init: no shipped scenario"),
    "init_newline": case(cli("init", "default\n"), "init: no shipped scenario"),
    "init_unicode": case(cli("init", "défault"), "init: no shipped scenario"),
    "init_too_long": case(cli("init", "a" * 5000), "init: no shipped scenario"),
    "init_existing": case(cli("init", "default", files={"default.yaml": "mine"}), "default.yaml: exists"),
    "init_out_existing": case(cli("init", "default", "--out", at("m.yaml"), files={"m.yaml": "mine"}),
                              "m.yaml: exists"),
    "init_out_folder_has_it": case(cli("init", "default", "--out", at("d"), files={"d/default.yaml": "mine"}),
                                   "d/default.yaml: exists"),
    "init_out_parent_missing": case(cli("init", "default", "--out", at("no/x.yaml")), "no/x.yaml: cannot write"),
    "init_out_under_a_file": case(cli("init", "default", "--out", at("n.txt/x.yaml"), files={"n.txt": "x"}),
                                  "n.txt/x.yaml: cannot write"),
    "init_out_dangling_link": case(cli("init", "default", "--out", at("l.yaml"), files={"l.yaml": link_to("t.yaml")}),
                                   "l.yaml: exists"),
    "init_out_fifo": case(cli("init", "default", "--out", at("f.yaml"), files={"f.yaml": mkfifo}), "f.yaml: exists"),
    "init_out_name_too_long": case(cli("init", "default", "--out", lambda t: t / ("a" * 300 + ".yaml")),
                                   "File name too long"),
    "init_out_path_too_long": case(cli("init", "default", "--out", lambda t: t / "/".join(["b" * 200] * 30) / "x.yaml"),
                                   "File name too long"),
    "schema_extra_argument": case(cli("schema", "x"), "unexpected extra argument"),
    "schema_flag_typo": case(cli("schema", "--sweeps"), "--sweeps"),
    "schema_sweep_bad_flag": case(cli("schema", "--sweep", "--bogus"), "--bogus"),
    "report_missing": case(cli("report", at("nope")), "nope: no such results folder"),
    "report_a_file": case(cli("report", at("n.txt"), files={"n.txt": "x"}), "n.txt: no such results folder"),
    "report_empty_folder": case(cli("report", at("e"), files={"e": mkdir}), "not a results folder"),
    "report_user_folder": case(cli("report", at("d"), files={"d/k.txt": "k"}), "not a results folder"),
    "report_serving_log": case(cli("report", at("log"), files=SERVING_LOG), "not a results folder"),
    "report_summary_corrupt": case(report(run_copy(lambda f: (f / "summary.json").write_text("{"))),
                                   "summary.json:1"),
    "report_summary_empty_blocks": case(report(run_copy(lambda f: (f / "summary.json").write_text(
        '{"scenario": {}, "metrics": {}}'))), "summary.json: missing field"),
    "report_requests_corrupt": case(report(run_copy(lambda f: (f / "requests.parquet").write_bytes(b"xx"))),
                                    "requests.parquet: not a readable Parquet file"),
    "report_requests_missing": case(report(run_copy(lambda f: (f / "requests.parquet").unlink())),
                                    "missing requests.parquet"),
    "report_timeseries_missing": case(report(run_copy(lambda f: (f / "timeseries.parquet").unlink())),
                                      "missing timeseries.parquet"),
    "report_sweep_points_missing": case(report(copy("sweep", lambda f: (f / "points.parquet").unlink())),
                                        "missing points.parquet"),
    "report_sweep_grid_a_number": case(report(copy("sweep", lambda f: (f / "sweep.json").write_text(
        '{"grid": 5}'))), "sweep.json: a field has the wrong type"),
    "report_capacity_bracket_a_number": case(report(copy("cap", lambda f: (f / "capacity.json").write_text(
        '{"bracket": 5}'))), "capacity.json: missing field"),
    "report_plots_is_a_file": case(report(run_copy(lambda f: (f / "plots").write_text("mine"))),
                                   "plots: cannot write the report"),
}


# ------------------------------------------------------------------ scenario blocks
STORE = """\
    history_store:
      bytes_per_token: {bpt}
      placement: {place}
      tiers:
        dram: {{capacity_bytes: {cap}, latency_ms: 0.002, gbps: {gbps}, cpu_ms: 0.05}}
        remote: {{latency_ms: 1.0, gbps: 1.0, cpu_ms: 0.6}}
"""
FRONT_SERVICE = "    service: {kind: exponential, mean_ms: 2}\n"


def store(bpt="64", place="lru", cap="4000000", gbps="10", router: str = ""):
    text = ONE.replace("  rate_qps: 200\n", "  rate_qps: 200\n  users: {count: 1000, history_len: "
                       "{kind: constant, value: 512}}\n")
    text = text.replace(FRONT_SERVICE, FRONT_SERVICE + router + STORE.format(bpt=bpt, place=place, cap=cap, gbps=gbps))
    return cli("validate", at("s.yaml"), scenario=text)


def episodes(rate="1", duration="{kind: constant, value: 1}", slowdown="{kind: constant, value: 2}",
             scope="node", per_host="1"):
    block = (f"    interference: {{rate_per_min: {rate}, duration_s: {duration}, slowdown: {slowdown}, "
             f"scope: {scope}, nodes_per_host: {per_host}}}\n")
    return cli("validate", at("s.yaml"), scenario=ONE.replace(FRONT_SERVICE, FRONT_SERVICE + block))


def shipped(name: str, *overrides: str):
    return cli("validate", SCEN / name, *[a for o in overrides for a in ("--set", o)])


def named(old: str, new: str):
    assert old in ONE
    return cli("validate", at("s.yaml"), scenario=ONE.replace(old, new))


HS = "stages.front.history_store"
BLOCKS = {
    "store_bytes_per_token_zero": case(store(bpt="0"), f"{HS}.bytes_per_token"),
    "store_bytes_per_token_1e12": case(store(bpt="1e12"), f"{HS}.bytes_per_token"),
    "store_capacity_1e30": case(store(cap="1e30"), f"{HS}.tiers.dram.capacity_bytes"),
    "store_capacity_fraction": case(store(cap="1.5"), f"{HS}.tiers.dram.capacity_bytes"),
    "store_gbps_inf": case(store(gbps=".inf"), f"{HS}.tiers.dram.gbps"),
    "store_gbps_1e-300": case(store(gbps="1e-300"), f"{HS}.tiers.dram.gbps"),
    "store_placement_unknown": case(store(place="fifo"), f"{HS}.placement"),
    "store_on_a_delay_stage": case(store(router="    router: delay\n"), f"{HS}: a delay stage"),
    "episodes_per_host_1e12": case(episodes(scope="host", per_host="1e12"), "interference.nodes_per_host"),
    "episodes_slowdown_zero": case(episodes(slowdown="{kind: constant, value: 0}"), "interference.slowdown.value"),
    "episodes_slowdown_negative": case(episodes(slowdown="{kind: uniform, low: -1, high: 2}"),
                                       "interference.slowdown.low"),
    "episodes_duration_negative": case(episodes(duration="{kind: uniform, low: -5, high: 1}"),
                                       "interference.duration_s.low"),
    "episodes_duration_1e300": case(episodes(duration="{kind: constant, value: 1e300}"), "interference.duration_s"),
    "episodes_slowdown_1e300": case(episodes(slowdown="{kind: constant, value: 1e300}"), "interference.slowdown"),
    "episodes_duration_no_values": case(episodes(duration="{kind: empirical, values: []}"),
                                        "interference.duration_s.values"),
    "episodes_scope_rack": case(episodes(scope="rack"), "interference.scope"),
    "episodes_rate_zero": case(episodes(rate="0"), "interference.rate_per_min"),
    "episodes_duration_zero": case(episodes(duration="{kind: constant, value: 0}"), "interference.duration_s.value"),
    "expander_1e30": case(shipped("relay.yaml", "relay.expander.dram_bytes=1e30"), "relay.expander.dram_bytes"),
    "expander_negative": case(shipped("relay.yaml", "relay.expander.dram_bytes=-1"), "relay.expander.dram_bytes"),
    "prefix_cache_1e30": case(shipped("relay.yaml", "relay.cache.hbm_bytes=1e30"), "relay.cache.hbm_bytes"),
    "relay_remote_gbps_1e-300": case(shipped("relay.yaml", "relay.remote_gbps=1e-300"), "relay.remote_gbps"),
    "relay_signal_after_itself": case(shipped("relay.yaml", "relay.signal_after=ranking"), "relay.signal_after"),
    "relay_stage_missing": case(shipped("relay.yaml", "relay.stage=nosuch"), "relay.stage"),
    "hbm_weights_1e30": case(shipped("helm.yaml", "hbm.weights_bytes=1e30"), "hbm.weights_bytes"),
    "hbm_weights_unit_unknown": case(shipped("helm.yaml", "hbm.weights_bytes=10XB"), "hbm.weights_bytes"),
    "hbm_weights_1e20TB": case(shipped("helm.yaml", "hbm.weights_bytes=1e20TB"), "hbm.weights_bytes"),
    "hbm_weights_fill_the_device": case(shipped("helm.yaml", "hbm.weights_bytes=79GB"), "hbm.weights_bytes"),
    "hbm_reserve_negative": case(shipped("helm.yaml", "hbm.activation_reserve_bytes=-5"),
                                 "hbm.activation_reserve_bytes"),
    "hbm_ghost_inf": case(shipped("helm.yaml", "hbm.ghost_fraction=.inf"), "hbm.ghost_fraction"),
    "hbm_refill_1e-300": case(shipped("helm.yaml", "hbm.resize.emb_refill_gbps=1e-300"),
                              "hbm.resize.emb_refill_gbps"),
    "embedding_items_1e30": case(shipped("helm.yaml", "embedding.items=1e30"), "embedding.items"),
    "embedding_items_1e18": case(shipped("helm.yaml", "embedding.items=1e18"), "embedding.items"),
    "embedding_short_term_1e12": case(shipped("helm.yaml", "embedding.short_term_tokens=1e12"),
                                      "embedding.short_term_tokens"),
    "embedding_miss_latency_inf": case(shipped("helm.yaml", "embedding.miss_latency_us=.inf"),
                                       "embedding.miss_latency_us"),
    "embedding_miss_latency_1e300": case(shipped("helm.yaml", "embedding.miss_latency_us=1e300"),
                                         "embedding.miss_latency_us"),
    "embedding_miss_gbps_1e-300": case(shipped("helm.yaml", "embedding.miss_gbps=1e-300"), "embedding.miss_gbps"),
    "embedding_drift_unsorted": case(shipped("helm.yaml", "embedding.drift=[{start_s: 5, turnover_per_s: 0.1}, "
                                                          "{start_s: 1, turnover_per_s: 0.1}]"), "embedding"),
    "embedding_without_hbm": case(shipped("helm.yaml", "hbm=null"), "relay.cache.hbm_bytes"),
    "hbm_without_relay": case(shipped("helm.yaml", "relay=null"), "hbm: needs a relay block"),
    "device_host_link_1e-300": case(named("slo:", "devices:\n  x: {name: x, hbm_bytes: 1000, peak_tflops: 1, "
                                                  "hbm_gbps: 1, host_link_gbps: 1e-300, launch_overhead_us: 1, "
                                                  "host_dram_bytes: 1000}\nslo:"), "host_link_gbps"),
    "stage_name_accented": case(named("  front:", "  frönt:"), "stages.frönt"),
    "stage_name_emoji": case(named("  front:", '  "f🙂":'), "stages.f🙂"),
    "stage_name_space": case(named("  front:", '  "a b":'), "stages.a b"),
    "stage_name_slash": case(named("  front:", '  "a/b":'), "stages.a/b"),
    "stage_name_right_to_left": case(named("  front:", '  "a\u202eb":'), "a\\u202eb"),
    "stage_name_zero_width": case(named("  front:", '  "a\u200bb":'), "a\\u200bb"),
    "name_5000": case(named("name: tiny", "name: " + "n" * 5000), "name: string should have at most"),
    "name_tab": case(named("name: tiny", 'name: "a\\tb"'), "name: must not contain control characters"),
    "device_unknown": case(named("device: cpu", "device: h9000"), "stages.front.nodes.device"),
    "device_upper_case": case(named("device: cpu", "device: H100"), "stages.front.nodes.device"),
    "stage_budget_unknown_stage": case(named("  p99_ms: 50", "  p99_ms: 50\n  stage_p99_ms: {nosuch: 5}"),
                                       "slo.stage_p99_ms.nosuch"),
}


# ------------------------------------------------------------------ kernels services
def kernels(table: str = "./kg", more: str = ", overhead_from: [h200_gr_transformer]", files: dict | None = None,
            device: str = "h200"):
    text = ONE.replace("{count: 2, device: cpu}", f"{{count: 2, device: {device}}}").replace(
        FRONT_SERVICE, f"    service: {{kind: kernels, table: {table}{more}}}\n").replace(
        "  rate_qps: 200\n", "  rate_qps: 20\n  users: {count: 1000, history_len: {kind: constant, value: 512}}\n"
                             "  candidates: {kind: constant, value: 64}\n")
    return cli("validate", at("s.yaml"), scenario=text, files=files)


def grid_copy(frame=None, manifest=None, after=None):
    """A copy of the H200 kernel grid at kg/: its frame and manifest edited, the kernels'
    sha256 kept right (so the edit itself is what is judged)."""
    def make(p: Path) -> None:
        import pandas as pd
        shutil.copytree(KERNEL_GRID, p)
        if frame:
            frame(pd.read_parquet(p / "kernels.parquet")).to_parquet(p / "kernels.parquet")
        m = json.loads((p / "manifest.json").read_text())
        m.setdefault("method", {})["kernels_sha256"] = hashlib.sha256((p / "kernels.parquet").read_bytes()).hexdigest()
        if manifest:
            manifest(m)
        (p / "manifest.json").write_text(json.dumps(m))
        if after:
            after(p)
    return {"kg": make}


def cell(column: str, value):
    def f(d):
        d = d.copy()
        if isinstance(value, str):
            d[column] = d[column].astype(object)
        d.loc[0, column] = value
        return d
    return f


KG = "kg/kernels.parquet stages.front.service"
KERNELS = {
    "table_missing": case(kernels("nothere/", ""), "nothere stages.front.service: no table manifest"),
    "table_a_cpu_phase_table": case(kernels("cpu_gr_small", ""), "stages.front.service.table: measured on cpu"),
    "table_is_the_scenario": case(kernels("./s.yaml", ""), "s.yaml stages.front.service: no table manifest"),
    "kernels_corrupt": case(kernels(files={"kg": lambda p: (shutil.copytree(KERNEL_GRID, p),
                                                            (p / "kernels.parquet").write_bytes(b"junk"))}),
                            "kg/manifest.json stages.front.service: sha256 mismatch"),
    "kernels_missing": case(kernels(files=grid_copy(after=lambda p: (p / "kernels.parquet").unlink())),
                            "kg"),
    "kernels_no_rows": case(kernels(files=grid_copy(frame=lambda d: d.iloc[:0])), "kg"),
    "kernels_a_folder": case(kernels(files=grid_copy(after=lambda p: ((p / "kernels.parquet").unlink(),
                                                                      (p / "kernels.parquet").mkdir()))),
                             "kernels.parquet stages.front.service: cannot read kernel table"),
    "time_nan": case(kernels(files=grid_copy(frame=cell("time_ms", float("nan")))), f"{KG}: time_ms"),
    "time_inf": case(kernels(files=grid_copy(frame=cell("time_ms", float("inf")))), f"{KG}: time_ms must be finite"),
    "time_negative": case(kernels(files=grid_copy(frame=cell("time_ms", -1.0))), f"{KG}: time_ms must be > 0"),
    "quantile_one": case(kernels(files=grid_copy(frame=cell("quantile", 1.0))), f"{KG}: quantile"),
    "dim_negative": case(kernels(files=grid_copy(frame=cell("dim_a", -5))), f"{KG}: dim_a"),
    "dim_2_62": case(kernels(files=grid_copy(frame=cell("dim_a", 2**62))), KG),
    "kernel_unknown": case(kernels(files=grid_copy(frame=cell("kernel", "warp_drive"))), f"{KG}: kernel: unknown"),
    "row_twice": case(kernels(files=grid_copy(frame=lambda d: __import__("pandas").concat(
        [d, d.iloc[:1]], ignore_index=True))), f"{KG}: kernel shape given twice"),
    "manifest_corrupt": case(kernels(files=grid_copy(after=lambda p: (p / "manifest.json").write_text("{"))),
                             "kg/manifest.json stages.front.service: invalid JSON"),
    "manifest_no_device": case(kernels(files=grid_copy(manifest=lambda m: m.pop("device"))), "device"),
    "manifest_dtype_unknown": case(kernels(files=grid_copy(manifest=lambda m: m["model"].update(dtype="float7"))),
                                   "unknown dtype 'float7'"),
    "manifest_model_a_list": case(kernels(files=grid_copy(manifest=lambda m: m.update(model=[1]))),
                                  "missing the model block"),
    "manifest_kernels_file_a_folder": case(kernels(files=grid_copy(manifest=lambda m: m["method"].update(
        kernels_file="."))), "cannot read kernel table"),
    "manifest_other_device": case(kernels(files=grid_copy(manifest=lambda m: m["device"].update(name="NVIDIA H100"))),
                                  "measured on h100"),
    "manifest_heads_text": case(kernels(files=grid_copy(manifest=lambda m: m["model"].update(heads="many"))),
                                "model.heads"),
    "model_heads_do_not_divide": case(kernels(str(KERNEL_GRID), ", model: {d_model: 100, heads: 3}"),
                                      "stages.front.service.model"),
    "model_float32_on_bf16_table": case(kernels(str(KERNEL_GRID), ", model: {dtype: float32}, "
                                                                  "overhead_from: [h200_gr_transformer]"),
                                        "dtype float32"),
    "no_phase_table_for_the_overhead": case(kernels(str(KERNEL_GRID), ""), "overhead"),
    "overhead_from_other_device": case(kernels(str(KERNEL_GRID), ", overhead_from: [h100_gr_base]"),
                                       "h100_gr_base stages.front.service"),
    "overhead_from_cpu": case(kernels(str(KERNEL_GRID), ", overhead_from: [cpu_gr_small]"),
                              "cpu_gr_small stages.front.service"),
    "overhead_from_empty_name": case(kernels(str(KERNEL_GRID), ", overhead_from: ['']"), "stages.front.service"),
    "overhead_from_a_string": case(kernels(str(KERNEL_GRID), ", overhead_from: h200_gr_transformer"),
                                   "stages.front.service.overhead_from"),
    "overhead_from_missing": case(kernels(str(KERNEL_GRID), ", overhead_from: [nothere/]"), "nothere"),
    "on_cpu_nodes": case(kernels(str(KERNEL_GRID), device="cpu"), "measured on h200, but the stage's nodes are cpu"),
}


ALL = {"compare": COMPARE, "run": RUN_FLAGS, "sweep": SWEEPS, "regime": REGIME, "fit": FIT,
       "fidelity": FIDELITY, "profile": PROFILES, "calibrate": CALIBRATE, "list_init_report": LIST_INIT,
       "blocks": BLOCKS, "kernels": KERNELS}


@pytest.mark.parametrize("surface,setup,expect", [         # profile cases need their fixture
    pytest.param(name, *p.values, marks=p.marks, id=f"{name}-{p.id}")
    for name, cases in ALL.items() if name != "profile" for p in run_ids(cases)])
def test_refused(tmp_path, surface, setup, expect):
    if surface == "calibrate":
        pytest.importorskip("torch")
    refused(tmp_path, setup(tmp_path), expect)


@pytest.mark.parametrize("setup,expect", run_ids(PROFILES))
def test_profile_in_a_scenario(tmp_path, setup, expect, profile_json, monkeypatch):
    monkeypatch.setenv("SIMREC_AUDIT_PROFILE", json.dumps(profile_json))     # what `edits` start from
    refused(tmp_path, setup(tmp_path), expect)


def test_count_of_new_cases():
    assert sum(map(len, ALL.values())) >= 80


# ------------------------------------------------------------------ outside the runner
def test_serving_log_is_never_replaced_by_another_writer(tmp_path):
    """The data-loss case behind folders.WRITES: a log folder given as --out survives, byte for byte."""
    real_log(tmp_path / "log")
    (tmp_path / "s.yaml").write_text(ONE)
    before = snapshot(tmp_path / "log")
    for args in (["run", tmp_path / "s.yaml", "--out", tmp_path / "log", "--no-report", "--executor", "serial"],
                 ["fidelity", tmp_path / "log", "--out", tmp_path / "log", "--sources", "replay",
                  "--replications", "2", "--bootstrap", "100"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 1 and "exists and is not" in r.stderr, r.stderr
    assert snapshot(tmp_path / "log") == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["schema"], ["list", "devices"], ["--version"]], ids=" ".join)
def test_stdout_on_a_full_device_is_one_line(args):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-c", MAIN, *args], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "No space left on device" in lines[0] and "internal error" not in lines[0]


def test_kernels_file_that_is_a_fifo_does_not_hang(tmp_path):
    setup = kernels(files=grid_copy(after=lambda p: ((p / "kernels.parquet").unlink(),
                                                     os.mkfifo(p / "kernels.parquet"))))
    args = setup(tmp_path)
    try:
        r = subprocess.run([sys.executable, "-c", MAIN, *map(str, args)], capture_output=True, text=True,
                           timeout=15, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("simrec validate hung on a FIFO as kernels.parquet")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_run_whose_requests_never_finish_prints_no_numpy_warning(tmp_path):
    (tmp_path / "s.yaml").write_text(ONE.replace("service: {kind: exponential, mean_ms: 2}",
                                                 "service: {kind: constant, ms: 1.0e11}"))
    r = subprocess.run([sys.executable, "-c", MAIN, "run", "s.yaml", "--out", "res", "--no-report",
                        "--executor", "serial"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr, r.stderr
