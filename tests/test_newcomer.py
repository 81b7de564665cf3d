"""A newcomer's first hour (issue 17): every `Example:` of every command's help runs and
stays below saturation; --version, list, init; a run's identity and its folder's mode."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.main import get_command
from typer.testing import CliRunner

import simrec
from simrec.cli import app, scenarios_dir

SHIPPED = scenarios_dir()        # the checkout's scenarios/, or the installed package's copy

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
HAS_TORCH = importlib.util.find_spec("torch") is not None

# Shorter runs where an example allows it: the example itself is what a reader types; these
# only cut its length (never its load) so the whole file stays well under a minute.
SHORTER = {
    "run": ["--set", "run.replications=4", "--set", "run.duration_s=3"],
    "sweep": ["--set", "run.replications=2", "--set", "run.duration_s=3", "--executor", "serial"],
    "capacity": ["--set", "run.replications=2", "--set", "run.duration_s=2", "--max-evals", "3",
                 "--no-report"],
    "calibrate": ["--target-s", "0.01", "--min-samples", "3", "--max-samples", "5", "--no-kernels",
                  "--conditions", "isolated"],
    "fidelity": ["--replications", "2", "--bootstrap", "100"],
}
NEEDS_TORCH = {"calibrate", "testbed"}
# Tens of seconds to minutes of CPU even shortened (test_calibrate.py covers calibrate on a
# tiny grid): run them with SIMREC_SLOW_TESTS=1.
LONG = {"calibrate", "fidelity", "regime"}
UTILISATION_LIMIT = 0.8


def examples() -> list[tuple[str, str]]:
    """(command, example line) for every `Example:` in every command's help, in app order."""
    found = []
    for name, cmd in get_command(app).commands.items():
        for line in (cmd.help or "").splitlines():
            if line.strip().startswith("Example:"):
                found.append((name, line.strip()[len("Example:"):].strip()))
    return found


EXAMPLES = examples()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A user's folder: the checkout's scenarios/ and calibration/ linked in, outputs local."""
    home = tmp_path_factory.mktemp("newcomer")
    for sub in ("scenarios", "calibration"):
        (home / sub).symlink_to(ROOT / sub)
    return home


def invoke(home: Path, argv: list[str]):
    cwd = os.getcwd()
    os.chdir(home)
    try:
        return runner.invoke(app, argv)
    finally:
        os.chdir(cwd)


def run_example(home: Path, command: str, line: str):
    argv = shlex.split(line)
    assert argv[0] == "simrec", line
    argv, redirect = argv[1:], None
    if ">" in argv:
        i = argv.index(">")
        argv, redirect = argv[:i], argv[i + 1]
    r = invoke(home, argv + SHORTER.get(command, []))
    assert r.exit_code == 0, f"{line}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.output
    if redirect:
        (home / redirect).write_text(r.stdout)
    return argv, r


def test_every_command_has_an_example():
    names = {c for c, _ in EXAMPLES}
    assert names == set(get_command(app).commands), "commands without an Example: line"


@pytest.mark.parametrize("command,line", EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_help_example_runs_below_saturation(work, command, line):
    if command in NEEDS_TORCH and not HAS_TORCH:
        pytest.skip("needs torch")
    if command == "testbed":
        pytest.skip("serves a model on a GPU for minutes")
    if command in LONG and not os.environ.get("SIMREC_SLOW_TESTS"):
        pytest.skip("minutes of CPU; SIMREC_SLOW_TESTS=1 runs it")
    if command in ("report", "compare"):       # they read the run (and sweep) examples' folders
        run_line = next(ln for c, ln in EXAMPLES if c == "run")
        out = shlex.split(run_line)[shlex.split(run_line).index("--out") + 1]
        if not (work / out / "summary.json").exists():
            run_example(work, "run", run_line)
        sweep_line = next(ln for c, ln in EXAMPLES if c == "sweep")
        swept = work / "results" / f"sweep-{Path(shlex.split(sweep_line)[2]).stem}"
        if command == "compare" and not (swept / "points.parquet").exists():
            run_example(work, "sweep", sweep_line)
    argv, r = run_example(work, command, line)
    assert "overload" not in r.stderr.lower(), r.stderr
    if command == "run":
        summary = json.loads((work / argv[argv.index("--out") + 1] / "summary.json").read_text())
        util = {k: v["stage"]["mean"] for k, v in summary["metrics"]["utilisation"].items()}
        assert max(util.values()) < UTILISATION_LIMIT, util
        assert not summary["warnings"], summary["warnings"]
    if command == "sweep":
        out = work / "results" / f"sweep-{Path(argv[1]).stem}"
        points = pq.read_table(out / "points.parquet").to_pandas()
        util = points[[c for c in points.columns if c.startswith("utilisation.") and c.endswith(".stage")]]
        assert len(points) == 4 and (util.to_numpy() < UTILISATION_LIMIT).all(), util
    if command == "schema":
        assert json.loads((work / "scenario.schema.json").read_text())["title"] == "Scenario"


def test_version_and_short_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith(f"simrec {simrec.__version__}")
    for cmd in ([], ["run"], ["list"]):
        short, long_ = runner.invoke(app, [*cmd, "-h"]), runner.invoke(app, [*cmd, "--help"])
        assert short.exit_code == 0 and short.stdout == long_.stdout and short.stdout.startswith("Usage: ")
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout


HEAVY = ("numpy", "pandas", "pyarrow", "pydantic", "scipy", "matplotlib", "simpy", "rich")
PROBE = """
import sys
sys.argv = ["simrec", *sys.argv[1:]]
from simrec.cli import main
try:
    main()
