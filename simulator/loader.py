"""Read a scenario file, apply `--set` overrides, validate once, report errors by line.

YAML is parsed with the safe loader only; its node tree is kept to map a pydantic error
location back to a line of the file. Before anything is built from it the tree is checked:
a key given twice is an error (YAML would keep the last silently), and nesting deeper than
MAX_DEPTH or aliases expanding past MAX_YAML_NODES values are refused. After validation,
`check_size` refuses a run that could not fit in this machine's memory.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import InputError
from .scenario import Scenario
from .tabular import read_text

_PATH_PREFIX = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)+): (.*)$", re.S)
MAX_DEPTH = 64                  # nesting levels of a YAML document
MAX_YAML_NODES = 1_000_000      # values in a document, aliases expanded


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Load and validate a scenario file; overrides are `dotted.path=value` strings."""
    path = Path(path)
    source = str(path)
    data, root = read_yaml(path, "scenario file")
    if not isinstance(data, dict):
        raise InputError("a scenario must be a YAML mapping", source, line=1)
    if "base" in data:       # one line, not one per scenario field the sweep file lacks
        raise InputError("is a sweep file (it has `base:`), not a scenario; sweep files run with "
                         "`simrec sweep`", source, "base", _line_of(root, ["base"]))

    overridden = []
    for item in overrides:
        keys, value = parse_override(item)
        set_path(data, keys, value, item)
        overridden.append(keys)

    resolve_paths(data, path.parent)
    scenario = validate(data, source, root, overridden)
    try:
        check_size(scenario)
    except InputError as e:
        raise _located(e, source, root, overridden) from None
    return scenario


def read_yaml(path: Path, what: str) -> tuple[Any, yaml.Node | None]:
    """A YAML file's data and node tree, through the guarded reader and the tree checks."""
    return parse_yaml(read_text(path, what), str(path))


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Safe-load one document, checking its tree before constructing anything from it."""
    loader = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        if root is None:
            return None, None
        check_tree(root, source)
        return loader.construct_document(root), root
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}", source, line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise InputError(f"invalid YAML: nested too deeply (the limit is {MAX_DEPTH} levels)",
                         source) from None
    except (ValueError, OverflowError) as e:      # e.g. a 5,000-digit integer, a bad date
        raise InputError(f"invalid YAML: {str(e).splitlines()[0]}", source) from None
    finally:
        if loader is not None:
            loader.dispose()


class _Loader(yaml.SafeLoader):
    """The safe loader, stopping at MAX_DEPTH while composing (long before Python's
    recursion limit, whose RecursionError takes seconds to unwind), and reading numbers as
    YAML 1.2 does (`40e9` and `1e-3` are floats; YAML 1.1 wants a dot)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested too deeply (the limit is {MAX_DEPTH} levels)",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def check_tree(root: yaml.Node, source: str) -> None:
    """Duplicate keys, depth and expanded size, without recursion (aliases share nodes, so
    each node's expanded size is memoised; a node met again below itself is a cycle)."""
    sizes: dict[int, tuple[int, int]] = {}        # id -> (expanded values, height)
    open_ids: set[int] = set()
    stack: list[tuple[yaml.Node, int, list[str], bool]] = [(root, 1, [], False)]
    while stack:
        node, depth, path, done = stack.pop()
        kids = _children(node)
        if done:
            open_ids.discard(id(node))
            size = 1 + sum(sizes[id(k)][0] for k, _ in kids)
            height = 1 + max((sizes[id(k)][1] for k, _ in kids), default=0)
            if size > MAX_YAML_NODES:
                raise _tree_error(f"expands to more than {MAX_YAML_NODES:,} values (YAML aliases?)",
                                  source, path, node)
            sizes[id(node)] = (size, height)
            continue
        if id(node) in sizes:
            if depth - 1 + sizes[id(node)][1] > MAX_DEPTH:
                raise _tree_error(f"nested too deeply (the limit is {MAX_DEPTH} levels)", source, path, node)
            continue
        if id(node) in open_ids:
            raise _tree_error("a YAML alias refers to itself (a recursive structure)", source, path, node)
        if depth > MAX_DEPTH:
            raise _tree_error(f"nested too deeply (the limit is {MAX_DEPTH} levels)", source, path, node)
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(node, source, path)
        open_ids.add(id(node))
        stack.append((node, depth, path, True))
        stack.extend((k, depth + 1, path + [name], False) for k, name in kids)


