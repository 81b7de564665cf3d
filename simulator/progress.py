"""Progress of a replication by simulated time, for progress bars with an ETA.

The engines call `progress(fraction)` as a replication's arrivals pass each STEP of its
horizon (the last arrival's time), so a one-replication run moves while it runs. The hot
loops pay one integer comparison per arrival for it: `Marks` turns the time marks into
arrival indices before the loop starts. The callback only reads, so no draw, event or
record changes (tests/test_progress.py checks the records bit for bit).

Points of a sweep or a capacity search run in pool workers; `simulate` reports a point's
share done into a `Board` (shared memory made before the pool forks, one slot per running
simulation) when it has no callback of its own, and the parent's bar reads the board.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import numpy as np

STEP = 0.02          # a report every 2% of the horizon: 50 a replication (per stage, fast engine)
NEVER = -1           # a mark no loop index reaches


class Marks:
    """The arrival indices where a loop reports: `if k == mk: mk = marks(k)` in the loop,
    for the k-th arrival (0-based). Reports lo + (hi - lo) x the fraction of the horizon
    passed, so a stage of the fast engine can report its share of the replication."""

    __slots__ = ("_at", "_frac", "_i", "_report", "first")

    def __init__(self, times, horizon: float, report: Callable[[float], None] | None,
                 lo: float = 0.0, hi: float = 1.0, step: float = STEP):
        self._report, self._i = report, 0
        self._at, self._frac, self.first = [], [], NEVER
        if report is None or not len(times) or not horizon > 0:
            return
        t = times if isinstance(times, np.ndarray) else np.frombuffer(times, dtype=float)
        fracs = np.arange(1, int(round(1 / step)) + 1) * step
        at = np.searchsorted(t, fracs * horizon, side="left")     # first arrival at/after each mark
        keep = at < len(t)
        at, fracs = at[keep], fracs[keep]
        last = np.r_[at[1:] != at[:-1], True] if len(at) else np.zeros(0, bool)   # one report an index
        self._at = at[last].tolist()
        self._frac = (lo + (hi - lo) * np.minimum(fracs[last], 1.0)).tolist()
        self.first = self._at[0] if self._at else NEVER

    def __call__(self, k: int) -> int:
        """Report the mark at arrival k; return the next mark's index."""
        i = self._i
        self._report(self._frac[i])
        i += 1
        self._i = i
        return self._at[i] if i < len(self._at) else NEVER


class Board:
    """Shares of their point done, one slot per running simulation, in shared memory: a
    worker forked after the board was installed writes its slot, the parent sums them."""

    def __init__(self, slots: int = 256):
        import multiprocessing as mp
        self._v = mp.Array("d", [-1.0] * (slots + 1))     # the last slot counts updates (tests)

    def claim(self) -> int | None:
        with self._v.get_lock():
            v = self._v.get_obj()
            for i in range(len(v) - 1):
                if v[i] < 0:
                    v[i] = 0.0
                    return i
        return None

    def set(self, slot: int, share: float) -> None:
        with self._v.get_lock():
            v = self._v.get_obj()
            v[slot] = min(max(share, 0.0), 1.0)
            v[-1] = max(v[-1], 0.0) + 1

    def release(self, slot: int) -> None:
        with self._v.get_lock():
            self._v.get_obj()[slot] = -1.0

    def running(self) -> float:
        """The running simulations' shares done, summed (0 when none runs)."""
        with self._v.get_lock():
            return float(sum(x for x in self._v.get_obj()[:-1] if x > 0))

    @property
    def updates(self) -> int:
        return int(max(self._v[-1], 0))


def new_board() -> Board | None:
    """A board, or None where shared memory cannot be had (the bar then counts points only)."""
    try:
        return Board()
    except (OSError, ImportError):
        return None


_board: Board | None = None


@contextmanager
def installed(board: Board):
    """Install `board` for this process and the pool workers it forks while installed."""
    global _board
    old, _board = _board, board
    try:
        yield board
    finally:
        _board = old


@contextmanager
def board_slot():
    """A callback writing this simulation's share done into the installed board, or None
    (no board, or no free slot)."""
    board = _board
    slot = board.claim() if board is not None else None
    if slot is None:
        yield None
        return
    try:
        yield lambda done, planned: board.set(slot, done / planned if planned else 0.0)
    finally:
        board.release(slot)


class Bar:
    """A rich progress bar with an ETA: `done(d, total)` sets what finished (a float, the
    running replication's share included); with a board, the running points' shares are
    added (polled four times a second)."""

    def __init__(self, unit: str, console, board: Board | None = None):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[pct]}"), TextColumn("{task.fields[count]} " + unit),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task("", total=None, count="", pct="")
        self.board, self._done, self._total, self._shown = board, 0.0, None, 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def describe(self, text: str, total: float | None = None) -> None:
        self._total = total if total is not None else self._total
        self.progress.update(self.task, description=text, total=self._total)
        self._show()

    def done(self, done: float, total: float | None = None) -> None:
        with self._lock:
            self._done = done
            if total is not None:
                self._total = total
        self._show()

    def _show(self) -> None:
        with self._lock:
            shown = self._done + (self.board.running() if self.board is not None else 0.0)
            if self._total:
                shown = min(shown, self._total)
            self._shown = max(self._shown, shown)     # a finished point may leave its slot first
            finished = int(self._done + 1e-9)
            count = f"{finished}/{self._total:g}" if self._total else f"{finished}"
            # floored: 100% only once everything is done
            pct = f"{int(100 * self._shown / self._total + 1e-9):>3d}%" if self._total else ""
            self.progress.update(self.task, completed=self._shown, total=self._total, count=count, pct=pct)

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            self._show()

    def __enter__(self) -> "Bar":
        self.progress.__enter__()
        if self.board is not None:
            threading.Thread(target=self._poll, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.progress.__exit__(*exc)
