"""simrec: a discrete-event simulator of multi-stage recommendation serving cascades.

    import simrec
    scenario = simrec.load_scenario("scenarios/default.yaml", ["workload.rate_qps=500"])
    results = simrec.simulate(scenario)
    results.metric("e2e", "p99_ms")
    simrec.load_results("results/default-cascade-1a2b3c4d")   # a run, sweep or capacity folder

Simulated times are milliseconds everywhere.

The public names are imported on first use (PEP 562), so `import simrec` and the CLI's
`--help` do not pay for pydantic, numpy, pandas or pyarrow before they are needed.
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache
from importlib import import_module
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_LAZY = {
    "InputError": "errors",
    "load_scenario": "loader",
    "with_overrides": "loader",
    "Results": "results",
    "SweepResults": "results",
    "CapacityResults": "results",
    "load_results": "results",
    "sweep": "results",           # simrec.sweep(...) the function; the module: simrec.sweep's
    "capacity": "results",        # names via `from simrec.sweep import ...` (see _Package)
    "Scenario": "scenario",
    "simulate": "simulate",
}

__all__ = sorted([*_LAZY, "__version__", "version_info"])

if TYPE_CHECKING:  # pragma: no cover  (names for type checkers; loaded lazily below)
    from .errors import InputError  # noqa: F401
    from .loader import load_scenario, with_overrides  # noqa: F401
    from .results import CapacityResults, Results, SweepResults, capacity, load_results, sweep  # noqa: F401
    from .scenario import Scenario  # noqa: F401
    from .simulate import simulate  # noqa: F401


class _Package(types.ModuleType):
    """The package module, with its public names loaded on first access.

    `simrec.simulate` (like `sweep` and `capacity`) is both the function and a submodule's
    name: importing the submodule would set the package attribute to the module (importlib
    does so for every submodule), and `simrec.simulate(sc)` would then fail. That one
    assignment is ignored, so the attribute stays the function (as it was with eager
    imports); the modules' names stay reachable by `from simrec.sweep import ...`."""

    def __getattr__(self, name: str):
        if name == "__version__":
            return _installed_version()
        where = _LAZY.get(name)
        if where is None:
            raise AttributeError(f"module 'simrec' has no attribute {name!r}")
        value = getattr(import_module(f".{where}", __name__), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *_LAZY})


def version_info() -> dict:
    """{"simrec": the installed version, "git_commit": the checkout's HEAD or None}: what a
    results folder records of the code that made it. The commit is looked up only when the
    package sits in a simrec checkout (an editable install), never in an unrelated
    repository that happens to hold site-packages."""
    return {"simrec": _installed_version(), "git_commit": _git_commit()}


@lru_cache(maxsize=1)
def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("simrec")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


sys.modules[__name__].__class__ = _Package