def _children(node: yaml.Node) -> list[tuple[yaml.Node, str]]:
    if isinstance(node, yaml.MappingNode):
        return [c for k, v in node.value for c in ((k, str(k.value)), (v, str(k.value)))]
    if isinstance(node, yaml.SequenceNode):
        return [(v, str(i)) for i, v in enumerate(node.value)]
    return []


def _check_duplicates(node: yaml.MappingNode, source: str, path: list[str]) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise InputError(f"duplicate key (also at line {seen[key.value]})", source,
                             ".".join(path + [key.value]), line)
        seen[key.value] = line


def _tree_error(message: str, source: str, path: list[str], node: yaml.Node) -> InputError:
    return InputError(message, source, ".".join(path) or None, node.start_mark.line + 1)


def _located(e: InputError, source: str, root: yaml.Node | None,
             overridden: list[list[str]] = ()) -> InputError:
    """A check's error (path known, file not) placed in the file, or on `--set`."""
    if e.source is not None:       # already names its own file (e.g. the trace)
        return e
    loc = e.path.split(".") if e.path else []
    if loc and any(loc[:len(k)] == k or k[:len(loc)] == loc for k in overridden):
        return InputError(e.message, "--set", e.path)
    line = _line_of(root, loc) if root is not None else None
    return InputError(e.message, source, e.path, line)


def validate(data: dict, source: str = "<scenario>", root: yaml.Node | None = None,
             overridden: list[list[str]] = ()) -> Scenario:
    """Validate a scenario mapping; every error becomes one line of one InputError (the
    first is its message, the rest `others`), each with its path and line."""
    data = with_byte_units(data, source, root, overridden)
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        errors, seen = [], set()
        for err in e.errors():
            one = _error_line(err, data, source, root, overridden)
            if str(one) not in seen:
                seen.add(str(one))
                errors.append(one)
        errors.sort(key=lambda x: (x.line is None, x.line or 0))   # file order (stable)
        first = errors[0]
        raise InputError(first.message, first.source, first.path, first.line,
                         tuple(errors[1:])) from None


def _error_line(err: dict, data: dict, source: str, root, overridden) -> InputError:
    raw = [str(p) for p in err["loc"]]
    loc = _drop_union_tags(data, raw)
    message = _message(err)
    m = _PATH_PREFIX.match(message)
    if not loc and m:  # cross-field check that names its own path
        loc, message = m.group(1).split("."), m.group(2)
    if err["type"] == "extra_forbidden":
        message = _unknown_key(raw, loc[-1])
    stage = _misspelt_stage(data, loc)
    if stage is not None:
        loc, message = ["stages", stage[0]], f"unknown stage {stage[0]!r}; did you mean {stage[1]!r}?"
    named = re.search(r"no stage named '([^']*)'", message)
    if named:
        message += _did_you_mean(named.group(1), (data.get("stages") or {}).keys())
    n = len(loc)
    if loc and any(loc[:len(k)] == k or k[:n] == loc for k in overridden):
        return InputError(message, "--set", ".".join(loc))
    line = _line_of(root, loc) if root is not None else None
    return InputError(message, source, ".".join(loc) or None, line)


def _did_you_mean(name: str, known) -> str:
    import difflib
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(raw_loc: list[str], key: str) -> str:
    """'unknown key', with the closest allowed key of the model the mapping belongs to."""
    fields = _model_fields(raw_loc[:-1])
    return f"unknown key {key!r}" + (_did_you_mean(key, fields) if fields else "")