except SystemExit:
    pass
print("loaded:", *[m for m in {heavy!r} if m in sys.modules])
"""


@pytest.mark.parametrize("argv,allowed", [
    (["--help"], set()), (["--version"], set()),
    (["run", "-h"], {"pydantic"}),      # typer itself builds its parameter types with pydantic
    (["validate", "scenarios/default.yaml"], {"numpy", "pandas", "pyarrow", "pydantic", "simpy"}),
])
def test_fast_start_imports_only_what_the_command_needs(argv, allowed):
    """--help pays for typer alone; validate never for scipy, matplotlib or rich
    (benchmarks/startup.py measures the CPU time)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), done.stdout
    loaded = set(last.split()[1:])
    assert loaded <= allowed, loaded - allowed


def test_list(work):
    r = invoke(work, ["list", "devices"])
    assert r.exit_code == 0 and "h100" in r.stdout and "ascend910b" in r.stdout
    r = invoke(work, ["list", "tables"])
    assert r.exit_code == 0 and "h100_gr_base" in r.stdout and "illustrative" in r.stdout
    r = invoke(work, ["list", "scenarios"])
    rows = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[1:]}
    assert r.exit_code == 0 and rows["default"] == "scenario" and rows["s1_max_length"] == "sweep"
    assert set(rows) == {p.stem for p in (ROOT / "scenarios").glob("*.yaml")}
    r = invoke(work, ["list", "gpus"])
    assert r.exit_code == 1 and r.stderr.strip() == "list: choose devices, tables or scenarios (got 'gpus')"


def test_init_copies_and_never_overwrites(tmp_path):
    r = invoke(tmp_path, ["init", "mmc"])
    assert r.exit_code == 0
    assert (tmp_path / "mmc.yaml").read_bytes() == (ROOT / "scenarios" / "mmc.yaml").read_bytes()
    (tmp_path / "mine.yaml").write_text("keep")
    r = invoke(tmp_path, ["init", "default", "--out", "mine.yaml"])
    assert r.exit_code == 1
    assert r.stderr.strip() == "mine.yaml: exists: refusing to overwrite it; choose another --out"
    assert (tmp_path / "mine.yaml").read_text() == "keep"
    r = invoke(tmp_path, ["init", "nope"])
    assert r.exit_code == 1 and r.stderr.startswith("init: no shipped scenario 'nope' (shipped: ") and " default, " in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_run_accepts_a_shipped_name(tmp_path):
    r = invoke(tmp_path, ["validate", "mmc"])
    assert r.exit_code == 0 and r.stdout.startswith(f"{SHIPPED / 'mmc.yaml'}: ok")


def test_run_identity_and_folder_mode(tmp_path):
    base = ["run", "mmc", "--set", "run.requests=2000", "--set", "run.replications=2", "--no-report"]
    a = invoke(tmp_path, base)
    b = invoke(tmp_path, [*base, "--set", "workload.rate_qps=200"])
    again = invoke(tmp_path, base)
    assert a.exit_code == b.exit_code == again.exit_code == 0, a.stderr + b.stderr
    folders = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(folders) == 2, folders          # a --set variant gets its own folder, a rerun the same
    mask = os.umask(0o022)
    os.umask(mask)
    for name in folders:
        folder = tmp_path / "results" / name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask       # not mkdtemp's 0700
        assert stat.S_IMODE((folder / "summary.json").stat().st_mode) == 0o666 & ~mask
        s = json.loads((folder / "summary.json").read_text())
        assert name == s["effective_scenario"]["run_id"] == f"mmc-textbook-{s['effective_scenario']['sha256'][:8]}"
        cmd = s["command"]
        assert cmd[:3] == ["simrec", "run", "mmc"]
        assert s["overrides"] == [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        assert s["version"]["simrec"] == simrec.__version__ and "git_commit" in s["version"]
        assert s["effective_scenario"]["file"] == str(SHIPPED / "mmc.yaml")
    by_rate = {json.loads((tmp_path / "results" / n / "summary.json").read_text())["scenario"]["workload"]["rate_qps"]: n
               for n in folders}
    variant = json.loads((tmp_path / "results" / by_rate[200] / "summary.json").read_text())
    assert variant["overrides"] == ["run.requests=2000", "run.replications=2", "workload.rate_qps=200"]
    # the report shows the command, the overrides and the effective rate
    assert invoke(tmp_path, ["report", f"results/{by_rate[200]}"]).exit_code == 0
    html = (tmp_path / "results" / by_rate[200] / "report.html").read_text()
    assert "workload.rate_qps=200" in html and "200 QPS offered" in html
    assert "simrec run mmc --set run.requests=2000" in html


def test_least_loaded_ties_spread_over_identical_nodes():
    """Eight identical nodes at moderate load: with ties to the lowest index the busiest
    node ran at 94% and the idlest at 55%; drawn ties share the work evenly."""
    sc = simrec.load_scenario(ROOT / "scenarios" / "default.yaml",
                              ["run.replications=1", "run.duration_s=4", "workload.rate_qps=800"])
    res = simrec.simulate(sc)
    for stage, u in res.summary["metrics"]["utilisation"].items():
        nodes = [n["mean"] for n in u["nodes"]]
        assert max(nodes) < 1.3 * min(nodes), (stage, nodes)     # was 70x at this load
    again = simrec.simulate(sc)
    assert again.summary == res.summary              # the draws are the stage's own stream
