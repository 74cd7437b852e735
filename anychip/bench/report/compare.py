"""``anychip bench compare A.json B.json``: B / A per row and metric, and the regressions."""

from __future__ import annotations

from anychip.bench.metrics import row_key, row_label
from anychip.bench.report.table import make_console

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


def print_comparison(
    rows: list[dict], regressions: list[str], diffs: list[str], a_name: str, b_name: str, max_regression: float, console=None
) -> None:
    from rich.table import Table

    console = console or make_console()
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