def _model_fields(raw_loc: list[str]) -> list[str]:
    """The field names of the pydantic model at a pydantic error location (discriminator
    tags included), or [] where the walk cannot tell."""
    import typing
    from pydantic import BaseModel
    tp: Any = Scenario
    for part in raw_loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return []
            tp = field.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is typing.Union:
            members = [m for m in map(_unwrap, typing.get_args(tp))
                       if isinstance(m, type) and issubclass(m, BaseModel)
                       and "kind" in m.model_fields
                       and part in typing.get_args(m.model_fields["kind"].annotation)]
            if not members:
                return []
            tp = members[0]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp):
    """Strip Annotated and Optional."""
    import typing
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union and type(None) in typing.get_args(tp):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        else:
            return tp


def _misspelt_stage(data: dict, loc: list[str]) -> tuple[str, str] | None:
    """A stage with no service whose name is close to another stage's: a typo (most often
    in --set), reported as such instead of as its missing fields."""
    stages = data.get("stages")
    if len(loc) < 2 or loc[0] != "stages" or not isinstance(stages, dict):
        return None
    name = loc[1]
    entry = stages.get(name)
    if not isinstance(entry, dict) or "service" in entry:
        return None
    hint = _did_you_mean(name, [k for k, v in stages.items() if k != name and isinstance(v, dict)
                                and "service" in v])
    return (name, hint[len("; did you mean '"):-2]) if hint else None


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BYTE_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def with_byte_units(data: Any, source: str = "<scenario>", root=None, overridden=(),
                    path: tuple = ()) -> Any:
    """Byte sizes may carry units: a string value of a key ending in `_bytes` ("40GB",
    "512 MiB", "1.5TB") becomes an integer number of bytes. Returns a copy where needed."""
    if isinstance(data, dict):
        out = None
        for k, v in data.items():
            if isinstance(v, str) and str(k).endswith("_bytes"):
                new = _byte_size(v, source, root, overridden, [*path, str(k)])
            else:
                new = with_byte_units(v, source, root, overridden, (*path, str(k)))
            if new is not v:
                out = dict(data) if out is None else out
                out[k] = new
        return data if out is None else out
    if isinstance(data, list):
        new = [with_byte_units(v, source, root, overridden, (*path, str(i))) for i, v in enumerate(data)]
        return data if all(a is b for a, b in zip(new, data)) else new
    return data


def _byte_size(text: str, source: str, root, overridden, loc: list[str]) -> Any:
    m = _BYTE_SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _BYTE_UNITS:
        message = (f"{text!r} is not a byte size (a number with an optional unit: B, kB, MB, "
                   f"GB, TB, KiB, MiB, GiB, TiB)")
        if any(loc[:len(k)] == k for k in overridden):
            raise InputError(message, "--set", ".".join(loc))
        raise InputError(message, source, ".".join(loc), _line_of(root, loc) if root is not None else None)
    value = float(m.group(1)) * _BYTE_UNITS[unit]
    return int(value) if value == int(value) and value < 2**63 else value


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise InputError(f"override {item!r} must look like path.to.field=value", "--set")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise InputError(f"override {item!r} has an empty path segment", "--set")
    if len(keys) > MAX_DEPTH:
        raise InputError(f"override path is nested too deeply (the limit is {MAX_DEPTH} levels)", "--set")
    try:
        value = parse_yaml(raw, "--set")[0] if raw.strip() else ""
    except InputError as e:
        if not e.message.startswith("invalid YAML") or "nested" in e.message:
            raise InputError(e.message, "--set", ".".join(keys)) from None
        value = raw                # not YAML: the text itself
    if isinstance(value, str):
        try:   # YAML 1.1 reads "1e3" as a string; on the command line it means a number
            number = float(value)
            value = number if math.isfinite(number) else value
        except ValueError:
            pass
    return keys, value


