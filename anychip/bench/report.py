"""Everything ``anychip bench`` writes: the terminal table, JSON, CSV, Markdown, the plot, and
``anychip bench compare``.

The JSON document is the record (schema in :mod:`anychip.bench.schema`); every other output
is rendered from it, so a saved JSON can be re-rendered or compared later.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import socket

from anychip.backends.probe import cpu_name

from anychip.bench import schema
from anychip.bench.metrics import row_key, row_label, row_world_size

# -- the document ----------------------------------------------------------------------------


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
    import anychip

    doc = {
        "kind": schema.KIND,
        "schema_version": schema.SCHEMA_VERSION,
        "anychip_version": anychip.__version__,
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


# -- formatting -----------------------------------------------------------------------------


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
    batch = f"; global batch {world} x {row['batch']} = {row['samples_per_step']} samples per step" if row["batch"] and row["samples_per_step"] else ""
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

    console = console or _console()
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


def _console():
    """stdout; when it is not a terminal (a pipe, a CI log) rich would fold the table into 80
    columns, so give it room unless $COLUMNS says otherwise."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=180)
    return console


# -- files ----------------------------------------------------------------------------------


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


# -- plots ----------------------------------------------------------------------------------


def figure(doc: dict):
    """The figure ``--plot`` saves: tokens/s per backend (one bar each, MFU as its label; a
    row without a result gets an empty bar labelled with its status) and the loss curve of
    every backend that recorded one. Returns the figure; the caller saves or inspects it."""
    # A bare Figure renders with Agg and leaves pyplot (and the user's backend) alone.
    from matplotlib.figure import Figure

    rows = doc["rows"]
    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    bars_ax, loss_ax = fig.subplots(1, 2)
    names = [row_label(r) for r in rows]
    heights = [r["tokens_per_s"] or 0.0 for r in rows]
    bars = bars_ax.bar(names, heights, color=["tab:blue" if r["status"] == "ok" else "tab:gray" for r in rows])
    labels = []
    for r in rows:
        if r["status"] != "ok":
            labels.append(r["status"])
        else:
            labels.append("MFU n/a" if r["mfu"] is None else f"MFU {r['mfu'] * 100:.1f}%")
    bars_ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
    bars_ax.set_ylabel("tokens / s (median step)")
    bars_ax.set_title("throughput")
    bars_ax.tick_params(axis="x", labelrotation=20)
    bars_ax.margins(y=0.15)

    for r in rows:
        if r["losses"]:
            steps = list(range(1, len(r["losses"]) + 1))
            loss_ax.plot(steps, [float("nan") if x is None else x for x in r["losses"]], label=row_label(r), linewidth=1.2)
    warm = doc["config"]["warmup"]
    loss_ax.axvspan(0.5, warm + 0.5, color="0.92", zorder=0, label=f"warm-up ({warm})")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("loss (same seed, data and init)")
    if any(r["losses"] for r in rows):
        loss_ax.legend(fontsize=8)
    fig.suptitle(title(doc), fontsize=10)
    return fig


def write_plot(doc: dict, path: str) -> None:
    figure(doc).savefig(path, format="png")


# -- compare --------------------------------------------------------------------------------

# (label, row key path, direction): +1 means bigger is better, -1 smaller is better.
COMPARED = (
    ("tokens/s", ("tokens_per_s",), +1),
    ("step time", ("step_time_s", "median"), -1),
    ("peak memory", ("memory", "peak_bytes"), -1),
    ("final loss", ("final_loss",), -1),
)


def _get(row: dict, path: tuple[str, ...]):
    value = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def compare(a: dict, b: dict, max_regression: float) -> tuple[list[dict], list[str]]:
    """Per row (a backend at a process count: ``cpu`` and ``cpu (nproc 2)`` are two rows), B / A
    for every compared metric. A ratio is a regression when it is worse than ``max_regression``
    (0.05: tokens/s below 0.95x, or step time, memory or final loss above 1.05x); a row that
    finished in A but not in B is one too."""
    rows, regressions = [], []
    b_rows = {row_key(r): r for r in b["rows"]}
    for ra in a["rows"]:
        name = row_label(ra)
        rb = b_rows.pop(row_key(ra), None)
        entry = {"backend": name, "a_status": ra["status"], "b_status": rb["status"] if rb else "missing", "ratios": {}}
        rows.append(entry)
        if ra["status"] != "ok":
            continue
        if rb is None or rb["status"] != "ok":
            regressions.append(f"{name}: finished in A, {entry['b_status']} in B")
            continue
        for label, path, direction in COMPARED:
            va, vb = _get(ra, path), _get(rb, path)
            if va is None or vb is None or va == 0:
                entry["ratios"][label] = None
                continue
            ratio = vb / va
            entry["ratios"][label] = ratio
            worse = ratio < 1 - max_regression if direction > 0 else ratio > 1 + max_regression
            if worse:
                regressions.append(f"{name}: {label} x{ratio:.3f} (beyond {max_regression:g})")
    for rb in b_rows.values():
        rows.append({"backend": row_label(rb), "a_status": "missing", "b_status": rb["status"], "ratios": {}})
    return rows, regressions


def config_differences(a: dict, b: dict) -> list[str]:
    keys = ("workload", "batch", "seq", "precision", "steps", "warmup", "seed", "kernels")
    diffs = [f"{k}: {a['config'][k]!r} vs {b['config'][k]!r}" for k in keys if a["config"][k] != b["config"][k]]
    # Documents from before --nproc ran one process per row and had no parallel mode.
    pa, pb = a["config"].get("parallel"), b["config"].get("parallel")
    if pa and pb and pa != pb:
        diffs.append(f"parallel: {pa!r} vs {pb!r}")
    return diffs


def print_comparison(rows: list[dict], regressions: list[str], diffs: list[str], a_name: str, b_name: str, max_regression: float, console=None) -> None:
    from rich.table import Table

    console = console or _console()
    table = Table(title=f"B / A   (A = {a_name}, B = {b_name})", title_justify="left")
    table.add_column("backend")
    table.add_column("A")
    table.add_column("B")
    for label, _, _ in COMPARED:
        table.add_column(label, justify="right")
    for entry in rows:
        cells = []
        for label, _, direction in COMPARED:
            ratio = entry["ratios"].get(label)
            if ratio is None:
                cells.append("-")
                continue
            bad = ratio < 1 - max_regression if direction > 0 else ratio > 1 + max_regression
            cells.append(f"[red]{ratio:.3f}x[/]" if bad else f"{ratio:.3f}x")
        table.add_row(entry["backend"], entry["a_status"], entry["b_status"], *cells)
    console.print(table)
    for d in diffs:
        console.print(f"note: configurations differ: {d}", highlight=False, markup=False)
    if regressions:
        console.print(f"{len(regressions)} regression(s) beyond {max_regression:g}:", highlight=False, markup=False)
        for line in regressions:
            console.print(f"  {line}", highlight=False, markup=False)
    else:
        console.print(f"no regression beyond {max_regression:g}", highlight=False, markup=False)
