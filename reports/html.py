"""HTML building blocks: number formatting, tables, embedded figures, the page shell.

The page is one self-contained file: inline CSS, PNGs as base64 data URIs, no scripts and
no external links. Every piece of text from a results folder is escaped.
"""

from __future__ import annotations

import base64
import math
import numbers
from dataclasses import dataclass
from html import escape

import yaml

MISSING = "—"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
td.fail { color: #b03a2e; font-weight: 600; } td.pass { color: #1e8449; }
td.undecided { color: #b9770e; }
td.text { text-align: left; white-space: normal; word-break: break-all; }
.note { background: #fff8e1; border-left: 4px solid #f4d03f; padding: 0.4em 0.8em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.scroll { overflow-x: auto; }
"""


@dataclass(frozen=True)
class Plot:
    """One rendered figure: `name` is the file stem under plots/."""

    name: str
    caption: str
    png: bytes


def num(x, unit: str = "") -> str:
    """A number with precision that suits its size: 1,234 / 123 / 12.3 / 1.23 / 0.123."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return MISSING if x is None else str(x)
    x = int(x) if isinstance(x, numbers.Integral) else float(x)
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    a = abs(x)
    if isinstance(x, int) or a >= 1000:
        s = f"{x:,.0f}"
    elif a >= 100:
        s = f"{x:.0f}"
    elif a >= 10:
        s = f"{x:.1f}"
    elif a >= 1 or a == 0:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}" if unit else s


def count(x) -> str:
    """A count, or a mean count per replication: whole numbers without decimals."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and float(x).is_integer():
        return f"{int(x):,}"
    return num(x)


def pct(x) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return MISSING
    return f"{100 * x:.1f}%"


def with_ci(mean, lo=None, hi=None, fmt=num) -> str:
    """`mean [lo, hi]`, or just the mean when the interval is unknown (one replication)."""
    if lo is None or hi is None or any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def metric_ci(node: dict | None, fmt=num) -> str:
    """Format a summary metric object {mean, lo, hi, replications}."""
    if not node:
        return MISSING
    return with_ci(node.get("mean"), node.get("lo"), node.get("hi"), fmt)


def table(headers: list[str], rows: list[list], cell_class=None) -> str:
    """An HTML table; `cell_class(row_index, col_index)` may return a CSS class."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            cls = cell_class(i, j) if cell_class else None
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{escape(str(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure id="{escape(plot.name)}"><img alt="{escape(plot.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(plot.caption)} '
            f"(plots/{escape(plot.name)}.png)</figcaption></figure>")


def yaml_block(obj) -> str:
    text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"<pre>{escape(text)}</pre>"


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def paragraph(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{escape(text)}</p>"


def page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    """The whole document; `sections` are (heading, already-escaped HTML body)."""
    body = "".join(f"<h2>{escape(h)}</h2>\n{b}\n" for h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n{paragraph(subtitle, 'sub')}\n{body}</body>\n</html>\n")
