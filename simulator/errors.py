"""The one error type the library raises for bad input.

The CLI turns it into a single line and exit status 1; a notebook user sees the same
line as the exception message.
"""

from __future__ import annotations

from contextlib import contextmanager


class InputError(Exception):
    """Bad user input: a scenario, trace, cost table or override.

    `source` is the file (or `--set` for overrides), `path` the dotted field path inside
    it and `line` the 1-based line, where known.
    """

    def __init__(self, message: str, source: str | None = None, path: str | None = None,
                 line: int | None = None, others: tuple["InputError", ...] = ()):
        self.message = message
        self.source = source
        self.path = path
        self.line = line
        self.others = tuple(others)      # further errors of the same input, a line each
        super().__init__(str(self))

    def __reduce__(self):
        """Keep the fields when the error crosses a process boundary (pool workers)."""
        return (type(self), (self.message, self.source, self.path, self.line, self.others))

    def one_line(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "")
        prefix = " ".join(p for p in (where, self.path) if p)
        text = f"{prefix}: {self.message}" if prefix else self.message
        return text.replace("\n", "\\n")     # always one line (a path may hold a newline)

    def __str__(self) -> str:
        return "\n".join([self.one_line(), *(o.one_line() for o in self.others)])


@contextmanager
def malformed(source: str):
    """Reading back a file simrec wrote (summary.json, sweep.json, capacity.json), which a
    user may have edited: a missing field or one of the wrong type is one InputError line
    naming the file, not an internal error."""
    try:
        yield
    except KeyError as e:
        raise InputError(f"missing field {e.args[0]!r}", source) from None
    except (TypeError, AttributeError, IndexError) as e:
        raise InputError(f"a field has the wrong type or shape ({e})", source) from None
