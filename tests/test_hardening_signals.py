"""Issue 14, class 6: SIGINT, SIGTERM and SIGKILL during `run` and `sweep`.

The target must be complete or untouched afterwards, SIGINT and SIGTERM must leave no temp
folder (SIGKILL's is removed by the next writer), and a killed sweep must leave no orphaned
pool worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simrec.folders import clean_stale

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc: Linux only")

SCENARIO = """\
name: slow
workload:
  rate_qps: 400
stages:
  a:
    nodes: {count: 2, device: cpu}
    service: {kind: exponential, mean_ms: 3}
  b:
    nodes: {count: 2, device: cpu}
    service: {kind: lognormal, mean_ms: 2, cv: 0.5}
slo:
  p99_ms: 50
run:
  requests: REQUESTS
  replications: 3
"""
MAIN = "import sys; from simrec.cli import main; sys.argv[0] = 'simrec'; main()"


def simrec(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MAIN, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def tag_of(out: Path) -> int | None:
    """The seed a complete results folder was run with (None if it is not complete)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
        pq.read_table(out / "requests.parquet")
        pq.read_table(out / "timeseries.parquet")
    except (OSError, ValueError):
        return None
    return summary["seed"] if (out / "report.html").exists() else None


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def gone(pids: list[int]) -> bool:
    def dead(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"
    return all(dead(p) for p in pids)


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A folder with an earlier complete results folder (seed 1) to be replaced."""
    home = tmp_path_factory.mktemp("kill")
    (home / "s.yaml").write_text(SCENARIO.replace("REQUESTS", "50000"))
    p = simrec("run", home / "s.yaml", "--out", home / "res", "--seed", 1)
    assert p.wait(120) == 0, p.stderr.read()
    return home


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
@pytest.mark.parametrize("when", ["simulating", "writing"])
def test_kill_run_leaves_target_complete_or_untouched(earlier, sig, when):
    home, out = earlier, earlier / "res"
    assert tag_of(out) is not None
    p = simrec("run", home / "s.yaml", "--out", out, "--seed", 2)
    if when == "simulating":
        time.sleep(2.0)
    else:                                        # the temp folder exists: writing or drawing
        assert wait_for(lambda: temps(home) or p.poll() is not None), "never started writing"
    p.send_signal(sig)
    code = p.wait(60)
    assert tag_of(out) in (1, 2), "target incomplete"
    if sig != signal.SIGKILL:
        err = p.stderr.read()
        assert code in (0, 130) and "Traceback" not in err, err
        assert not temps(home), temps(home)
        if code == 130:
            assert err.strip().splitlines()[-1] == "interrupted"
    clean_stale(home)                            # what the next writer does first
    assert not temps(home)
    assert tag_of(out) in (1, 2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_kill_sweep_leaves_no_orphan_workers(tmp_path, sig):
    # long enough points that the pool is still busy when the signal comes (the fast engine
    # runs ~80k requests/s)
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("REQUESTS", "1000000"))
    p = simrec("sweep", tmp_path / "s.yaml", "--grid", "workload.rate_qps=300,350,400,450",
               "--workers", 2, "--out", tmp_path / "sw", "--no-report", start_new_session=True)
    assert wait_for(lambda: len(children(p.pid)) >= 2 or p.poll() is not None)
    time.sleep(0.5)
    workers = children(p.pid)
    assert len(workers) >= 2 and p.poll() is None
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)                    # like Ctrl-C: the whole process group
    else:
        p.send_signal(sig)
    code = p.wait(60)
    assert wait_for(lambda: gone(workers), 15), "orphaned pool workers"
    assert not (tmp_path / "sw").exists()
    if sig != signal.SIGKILL:
        err = p.stderr.read()
        assert code == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "interrupted"
        assert not temps(tmp_path)
    for entry in (tmp_path / ".simrec-cache").glob("*.json") if (tmp_path / ".simrec-cache").exists() else ():
        json.loads(entry.read_text())            # finished points only, each complete