def set_path(data: dict, keys: list[str], value: Any, item: str = "") -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k) if isinstance(node, dict) else None
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise InputError(f"cannot set {'.'.join(keys)}: {'.'.join(keys[:i + 1])} is not a mapping",
                             "--set")
        node = nxt
    node[keys[-1]] = value


def get_path(data: dict, keys: list[str], source: str = "") -> Any:
    node = data
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            raise InputError(f"no field {'.'.join(keys[:i + 1])} in the scenario", source or None)
        node = node[k]
    return node


def with_overrides(scenario: Scenario, overrides: dict[str, Any]) -> Scenario:
    """A derived scenario (for sweeps): dotted-path overrides applied, validated again."""
    data = scenario.model_dump(mode="json")
    for key, value in overrides.items():
        set_path(data, key.split("."), copy.deepcopy(value))
    derived = validate(data, "<derived>", None, [k.split(".") for k in overrides])
    check_size(derived)
    return derived


def resolve_paths(data: dict, base: Path) -> None:
    """Make trace, table and profile paths absolute, relative to the scenario's folder.

    Anything of the wrong shape is left for validation to report."""
    workload = data.get("workload")
    arrivals = workload.get("arrivals") if isinstance(workload, dict) else None
    if isinstance(arrivals, dict) and isinstance(arrivals.get("path"), str) and arrivals["path"]:
        arrivals["path"] = _resolve(base, arrivals["path"])
    stages = data.get("stages")
    for stage in (stages.values() if isinstance(stages, dict) else ()):
        service = stage.get("service") if isinstance(stage, dict) else None
        for key in ("table", "fit_from", "profile"):
            ref = service.get(key) if isinstance(service, dict) else None
            if isinstance(ref, str) and ref and ("/" in ref or ref.endswith(".json") or key == "profile"):
                service[key] = _resolve(base, ref)
        more = service.get("overhead_from") if isinstance(service, dict) else None
        if isinstance(more, list):                     # kernels: more tables of the device
            service["overhead_from"] = [_resolve(base, r) if isinstance(r, str) and "/" in r else r
                                        for r in more]


def _resolve(base: Path, ref: str) -> str:
    try:
        return str((base / ref).resolve())
    except (OSError, RuntimeError, ValueError):      # a symlink loop, a NUL byte
        return ref


# ---------------------------------------------------------------- size check
BYTES_PER_REQUEST = 1024        # simulation state per request while a replication runs
BYTES_PER_RECORD = 16           # kept per request, replication and record column
MAX_SAMPLES = 1_000_000         # time-series samples per replication
BYTES_PER_SAMPLE = 400          # one node's row of the time series


def check_size(sc: Scenario) -> None:
    """Refuse, before it starts, a run that would not fit in this machine's memory or would
    take more than MAX_SAMPLES time-series samples (errors name a field path)."""
    n, length_ms = run_size(sc)
    dt = sc.run.sample_interval_ms
    if dt is not None and length_ms / dt > MAX_SAMPLES:
        raise InputError(f"{dt:g} ms over a {length_ms / 1000:.4g} s run gives "
                         f"{length_ms / dt:.3g} samples per replication (limit {MAX_SAMPLES:,}); "
                         f"use a larger interval", None, "run.sample_interval_ms")
    if dt is None and length_ms / 200 < 0.01:
        raise InputError(f"the arrivals span only {length_ms:.3g} ms, too short for the default "
                         f"sample interval (span / 200); set run.sample_interval_ms", None,
                         "run.sample_interval_ms")
    reps = sc.run.max_replications if sc.run.p99_halfwidth_rel is not None else sc.run.replications
    samples = 1.5 * (length_ms / dt if dt else 200)          # (1.5: the drain after the last arrival)
    need = (n * BYTES_PER_REQUEST + n * reps * BYTES_PER_RECORD * (2 + 3 * len(sc.stages))
            + (0 if _is_trace(sc) else 40 * sc.workload.users.count)
            + sum(200 * st.nodes.count * st.affinity.virtual_nodes for st in sc.stages.values()
                  if st.router.startswith("affinity"))
            + reps * samples * BYTES_PER_SAMPLE * sum(st.nodes.count for st in sc.stages.values()))
    have = available_memory()
    if have is not None and need > have:
        raise InputError(f"the run needs about {need / 1e9:.3g} GB of memory ({n:.3g} requests per "
                         f"replication, {reps} replications) but {have / 1e9:.3g} GB is available; "
                         f"shorten the run or lower the load", None, "run")


