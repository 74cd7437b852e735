"""The ``anychip bench`` JSON document: its schema, and a validator for it.

The schema is written in the JSON Schema vocabulary (draft 2020-12) so other tools can read
it (``anychip bench --print-schema``), but only the keywords listed in :data:`KEYWORDS` are
used; :func:`validate` implements exactly those and refuses any other, so the schema can
never rely on a check that silently does not happen. No ``jsonschema`` dependency.

Versioning: ``schema_version`` is an integer. Adding an optional field keeps it; renaming,
removing or changing the meaning of a field bumps it, and ``anychip bench compare`` refuses
documents of a version it does not know. Version 2: step time and tokens/s come from
``repeat`` timed windows (``window_step_s``, ``tokens_per_s_interval``); version 1 took tokens/s
from one throughput window and step time from per-step synchronised ``step_times_s``, which
version 2 no longer writes (:func:`anychip.bench.report.load` reads both).
"""

from __future__ import annotations

import math
import re

SCHEMA_VERSION = 2
KIND = "anychip-bench"

KEYWORDS = frozenset(
    {"$schema", "$id", "title", "description", "type", "properties", "required", "additionalProperties",
     "items", "enum", "const", "minimum", "pattern", "minItems", "maxItems"}
)

_num = {"type": "number"}
_num_or_null = {"type": ["number", "null"]}
_nonneg_or_null = {"type": ["number", "null"], "minimum": 0}
_int_or_null = {"type": ["integer", "null"], "minimum": 0}
_str_map = {"type": "object", "additionalProperties": {"type": "string"}}
_interval = {
    "type": ["array", "null"], "items": {"type": "number", "minimum": 0}, "minItems": 2, "maxItems": 2,
    "description": "[p10, p90] over the timed windows",
}


def _object(properties: dict, *, optional: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in properties if k not in optional],
        "additionalProperties": False,
    }


LAYOUT = _object(
    {
        "engine": {"type": ["string", "null"]},
        "world_size": {"type": "integer", "minimum": 1},
        "rank": {"type": "integer", "minimum": 0},
        "local_rank": {"type": "integer", "minimum": 0},
        "local_world_size": {"type": "integer", "minimum": 1},
        "coordinator": {"type": ["string", "null"]},
        "nodes": {"type": "integer", "minimum": 1},
    }
)
LAYOUT = {**LAYOUT, "type": ["object", "null"], "description": "rank 0's place in the run (anychip.distributed.Layout)"}

# Optional row fields added after version 1 was first written (a document without them reads
# as one process: world_size 1, no parallel mode, no scaling efficiency).
SCALING_FIELDS = ("world_size", "parallel", "layout", "scaling_efficiency", "cpu_threads")

