"""The events a measuring child sends the bench, and the one check every event goes through.

One JSON object per line on the row's UNIX socket (the protocol is described in
:mod:`anychip.bench.measure`). The parent trusts nothing that arrives there: the backend may be a
third-party plug-in, a library may write on a descriptor that is not its own, a process may die
in the middle of a line. :func:`parse` returns an event only when it has the shape its kind
promises (every key the parent reads, of the type it reads it as), so no code after it meets a
missing key or a string where a row should be; anything else is one short reason, and the row
fails with it instead of the whole run.
"""

from __future__ import annotations

import json
import math

# An event line may be this long (bytes): a result row of 100k steps is a few MB.
MAX_LINE = 16 << 20


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:  # JSON writes no NaN or infinity (the report files refuse them)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shape(fields: dict):
    """A check that a value is an object with exactly these checked keys."""
    return lambda v: isinstance(v, dict) and v.keys() == fields.keys() and all(_CHECKS[c](v[k]) for k, c in fields.items())


_CHECKS = {
    "null": lambda v: v is None,
    "int": _int,
    "count": lambda v: _int(v) and v >= 1,
    "number": _number,
    "positive": lambda v: _number(v) and v > 0,
    "str": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "phase": lambda v: v in ("warmup", "timed"),
    "str map": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    # a diverged step's loss is NaN or infinite, which the row records as null
    "losses": lambda v: isinstance(v, list) and all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v),
    "step times": lambda v: isinstance(v, list) and len(v) > 0 and all(_number(x) and x > 0 for x in v),
    # anychip.distributed.Layout.as_dict(): the report reads every one of these keys
    "layout": lambda v: isinstance(v, dict) and set(LAYOUT_KEYS) <= set(v)
    and all(x is None or isinstance(x, str) or _int(x) for x in v.values()),
}
LAYOUT_KEYS = ("engine", "world_size", "rank", "local_rank", "local_world_size", "coordinator", "nodes")
_CHECKS["memory"] = _shape({"peak_bytes": "int|null", "current_bytes": "int|null", "source": "str"})
for _alternatives in ("int|null", "str|null", "number|null", "object|null", "layout|null"):
    _CHECKS[_alternatives] = lambda v, _names=_alternatives.split("|"): any(_CHECKS[n](v) for n in _names)

# Every kind, with each key the parent reads and the check its value must pass.
EVENTS = {
    "ready": {"device_kind": "str|null", "devices": "int|null", "versions": "str map", "layout": "layout|null"},
    "step": {"phase": "phase", "done": "int", "total": "int"},
    "result": {"row": "object"},
    "error": {"error": "str"},
}
# The measurement row of a "result" event: what metrics.finish_row reads, and what the report keeps.
ROW = {
    "device_kind": "str", "devices": "int|null", "devices_used": "count", "devices_per_process": "count",
    "world_size": "count", "parallel": "str|null", "layout": "layout|null", "cpu_threads": "int|null",
    "versions": "str map", "setup_s": "number", "first_step_s": "number|null", "warmup_s": "number",
    "window_step_s": "step times", "window_steps": "count", "tokens_per_step": "int", "samples_per_step": "int",
    "batch": "int", "seq": "int", "flops_per_token": "number", "peak_flops": "number|null", "memory": "memory",
    "losses": "losses",
}

_JSON_TYPES = {list: "array", int: "number", float: "number", str: "string", bool: "boolean", type(None): "null"}


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problem(obj: dict, fields: dict[str, str], what: str) -> str | None:
    for key, check in fields.items():
        if key not in obj:
            return f"{what} without {key!r}"
        if not _CHECKS[check](obj[key]):
            return f"{what} has {key}={_brief(obj[key])}, expected {check}"
    return None


def parse(line: bytes) -> tuple[dict | None, str | None]:
    """``(event, None)`` for a well-formed event line, ``(None, reason)`` for anything else."""
    if len(line) > MAX_LINE:
        return None, f"a line of {len(line)} bytes (at most {MAX_LINE})"
    try:
        event = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(event, dict):
        return None, f"a JSON {_JSON_TYPES.get(type(event), 'value')}, not an object"
    kind = event.get("event")
    if not isinstance(kind, str) or kind not in EVENTS:
        return None, f"unknown event kind {_brief(kind)}"
    problem = _problem(event, EVENTS[kind], f"{kind!r} event")
    if problem is None and kind == "result":
        problem = _problem(event["row"], ROW, "result row")
    return (None, problem) if problem else (event, None)
