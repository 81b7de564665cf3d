"""CPU time of `simrec --help` and `simrec validate scenarios/default.yaml`: this tree
against a git revision, side by side in one run.

    python benchmarks/startup.py                 # against HEAD
    python benchmarks/startup.py --rev 4315db6 --runs 9

The revision is checked out with `git worktree add` into a temp folder (removed after).
Both trees run the same way: a throw-away folder holds a `simrec` package made of links
to the tree's simulator/, calibration/ and reports/ (the layout pyproject's package-dir
gives an install), put first on PYTHONPATH, so neither goes through the editable install.
Each command runs from its own tree's root (its own scenarios/default.yaml).

CPU time is user + system of the child (resource.getrusage(RUSAGE_CHILDREN), the
difference around each run), so it counts every thread of the command, not wall time on
a shared machine. Runs alternate between the trees after one warm-up each (bytecode
compiled, files cached); the table gives the median and the minimum of --runs runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (("--help",), ("validate", "scenarios/default.yaml"))
LAUNCH = "import sys; sys.argv[0] = 'simrec'; from simrec.cli import main; main()"


def shim(tree: Path, into: Path) -> Path:
    """A folder whose `simrec` package is the tree's simulator/ (files linked one by one),
    with calibration/ and reports/ as its subpackages."""
    pkg = into / "simrec"
    pkg.mkdir(parents=True)
    for entry in (tree / "simulator").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub, folder in (("calibration", "calibration"), ("reports", "reports"), ("scenarios", "scenarios")):
        if (tree / folder).is_dir() and not (pkg / sub).exists():
            (pkg / sub).symlink_to(tree / folder)
    return into


def cpu_seconds(args: tuple[str, ...], tree: Path, path: Path) -> float:
    """User + system CPU seconds of one `simrec ARGS` run from the tree's root."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    env.pop("SIMREC_DEBUG", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=tree, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: simrec {' '.join(args)} failed ({done.returncode}): "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--runs", type=int, default=7, help="runs per command and tree (>= 5; default 7)")
    a = ap.parse_args(argv)
    if a.runs < 5:
        ap.error("--runs must be at least 5")
    work = Path(tempfile.mkdtemp(prefix="simrec-startup-"))
    old = work / "old"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(old), a.rev],
                       check=True)
        trees = {a.rev: (old, shim(old, work / "old-path")), "this tree": (ROOT, shim(ROOT, work / "new-path"))}
        times: dict[tuple[str, tuple], list[float]] = {}
        for args in COMMANDS:
            for name, (tree, path) in trees.items():
                cpu_seconds(args, tree, path)                    # warm-up: bytecode, file cache
            for _ in range(a.runs):
                for name, (tree, path) in trees.items():         # alternate: same load for both
                    times.setdefault((name, args), []).append(cpu_seconds(args, tree, path))
        print(f"CPU time (user + system, s), median [min] of {a.runs} runs; {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.2f}")
        head = f"{'command':<42}{a.rev:>16}{'this tree':>16}{'ratio':>9}"
        print(head)
        print("-" * len(head))
        for args in COMMANDS:
            old_t, new_t = times[(a.rev, args)], times[("this tree", args)]
            mo, mn = statistics.median(old_t), statistics.median(new_t)
            print(f"{'simrec ' + ' '.join(args):<42}{f'{mo:.3f} [{min(old_t):.3f}]':>16}"
                  f"{f'{mn:.3f} [{min(new_t):.3f}]':>16}{f'{mo / mn:.1f}x':>9}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
