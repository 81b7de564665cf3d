"""Issue 14, class 1 and the write side of classes 2 and 6: output paths never lose data.

A results folder replaces only an earlier simrec folder; anything else at the target is
refused in one line before the run. Names from scenarios are sanitised. Write errors are
one line. Concurrent writers and stale temp folders of dead processes are handled.
"""

from __future__ import annotations

import errno
import json
import re
import os
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import snapshot
from simrec import folders
from simrec.cli import app
from simrec.folders import atomic_folder, clean_stale, is_simrec_folder, safe_name

GOOD = """\
name: tiny
workload:
  rate_qps: 200
stages:
  front:
    nodes: {count: 2, device: cpu}
    service: {kind: exponential, mean_ms: 2}
slo:
  p99_ms: 50
run:
  requests: 300
  replications: 2
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(tmp_path: Path, *args) -> str:
    before = snapshot(tmp_path)
    r = invoke(*args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1, (r.output, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output + r.stderr and "internal error" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before
    return lines[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A user's folder: the scenario, notes, a data folder; the default results/ goes here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.csv").write_text("a,b\n1,2\n")
    return tmp_path


def _link(target: str):
    def make(home: Path) -> Path:
        os.symlink(home / target, home / "link")
        return home / "link"
    return make


def _results_plus(extra: str):
    """An earlier results folder the user has added a file to: it is theirs now."""
    def make(home: Path) -> Path:
        out = home / "old"
        (out / "plots").mkdir(parents=True)
        (out / "summary.json").write_text("{}")
        (out / extra).write_text("mine")
        return out
    return make


def _fifo(home: Path) -> Path:
    os.mkfifo(home / "pipe")
    return home / "pipe"


TARGETS = {
    "existing_file": lambda h: h / "notes.txt",
    "the_scenario_itself": lambda h: h / "s.yaml",
    "folder_of_user_files": lambda h: h / "data",
    "cwd_dot": lambda h: ".",
    "parent_dotdot": lambda h: "..",
    "empty_string": lambda h: "",
    "root": lambda h: "/",
    "ends_in_dotdot": lambda h: h / "data" / "..",
    "cwd_absolute": lambda h: h,
    "symlink_to_folder": _link("data"),
    "symlink_to_file": _link("notes.txt"),
    "dangling_symlink": _link("nothing"),
    "fifo": _fifo,
    "parent_is_file": lambda h: h / "notes.txt" / "res",
    "grandparent_is_file": lambda h: h / "notes.txt" / "a" / "b",
    "results_plus_user_file": _results_plus("mine.txt"),
    "results_plus_user_plot": _results_plus("plots/notes.txt"),
}


@pytest.mark.parametrize("command", ["run", "sweep", "capacity"])
@pytest.mark.parametrize("target", [pytest.param(v, id=k) for k, v in TARGETS.items()])
def test_refuses_targets_that_are_not_earlier_results(home, command, target):
    out = target(home)
    extra = {"sweep": ["--grid", "workload.rate_qps=100,200", "--executor", "serial"],
             "capacity": ["--max-evals", "2"]}.get(command, [])
    line = assert_refused(home, command, home / "s.yaml", "--out", out, "--no-report", *extra)
    assert "refusing" in line or "cannot" in line or "not a folder simrec can write" in line


@pytest.mark.parametrize("name", ["../victim", "/abs/victim", ".", "..", "a/../../victim", "$x$", "ok name"])
def test_names_from_scenarios_stay_inside_results(home, name):
    (home / "victim").mkdir()
    (home / "victim" / "precious.txt").write_text("keep")
    (home / "s.yaml").write_text(GOOD.replace("name: tiny", f"name: {json.dumps(name)}"))
    before = snapshot(home)
    r = invoke("run", home / "s.yaml")
    assert r.exit_code == 0, r.stderr
    made = list((home / "results").iterdir())
    # the default folder is <safe name>-<8 hex of the effective scenario and seed>
    assert len(made) == 1 and re.fullmatch(re.escape(safe_name(name)) + r"-[0-9a-f]{8}", made[0].name)
    assert {k: v for k, v in snapshot(home).items() if not k.startswith("results")} == before


def test_empty_name_is_refused(home):
    (home / "s.yaml").write_text(GOOD.replace("name: tiny", "name: ''"))
    assert_refused(home, "run", home / "s.yaml")
    (home / "s.yaml").write_text(GOOD)
    assert_refused(home, "run", home / "s.yaml", "--set", "name=")


def test_replaces_only_earlier_results(home):
    out = home / "res"
    for _ in range(2):                                   # the second run replaces the first
        r = invoke("run", home / "s.yaml", "--out", out)
        assert r.exit_code == 0, r.stderr
        assert is_simrec_folder(out)
    sweep = home / "sw"
    for _ in range(2):
        r = invoke("sweep", home / "s.yaml", "--grid", "workload.rate_qps=100,200",
                   "--executor", "serial", "--out", sweep, "--no-report")
        assert r.exit_code == 0, r.stderr
    (out / "mine.txt").write_text("added by the user")
    assert_refused(home, "run", home / "s.yaml", "--out", out)
    assert sorted(p.name for p in home.iterdir()) == [".simrec-cache", "data", "notes.txt", "res",
                                                      "s.yaml", "sw"]


def test_empty_folder_may_be_the_target(home):
    (home / "new").mkdir()
    assert invoke("run", home / "s.yaml", "--out", home / "new", "--no-report").exit_code == 0
    assert (home / "new" / "summary.json").exists()


def test_dollar_names_draw_plots(home):
    """Math text is off: `$` in scenario, stage and variant names is drawn literally."""
    (home / "s.yaml").write_text(GOOD.replace("name: tiny", "name: 'cost $5 $x^2$'"))
    r = invoke("run", home / "s.yaml", "--out", home / "r")
    assert r.exit_code == 0, r.stderr
    r = invoke("sweep", home / "s.yaml", "--variant", "a$b$:stages.front.nodes.count=3",
               "--variant", "$:stages.front.nodes.count=2", "--executor", "serial", "--out", home / "sw")
    assert r.exit_code == 0, r.stderr
    assert (home / "sw" / "report.html").exists()


# ------------------------------------------------------------------ write errors
def _fails_with(monkeypatch, target: str, err: int):
    def boom(*a, **k):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(target, boom)


@pytest.mark.parametrize("where,err", [
    ("pyarrow.parquet.write_table", errno.ENOSPC),        # full disk while writing
    ("pyarrow.parquet.write_table", errno.EIO),
    ("simrec.folders.tempfile.mkdtemp", errno.EROFS),      # read-only target folder
    ("simrec.folders.tempfile.mkdtemp", errno.EACCES),
    ("simrec.folders.os.replace", errno.EXDEV),            # the final rename fails
])
def test_write_errors_are_one_line(home, monkeypatch, where, err):
    if where.endswith("os.replace"):
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    _fails_with(monkeypatch, where, err)
    line = assert_refused(home, "run", home / "s.yaml", "--out", home / "res", "--no-report")
    assert os.strerror(err) in line


def test_full_disk_during_report_leaves_earlier_results(home, monkeypatch):
    out = home / "res"
    assert invoke("run", home / "s.yaml", "--out", out, "--no-report").exit_code == 0
    _fails_with(monkeypatch, "simrec.reports.build.write_report", errno.ENOSPC)
    line = assert_refused(home, "run", home / "s.yaml", "--out", out)
    assert line.startswith(f"{out}: cannot write the results (No space left on device)")


# ------------------------------------------------------------------ concurrency, stale temps
def _write(out: Path, tag: str) -> None:
    with atomic_folder(out) as tmp:
        (tmp / "summary.json").write_text(json.dumps({"tag": tag}))
        (tmp / "requests.parquet").write_bytes(tag.encode() * 100)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_concurrent_writers(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    out, errors = tmp_path / "res", []

    def writer(k: int) -> None:
        try:
            for i in range(60):
                _write(out, f"{k}-{i}")
        except Exception as e:      # noqa: BLE001 (collected and asserted below)
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    tag = json.loads((out / "summary.json").read_text())["tag"]
    assert (out / "requests.parquet").read_bytes() == tag.encode() * 100


def test_stale_temps_of_dead_processes_are_cleaned(tmp_path):
    dead = 2**22 + 12345                          # above pid_max: no such process
    out = tmp_path / "res"
    _write(out, "first")
    (tmp_path / f".res.tmp-{dead}-abcd1234").mkdir()
    (tmp_path / f".other.tmp-{dead}-abcd1234").mkdir()
    live = tmp_path / f".res.tmp-{os.getpid()}-zzzz9999"
    live.mkdir()                                  # a live writer's: kept
    _write(out, "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "res"]


def test_old_folder_of_a_cut_swap_is_put_back(tmp_path):
    dead = 2**22 + 777
    old = tmp_path / f".res.old-{dead}-abcd1234"
    (old / "res").mkdir(parents=True)
    (old / "res" / "summary.json").write_text('{"tag": "old"}')
    clean_stale(tmp_path)                         # the target was missing: restored
    assert json.loads((tmp_path / "res" / "summary.json").read_text()) == {"tag": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_signal_during_swap_waits_for_it(tmp_path, monkeypatch):
    import signal
    out = tmp_path / "res"
    _write(out, "old")
    real = folders._exchange

    def interrupted_exchange(a, b):
        signal.raise_signal(signal.SIGINT)        # arrives mid-swap: held until it is done
        return real(a, b)
    monkeypatch.setattr(folders, "_exchange", interrupted_exchange)
    with pytest.raises(KeyboardInterrupt):
        _write(out, "new")
    assert json.loads((out / "summary.json").read_text()) == {"tag": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_safe_name():
    assert safe_name("../victim") == "victim"
    assert safe_name("/abs/path") == "abs-path"
    assert safe_name("") == safe_name(".") == safe_name("..") == "results"
    assert safe_name("relay-s2_v1.5") == "relay-s2_v1.5"
    assert safe_name("a b$c") == "a-b-c"
