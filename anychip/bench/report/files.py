"""The files ``anychip bench`` writes, and the document they are rendered from.

The JSON document is the record (schema in :mod:`anychip.bench.schema`); CSV and Markdown are
rendered from it, so a saved JSON can be re-rendered or compared later (:func:`load`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import socket

from anychip.backends.facts.host import cpu_name
from anychip.bench import schema
from anychip.bench.metrics import row_world_size
from anychip.bench.report.cells import columns, title
from anychip.bench.report.footer import notes
from anychip.version import __version__


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def machine() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def document(*, command: list[str], started_at: str, config: dict, rows: list[dict], interrupted: bool) -> dict:
    doc = {
        "kind": schema.KIND,
        "schema_version": schema.SCHEMA_VERSION,
        "anychip_version": __version__,
        "command": list(command),
        "started_at": started_at,
        "finished_at": now_iso(),
        "interrupted": interrupted,
        "machine": machine(),
        "config": config,
        "rows": rows,
    }
    return doc


# :func:`load` reads this anychip's schema version and version 1. A version-1 document lacks the
# fields below, and the renderers fall back where they are absent (no timed windows: the spread
# comes from per-step times; no load, warnings or configured parity reference: no such line).
ADDED_SINCE_V1 = frozenset({"repeat", "window_step_s", "tokens_per_s_interval", "samples_per_s_interval", "load", "warnings", "reference"})


def readable_versions() -> list[int]:
    return sorted({1, schema.SCHEMA_VERSION})


def _errors(doc) -> list[str]:
    """What makes ``doc`` unreadable: :func:`schema.validate`; an older readable version is
    checked as this one, except for the fields added since."""
    if not isinstance(doc, dict) or doc.get("kind") != schema.KIND or doc.get("schema_version") == schema.SCHEMA_VERSION:
        return schema.validate(doc)
    errors = schema.validate({**doc, "schema_version": schema.SCHEMA_VERSION})
    added = tuple(f"missing required field {name!r}" for name in ADDED_SINCE_V1)
    return [e for e in errors if not e.endswith(added)]


def load(path: str) -> dict:
    """Read and validate a saved document; ValueError (one line) when it is not one."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a bench result (--json FILE)")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and doc.get("kind") == schema.KIND and version not in readable_versions():
        readable = ", ".join(map(str, readable_versions()))
        raise ValueError(f"{path} has schema_version {version!r}; this anychip reads version(s) {readable}")
    errors = _errors(doc)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(f"{path} is not an anychip bench result: {errors[0]}{more}")
    return doc


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2, allow_nan=False)
        fh.write("\n")


CSV_FIELDS = (
    "backend", "status", "error", "device_kind", "devices", "devices_used", "precision", "batch", "seq",
    "startup_s", "setup_s", "first_step_s", "warmup_s", "warmup_steps", "steps",
    "repeat", "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "tokens_per_step", "tokens_per_s",
    "tokens_per_s_p10", "tokens_per_s_p90", "samples_per_s",
    "flops_per_token", "peak_flops", "mfu", "peak_memory_bytes", "memory_source", "final_loss",
    "parity_reference", "parity_max_rel_diff", "parity_first_step_over", "usd_per_device_hour", "usd_per_hour",
    "usd_per_million_tokens", "versions", "world_size", "parallel", "nodes", "scaling_efficiency",
)


def csv_record(row: dict) -> dict:
    st, mem, par, price = row["step_time_s"] or {}, row["memory"] or {}, row["parity"] or {}, row["price"] or {}
    interval = row.get("tokens_per_s_interval") or (None, None)
    flat = {k: row[k] for k in CSV_FIELDS if k in row}
    flat.update(
        tokens_per_s_p10=interval[0], tokens_per_s_p90=interval[1],
        step_time_median_s=st.get("median"), step_time_p10_s=st.get("p10"), step_time_p90_s=st.get("p90"),
        peak_memory_bytes=mem.get("peak_bytes"), memory_source=mem.get("source"),
        parity_reference=par.get("reference"), parity_max_rel_diff=par.get("max_rel_diff"),
        parity_first_step_over=par.get("first_step_over"), usd_per_device_hour=price.get("usd_per_device_hour"),
        versions=";".join(f"{k}={v}" for k, v in row["versions"].items()),
        world_size=row_world_size(row), nodes=(row.get("layout") or {}).get("nodes"),
    )
    return {k: ("" if flat.get(k) is None else flat[k]) for k in CSV_FIELDS}


def write_csv(doc: dict, path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in doc["rows"]:
            writer.writerow(csv_record(row))


def markdown(doc: dict, wide: bool = False) -> str:
    """The table as Markdown: the columns of the terminal table (compact, or every one with
    ``wide``) and its footer, ``|`` escaped so a cell cannot split the table."""
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    m, cols = doc["machine"], columns(doc, wide)
    lines = [
        f"## {esc(title(doc))}",
        "",
        f"{esc(m['hostname'])}: {esc(m['cpu'])} ({m['cpu_count']} CPUs), {esc(m['os'])}, Python {m['python']}; "
        f"started {doc['started_at']}{' (interrupted)' if doc['interrupted'] else ''}; "
        f"`{esc(' '.join(doc['command']))}`",
        "",
        "| " + " | ".join(esc(c.header) for c in cols) + " |",
        "|" + "|".join("---" if c.left else "---:" for c in cols) + "|",
    ]
    for r in doc["rows"]:
        lines.append("| " + " | ".join(esc(c.cell(r)) for c in cols) + " |")
    lines.append("")
    lines += [f"- {esc(n)}" for n in notes(doc)]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict, path: str, wide: bool = False) -> None:
    with open(path, "w") as fh:
        fh.write(markdown(doc, wide))