def run_size(sc: Scenario) -> tuple[float, float]:
    """(requests per replication, run length in ms), estimated from the scenario (a trace is
    read: it gives both exactly)."""
    run, w = sc.run, sc.workload
    if _is_trace(sc):
        return _trace_size(sc)
    rate = w.rate_qps * _mean_factor(w.arrivals, run.duration_s)
    if run.requests is not None:
        return float(run.requests), run.requests / rate * 1000
    return rate * run.duration_s, run.duration_s * 1000


def _trace_size(sc: Scenario) -> tuple[float, float]:
    """The trace rows a run replays, and when the last arrives; the warm-up must end before."""
    from .trace import read_trace
    run = sc.run
    arrival = read_trace(sc.workload.arrivals.path)[0]
    first = arrival[0]
    if run.duration_s is not None:
        arrival = arrival[arrival < run.duration_s * 1000]
    if run.requests is not None:
        arrival = arrival[:run.requests]
    if not len(arrival):
        raise InputError(f"no trace arrival is this early (the first is at {first / 1000:g} s)",
                         None, "run.duration_s")
    if run.warmup_s is not None and run.warmup_s * 1000 >= arrival[-1]:
        raise InputError(f"must be less than the trace's span ({arrival[-1] / 1000:g} s), or no "
                         f"request would be measured (got {run.warmup_s:g})", None, "run.warmup_s")
    return float(len(arrival)), float(arrival[-1])


def _is_trace(sc: Scenario) -> bool:
    return sc.workload.arrivals.kind == "trace"


def _mean_factor(arrivals, duration_s: float | None) -> float:
    """The arrival process's mean rate as a multiple of rate_qps (over the run, where its
    duration is given)."""
    if arrivals.kind == "burst":
        calm, burst = arrivals.mean_calm_s, arrivals.mean_burst_s
        return (calm + arrivals.burst_factor * burst) / (calm + burst)
    if arrivals.kind == "piecewise" and duration_s is not None:
        steps = arrivals.steps
        ends = [*(s.start_s for s in steps[1:]), math.inf]
        spans = [max(0.0, min(e, duration_s) - s.start_s) for s, e in zip(steps, ends)]
        return max(sum(s.factor * t for s, t in zip(steps, spans)) / duration_s, 1e-6)
    return 1.0


def available_memory() -> int | None:
    """Bytes this process could still allocate: MemAvailable, within a cgroup's limit."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            have = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            have = room if have is None else min(have, room)
    except (OSError, ValueError):
        pass
    return have


def _drop_union_tags(data: Any, loc: list[str]) -> list[str]:
    """Pydantic puts the discriminator value in the location; the YAML has no such key."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = None
    return out


def _line_of(root: yaml.Node, loc: list[str]) -> int | None:
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _message(err: dict) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound:g} (got {got!r})"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {got!r})"
    if kind == "union_tag_invalid":
        return f"kind must be one of {ctx.get('expected_tags')} (got {ctx.get('tag')!r})"
    if kind == "union_tag_not_found":
        return "needs a 'kind' field"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if got is not None and not isinstance(got, (dict, list)):
        return f"{msg} (got {got!r})"
    return msg
