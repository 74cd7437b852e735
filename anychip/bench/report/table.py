"""The terminal table of ``anychip bench``: each column's cell text, the title, the notes under
the table, and the rich rendering. Markdown (:mod:`anychip.bench.report.files`) reuses the
same columns, title and notes, so the two never disagree."""

from __future__ import annotations

import os

from anychip.bench.metrics import row_label, row_world_size


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_parity(row: dict) -> str:
    p = row["parity"]
    if p is None:
        return "-"
    if p["reference"] == row_label(row):
        return "reference"
    worst = "inf" if p["max_rel_diff"] is None else f"{p['max_rel_diff']:.1e}"
    over = f", >tol at step {p['first_step_over']}" if p["first_step_over"] else ""
    return f"{worst}{over}"


def fmt_device(row: dict) -> str:
    if not row["device_kind"] and row["devices"] is None:
        return "-"
    used = row["devices_used"]
    count = f" x{used}" if used else ""
    seen = f" (of {row['devices']})" if row["devices"] and used and row["devices"] != used else ""
    return f"{row['device_kind'] or '?'}{count}{seen}"


def fmt_step(row: dict) -> str:
    s = row["step_time_s"]
    if s is None:
        return "-"
    return f"{s['median'] * 1e3:.2f} [{s['p10'] * 1e3:.2f}-{s['p90'] * 1e3:.2f}]"


def fmt_versions(row: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in row["versions"].items() if k not in ("python", "anychip"))


def fmt_procs(row: dict) -> str:
    world = row_world_size(row)
    return str(world) if world == 1 else f"{world} {row.get('parallel') or '?'}"


def fmt_scaling(row: dict) -> str:
    eff = row.get("scaling_efficiency")
    return "-" if eff is None else f"{eff * 100:.0f}%"


def fmt_layout(row: dict) -> str:
    """One line on how a multi-process row ran, from rank 0's layout."""
    lay, world = row.get("layout"), row_world_size(row)
    where = ""
    if lay:
        where = f"{lay['engine'] or 'no launcher'}, {lay['nodes']} node(s) x {lay['local_world_size']} process(es)"
        where += f", rendezvous {lay['coordinator']}" if lay.get("coordinator") else ""
        where += "; "
    batch = (
        f"; global batch {world} x {row['batch']} = {row['samples_per_step']} samples per step"
        if row["batch"] and row["samples_per_step"]
        else ""
    )
    return f"{row_label(row)}: {where}world size {world}, parallel={row.get('parallel')}{batch}"


def multi_process(doc: dict) -> bool:
    """Whether the run has rows of more than one process (the scaling columns are shown)."""
    return any(row_world_size(r) > 1 for r in doc["rows"]) or (doc["config"].get("nproc") or [1]) != [1]


# (header, cell) for the terminal table and Markdown; the JSON carries more.
COLUMNS = (
    ("backend", lambda r: r["backend"]),
    ("procs", fmt_procs),
    ("status", lambda r: r["status"]),
    ("device", fmt_device),
    ("compile+warm-up s", lambda r: _fmt(r["warmup_s"], ".2f")),
    ("step ms p50 [p10-p90]", fmt_step),
    ("tokens/s", lambda r: _fmt(r["tokens_per_s"], ",.0f")),
    ("samples/s", lambda r: _fmt(r["samples_per_s"], ",.1f")),
    ("MFU", lambda r: _fmt(None if r["mfu"] is None else r["mfu"] * 100, ".1f") + ("%" if r["mfu"] is not None else "")),
    ("peak mem", lambda r: fmt_bytes((r["memory"] or {}).get("peak_bytes"))),
    ("final loss", lambda r: _fmt(r["final_loss"], ".4f")),
    ("loss parity (max rel diff)", fmt_parity),
    ("USD / M tokens", lambda r: _fmt(r["usd_per_million_tokens"], ",.4g")),
    ("scaling eff.", fmt_scaling),
)
SCALING_COLUMNS = ("procs", "scaling eff.")
LEFT_ALIGNED = ("backend", "procs", "status", "device")


