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
from anychip.bench.report.table import LEFT_ALIGNED, columns, notes, title
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


def load(path: str) -> dict:
    """Read and validate a saved document; ValueError (one line) when it is not one."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if isinstance(doc, dict) and doc.get("kind") == schema.KIND and doc.get("schema_version") != schema.SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema_version {doc.get('schema_version')!r}; this anychip reads version {schema.SCHEMA_VERSION}"
        )
    errors = schema.validate(doc)
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
    "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "tokens_per_step", "tokens_per_s", "samples_per_s",
    "flops_per_token", "peak_flops", "mfu", "peak_memory_bytes", "memory_source", "final_loss",
    "parity_reference", "parity_max_rel_diff", "parity_first_step_over", "usd_per_device_hour", "usd_per_hour",
    "usd_per_million_tokens", "versions", "world_size", "parallel", "nodes", "scaling_efficiency",
)


def csv_record(row: dict) -> dict:
    st, mem, par, price = row["step_time_s"] or {}, row["memory"] or {}, row["parity"] or {}, row["price"] or {}
    flat = {k: row[k] for k in CSV_FIELDS if k in row}
    flat.update(
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


def markdown(doc: dict) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    m = doc["machine"]
    lines = [
        f"## {esc(title(doc))}",
        "",
        f"{esc(m['hostname'])}: {esc(m['cpu'])} ({m['cpu_count']} CPUs), {esc(m['os'])}, Python {m['python']}; "
        f"started {doc['started_at']}{' (interrupted)' if doc['interrupted'] else ''}; "
        f"`{esc(' '.join(doc['command']))}`",
        "",
        "| " + " | ".join(h for h, _ in columns(doc)) + " |",
        "|" + "|".join("---" if h in LEFT_ALIGNED else "---:" for h, _ in columns(doc)) + "|",
    ]
    for r in doc["rows"]:
        lines.append("| " + " | ".join(esc(cell(r)) for _, cell in columns(doc)) + " |")
    lines.append("")
    lines += [f"- {esc(n)}" for n in notes(doc)]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict, path: str) -> None:
    with open(path, "w") as fh:
        fh.write(markdown(doc))