ROW = _object(
    {
        "backend": {"type": "string", "pattern": r"^\S+$"},
        "world_size": {
            "type": "integer",
            "minimum": 1,
            "description": "processes of the run (--nproc; > 1: torchrun, one rank each); a row is identified by backend and world_size",
        },
        "parallel": {"enum": [None, "ddp", "fsdp"], "description": "TrainStep(parallel=...) of a world_size > 1 row"},
        "layout": LAYOUT,
        "status": {"enum": ["ok", "failed", "crashed", "timeout", "interrupted", "unavailable", "skipped"]},
        "error": {"type": ["string", "null"]},
        "device_kind": {"type": "string"},
        "devices": _int_or_null,
        "devices_used": _int_or_null,
        "versions": _str_map,
        "precision": {"type": "string"},
        "startup_s": _nonneg_or_null,
        "setup_s": _nonneg_or_null,
        "first_step_s": _nonneg_or_null,
        "warmup_s": _nonneg_or_null,
        "warmup_steps": {"type": "integer", "minimum": 0},
        "steps": {"type": "integer", "minimum": 0, "description": "timed steps in all: repeat windows x --steps"},
        "batch": _int_or_null,
        "seq": _int_or_null,
        "repeat": {"type": ["integer", "null"], "minimum": 1, "description": "timed windows (of --steps steps each)"},
        "window_step_s": {
            "type": "array", "items": {"type": "number", "minimum": 0},
            "description": "seconds per step of each timed window (one synchronisation before it, one at its end)",
        },
        "step_time_s": {
            "type": ["object", "null"],
            "description": "median, p10, p90, mean, min, max of window_step_s (version 1: of step_times_s)",
            "properties": {k: {"type": "number", "minimum": 0} for k in ("median", "p10", "p90", "mean", "min", "max")},
            "required": ["median", "p10", "p90", "mean", "min", "max"],
            "additionalProperties": False,
        },
        "step_times_s": {
            "type": "array", "items": {"type": "number", "minimum": 0}, "description": "version 1 only: per-step synchronised times",
        },
        "tokens_per_step": _int_or_null,
        "samples_per_step": _int_or_null,
        "tokens_per_s": {**_nonneg_or_null, "description": "tokens_per_step / median of window_step_s"},
        "tokens_per_s_interval": _interval,
        "samples_per_s": _nonneg_or_null,
        "samples_per_s_interval": _interval,
        "flops_per_token": _nonneg_or_null,
        "peak_flops": _nonneg_or_null,
        "peak_flops_source": {"type": ["string", "null"]},
        "mfu": _nonneg_or_null,
        "memory": {
            "type": ["object", "null"],
            "properties": {"peak_bytes": _int_or_null, "current_bytes": _int_or_null, "source": {"type": "string"}},
            "required": ["peak_bytes", "current_bytes", "source"],
            "additionalProperties": False,
        },
        "losses": {"type": "array", "items": _num_or_null, "description": "every step's loss, warm-up included; null = not finite"},
        "final_loss": _num_or_null,
        "parity": {
            "type": ["object", "null"],
            "properties": {
                "reference": {"type": "string"},
                "tolerance": {"type": "number", "minimum": 0},
                "steps_compared": {"type": "integer", "minimum": 0},
                "max_rel_diff": _nonneg_or_null,
                "first_step_over": {"type": ["integer", "null"], "minimum": 1},
            },
            "required": ["reference", "tolerance", "steps_compared", "max_rel_diff", "first_step_over"],
            "additionalProperties": False,
        },
        "price": {
            "type": ["object", "null"],
            "properties": {"usd_per_device_hour": {"type": "number", "minimum": 0}, "source": {"type": "string"}},
            "required": ["usd_per_device_hour", "source"],
            "additionalProperties": False,
        },
        "usd_per_hour": _nonneg_or_null,
        "usd_per_million_tokens": _nonneg_or_null,
        "scaling_efficiency": {
            "type": ["number", "null"], "minimum": 0,
            "description": "tokens_per_s / (world_size x tokens_per_s of the world_size 1 row of the same backend); null at world_size 1",
        },
        "cpu_threads": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "intra-op threads per process of a torch CPU row (torch.get_num_threads())",
        },
        "wall_s": _nonneg_or_null,
        "log_tail": {"type": "array", "items": {"type": "string"}},
        "throughput_window": {
            "type": ["object", "null"],
            "properties": {"steps": {"type": "integer", "minimum": 1}, "seconds": {"type": "number", "minimum": 0}},
            "required": ["steps", "seconds"],
            "additionalProperties": False,
        },
    },
    optional=("step_times_s", "throughput_window", *SCALING_FIELDS),
)

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/anychip/anychip/bench/schema/2",
    "title": "anychip bench results",
    **_object(
        {
            "kind": {"const": KIND},
            "schema_version": {"const": SCHEMA_VERSION},
            "anychip_version": {"type": "string"},
            "command": {"type": "array", "items": {"type": "string"}},
            "started_at": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"},
            "finished_at": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"},
            "interrupted": {"type": "boolean"},
            "machine": _object(
                {
                    "hostname": {"type": "string"},
                    "cpu": {"type": "string"},
                    "cpu_count": _int_or_null,
                    "os": {"type": "string"},
                    "python": {"type": "string"},
                    "load": {
                        "type": "object",
                        "properties": {"cores": {"type": "integer", "minimum": 1}, "max_1min": {"type": "number", "minimum": 0}},
                        "required": ["cores", "max_1min"],
                        "additionalProperties": False,
                        "description": "the highest 1-minute load average seen before and after each row, and the CPU count",
                    },
                },
                optional=("load",),
            ),
            "config": _object(
                {
                    "workload": {"type": "string"},
                    "backends": {"type": "array", "items": {"type": "string"}},
                    "selection": {"type": "string"},
                    "steps": {"type": "integer", "minimum": 1},
                    "warmup": {"type": "integer", "minimum": 1},
                    "batch": _int_or_null,
                    "seq": _int_or_null,
                    "precision": {"type": "string"},
                    "kernels": {"enum": ["auto", "reference"]},
                    "seed": {"type": "integer"},
                    "timeout_s": {"type": "number", "minimum": 0},
                    "parity_tolerance": {"type": "number", "minimum": 0},
                    "reference": {"type": "string", "description": "--reference: the backend every row's loss parity is against"},
                    "repeat": {"type": "integer", "minimum": 1, "description": "--repeat: timed windows of --steps steps per row"},
                    "prices_as_of": {"type": "string"},
                    "price_overrides": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                    "peak_tflops": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                    "nproc": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1},
                        "description": "--nproc: process counts, each backend row once per count",
                    },
                    "parallel": {"enum": [None, "ddp", "fsdp"], "description": "--parallel of the nproc > 1 rows"},
                    "one_process_backends": {
                        "type": "array", "items": {"type": "string"},
                        "description": "backends run only at nproc 1 (jax:* drives every local device from one process)",
                    },
                },
                optional=("nproc", "parallel", "one_process_backends", "reference"),
            ),
            "rows": {"type": "array", "items": ROW},
            "warnings": {"type": "array", "items": {"type": "string"}, "description": "one line per reason to distrust the figures"},
        },
        optional=("warnings",),
    ),
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(doc, schema: dict | None = None, path: str = "$") -> list[str]:
    """Every way ``doc`` breaks ``schema`` (default: :data:`SCHEMA`), as ``"path: problem"``
    strings; an empty list means valid."""
    schema = SCHEMA if schema is None else schema
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path} uses unsupported keyword(s) {sorted(unknown)}")
    errors: list[str] = []
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](doc) for t in allowed):
            return [f"{path}: expected {' or '.join(allowed)}, got {_describe(doc)}"]
    if "const" in schema and doc != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {doc!r}")
    if "enum" in schema and doc not in schema["enum"]:
        errors.append(f"{path}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](doc) and doc < schema["minimum"]:
        errors.append(f"{path}: {doc!r} is below the minimum {schema['minimum']}")
    if "minItems" in schema and isinstance(doc, list) and len(doc) < schema["minItems"]:
        errors.append(f"{path}: {len(doc)} item(s), fewer than {schema['minItems']}")
    if "maxItems" in schema and isinstance(doc, list) and len(doc) > schema["maxItems"]:
        errors.append(f"{path}: {len(doc)} item(s), more than {schema['maxItems']}")
    if "pattern" in schema and isinstance(doc, str) and not re.search(schema["pattern"], doc):
        errors.append(f"{path}: {doc!r} does not match {schema['pattern']!r}")
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in doc:
                errors.append(f"{path}: missing required field {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _describe(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"non-finite number {value}"
    return type(value).__name__ if value is not None else "null"