def columns(doc: dict) -> tuple:
    """The columns of this document: the process count and scaling efficiency only when some
    row ran on more than one process (a plain run's table is unchanged)."""
    return COLUMNS if multi_process(doc) else tuple(c for c in COLUMNS if c[0] not in SCALING_COLUMNS)


def title(doc: dict) -> str:
    c = doc["config"]
    shape = f"batch {c['batch']} x seq {c['seq']}" if c["batch"] and c["seq"] else "default batch"
    if multi_process(doc):
        shape = shape.replace("batch", "batch per process", 1)
        shape += f", {','.join(map(str, c.get('nproc') or [1]))} process(es) ({c.get('parallel') or 'ddp'})"
    return (
        f"anychip bench: {c['workload']}, {shape}, {c['precision']}, "
        f"{c['warmup']} warm-up + {c['steps']} timed steps, seed {c['seed']}"
    )


def notes(doc: dict) -> list[str]:
    """Lines under the table: why rows failed, what was measured how, library versions."""
    out = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            out.append(f"{row_label(r)}: {r['status']}: {r['error'] or ''}".rstrip(": "))
    seen_versions = set()
    for r in doc["rows"]:
        if r["versions"] and r["backend"] not in seen_versions:  # once per backend, not per process count
            seen_versions.add(r["backend"])
            out.append(f"{r['backend']} versions: {fmt_versions(r)}")
    sources = sorted({r["memory"]["source"] for r in doc["rows"] if r["memory"]})
    if sources:
        caveat = " (process RSS includes the framework and the host copy of the data)" if "process RSS" in sources else ""
        out.append("peak mem: " + ", ".join(sources) + caveat)
    if multi_process(doc):
        for r in doc["rows"]:
            if row_world_size(r) > 1:
                out.append(fmt_layout(r))
                used = r["devices_used"]
                if r["status"] == "ok" and used and used < r["world_size"]:
                    out.append(
                        f"{row_label(r)}: {r['world_size']} processes share {used} device(s) ({r['device_kind']}), "
                        "which a 1-process row has to itself"
                    )
        threads = [f"{row_label(r)} {r['cpu_threads']}" for r in doc["rows"] if r.get("cpu_threads")]
        if threads:
            out.append("CPU threads per process: " + ", ".join(threads)
                       + " (an N-process row gets OMP_NUM_THREADS = CPUs // N when it is unset)")
        for name in doc["config"].get("one_process_backends") or []:
            out.append(f"{name}: one process only: --nproc launches torch backends through torchrun; "
                       f"{name} drives every local device from one process")
        out.append(
            "scaling: weak (each process keeps the batch; N processes train on N x batch per step); tokens/s counts "
            "every process; scaling eff. = tokens/s at N / (N x tokens/s at 1); peak mem is rank 0's"
        )
    same = " with the same number of processes" if multi_process(doc) else ""
    out.append(
        f"parity: per-step relative loss difference against the first finished backend{same}, tolerance "
        f"{doc['config']['parity_tolerance']:g}; prices as of {doc['config']['prices_as_of']} (see anychip/bench/prices.py)"
    )
    return out


def print_table(doc: dict, console=None) -> None:
    from rich.table import Table

    console = console or make_console()
    table = Table(title=title(doc), title_justify="left")
    cols = columns(doc)
    for header, _ in cols:
        table.add_column(header, overflow="fold", justify="left" if header in LEFT_ALIGNED else "right")
    styles = {"ok": "green", "unavailable": "dim", "skipped": "dim"}
    status = [h for h, _ in cols].index("status")
    for r in doc["rows"]:
        cells = [cell(r) for _, cell in cols]
        cells[status] = f"[{styles.get(r['status'], 'red')}]{cells[status]}[/]"
        table.add_row(*cells)
    console.print(table)
    for line in notes(doc):
        console.print(line, highlight=False, markup=False)


def make_console():
    """stdout; when it is not a terminal (a pipe, a CI log) rich would fold the table into 80
    columns, so give it room unless $COLUMNS says otherwise."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=180)
    return console
