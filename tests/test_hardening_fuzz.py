"""Issue 14: fuzzing the scenario loader, the sweep-file loader and `--set`.

Valid files are mutated (keys dropped, types changed, inf, NaN, huge and deep values
inserted, bytes edited); every outcome must be a valid load or an InputError with a
one-line message, never another exception. 1,150 examples in all.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simrec
from simrec.errors import InputError
from simrec.sweep import check_metric, expand, load_spec

REPO = Path(__file__).resolve().parent.parent
BASES = [yaml.safe_load((REPO / "scenarios" / f).read_text())
         for f in ("mmc.yaml", "relay.yaml", "default.yaml", "helm.yaml")]
WORK = Path(tempfile.mkdtemp(prefix="simrec-fuzz-"))


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

NASTY = [math.inf, -math.inf, math.nan, 1e308, -1e308, 1e-300, 0, -1, 10**30, 2**63, True, False,
         None, "", "x", "1e3", ".inf", [], {}, [1, 2], {"kind": "none"}, "$x$", "../up", "a\nb",
         [[[[[[[[[[1]]]]]]]]]], {"a": {"a": {"a": {"a": {"a": 1}}}}}]


def deep(n: int):
    v: object = 1
    for _ in range(n):
        v = [v]
    return v


def paths(node, prefix=()):
    """Every (path) into a YAML tree, containers included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def mutate(data, path, how, value):
    data = copy.deepcopy(data)
    if not path:
        return value if how == "replace" else data
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if how == "drop":
        del parent[key]
    elif how == "replace":
        parent[key] = value
    elif how == "wrap":
        parent[key] = [parent[key]]
    elif how == "unknown" and isinstance(parent, dict):
        parent[f"{key}_x"] = value
    return data


def outcome(load) -> None:
    """A valid load, or an InputError of one line per error (each error's own text is one
    line; a scenario with several errors lists them all)."""
    try:
        load()
    except InputError as e:
        for one in (e, *e.others):
            assert "\n" not in one.one_line(), str(e)
        assert len(str(e).splitlines()) == 1 + len(e.others), str(e)


def write(text: str | bytes, name: str = "s.yaml") -> Path:
    f = WORK / name
    f.write_bytes(text) if isinstance(text, bytes) else f.write_text(text)
    return f


@st.composite
def mutated(draw):
    base = draw(st.sampled_from(BASES))
    all_paths = list(paths(base))
    out = base
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(all_paths))
        how = draw(st.sampled_from(["drop", "replace", "replace", "wrap", "unknown"]))
        value = draw(st.one_of(st.sampled_from(NASTY), st.floats(), st.integers(),
                               st.text(max_size=8), st.integers(60, 80).map(deep)))
        try:
            out = mutate(out, path, how, value)
        except (KeyError, IndexError, TypeError):
            pass
    return out


@fuzz(400)
@given(mutated())
def test_mutated_scenarios_load_or_fail_cleanly(data):
    text = yaml.safe_dump(data, allow_unicode=True) if not isinstance(data, str) else data
    outcome(lambda: simrec.load_scenario(write(text)))


TEXTS = [(REPO / "scenarios" / f).read_text() for f in ("mmc.yaml", "relay.yaml")]


@fuzz(300)
@given(st.sampled_from(TEXTS), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 40),
                                                  st.sampled_from(["", ":", "- ", "[", "]", "{", "}",
                                                                   "&a ", "*a", "!!", "\t", "\x00",
                                                                   "\n  ", "#", "'", '"', ".inf",
                                                                   "\xff", "\ufeff", "? "])),
                                        min_size=1, max_size=4))
def test_byte_edited_scenarios_load_or_fail_cleanly(text, edits):
    for pos, cut, insert in edits:
        pos = min(pos, len(text))
        text = text[:pos] + insert + text[pos + cut:]
    outcome(lambda: simrec.load_scenario(write(text.encode("utf-8", "surrogatepass"))))


FIELDS = [".".join(map(str, p)) for p in paths(BASES[1]) if p] + [
    "workload.rate_qps", "run.duration_s", "run.requests", "run.warmup_s", "run.sample_interval_ms",
    "stages.ranking.nodes.count", "name", "a..b", ".x", "stages.new.service.kind", "relay", "hbm"]


@fuzz(300)
@given(st.sampled_from(FIELDS),
       st.one_of(st.sampled_from(["inf", "-inf", "nan", "+inf", "1e308", "1e-300", "true", "yes", "null",
                                  "", "[", "{a: 1, a: 2}", "[" * 3000, "&a [*a]", "!!python/name:os.system",
                                  "0", "-1", "1e12", "0x10", "1_000", "'1'", "~"]),
                 st.text(max_size=12), st.floats().map(repr), st.integers().map(str)))
def test_set_overrides_load_or_fail_cleanly(field, value):
    path = REPO / "scenarios" / "relay.yaml"
    outcome(lambda: simrec.load_scenario(path, [f"{field}={value}"]))


SWEEP = {"base": str(REPO / "scenarios" / "mmc.yaml"), "x": "workload.rate_qps",
         "metric": "e2e.p99_ms", "slo_ms": 100,
         "grid": {"workload.rate_qps": [100, 200], "stages.server.nodes.count": [3, 4]},
         "variants": {"a": {}, "b": {"run.seed": 3}}, "set": {"run.requests": 500}}


def _sweep(data) -> None:
    spec, base = load_spec(write(yaml.safe_dump(data), "sw.yaml"))
    points = expand(base, spec)
    check_metric(spec.metric, [sc for _, sc in points], "sweep")


@fuzz(150)
@given(st.data())
def test_mutated_sweep_files_load_or_fail_cleanly(draw):
    path = draw.draw(st.sampled_from(list(paths(SWEEP))))
    how = draw.draw(st.sampled_from(["drop", "replace", "wrap", "unknown"]))
    value = draw.draw(st.one_of(st.sampled_from(NASTY), st.floats(), st.text(max_size=6)))
    try:
        data = mutate(SWEEP, path, how, value)
    except (KeyError, IndexError, TypeError):
        data = SWEEP
    outcome(lambda: _sweep(data))
