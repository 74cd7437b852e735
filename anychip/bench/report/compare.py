"""``anychip bench compare A.json B.json``: per row, whether B is slower than, faster than or the
same as A, decided on the tokens/s intervals alone.

The rule, with m = ``--max-regression`` and each interval [p10, p90] over a row's timed windows:

- regression: B's p90 < A's p10 x (1 - m): even B's best windows are slower, by more than m,
  than A's worst ones;
- faster: B's p10 > A's p90 x (1 + m);
- inconclusive: neither, but the medians differ by more than m: the windows overlap, so the two
  runs cannot tell a change from the machine's noise;
- same: otherwise.

One rule on one figure: step time is tokens per step / tokens/s, so a rule on it would say the
same. A row that finished in A but not in B is a regression as well. Peak memory and the final
loss have no interval: their B / A ratios are shown and decide nothing.

Version-1 documents have no timed windows; a row of one is read as tokens per step over its
per-step synchronised step times: median for the centre, p90 and p10 for the interval, and the
comparison says so.
"""

from __future__ import annotations

import dataclasses

from anychip.bench.metrics import row_key, row_label
from anychip.bench.report.cells import fmt_si, tokens_interval
from anychip.bench.report.table import make_console

# A run of another workload, batch shape or precision measured something else: refused unless --force.
MUST_MATCH = ("workload", "batch", "seq", "precision")
# Differences worth a note, which do not change what a step computes.
NOTED = ("steps", "warmup", "repeat", "seed", "kernels", "parallel")

# B / A ratios shown next to the verdict: (label, row key path).
SHOWN = (("step ms", ("step_time_s", "median")), ("peak mem", ("memory", "peak_bytes")), ("loss", ("final_loss",)))

VERDICTS = ("regression", "faster", "inconclusive", "same")


@dataclasses.dataclass(frozen=True)
class Throughput:
    """A row's tokens/s: the median and [p10, p90] (None where the row has no spread to give)."""

    median: float
    interval: tuple[float, float] | None


@dataclasses.dataclass
class Comparison:
    rows: list[dict]
    regressions: list[str]
    findings: list[str]  # every row whose verdict is not "same", regressions included, one line each
    notes: list[str]


def _get(row: dict, path: tuple[str, ...]):
    value = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def throughput(row: dict, version: int) -> Throughput | None:
    """tokens/s of a finished row as compared: the windows' median and interval (version 2), or
    tokens per step over the per-step step times' median, p90 and p10 (version 1)."""
    if version >= 2:
        if not row.get("tokens_per_s"):
            return None
        interval = row.get("tokens_per_s_interval")
        # One window (--repeat 1) has no spread: its interval is a point, which says nothing of the noise.
        spread = interval is not None and (row.get("repeat") or 2) >= 2 and interval[1] > interval[0]
        return Throughput(float(row["tokens_per_s"]), (float(interval[0]), float(interval[1])) if spread else None)
    st, tokens = row.get("step_time_s"), row.get("tokens_per_step")
    if not st or not tokens or st["median"] <= 0:
        return None
    return Throughput(tokens / st["median"], tokens_interval(row))


def verdict(a: Throughput, b: Throughput, max_regression: float) -> str:
    """One of :data:`VERDICTS` for B against A (the rule in the module docstring). Without an
    interval on either side a change is at most inconclusive."""
    if a.interval and b.interval:
        if b.interval[1] < a.interval[0] * (1 - max_regression):
            return "regression"
        if b.interval[0] > a.interval[1] * (1 + max_regression):
            return "faster"
    return "inconclusive" if abs(b.median / a.median - 1) > max_regression else "same"


def fmt_throughput(t: Throughput | None, short: bool = False) -> str:
    """``23,682 [23,134-24,078]``, or with ``short`` (the table) ``23.7k [23.1k-24.1k]``."""
    if t is None:
        return "-"
    num = fmt_si if short else (lambda v: f"{v:,.0f}")
    return num(t.median) + (f" [{num(t.interval[0])}-{num(t.interval[1])}]" if t.interval else " [no interval]")


def _finding(name: str, kind: str, ta: Throughput, tb: Throughput, max_regression: float) -> str:
    ratio = tb.median / ta.median
    figures = f"tokens/s {fmt_throughput(tb)} in B vs {fmt_throughput(ta)} in A (median x{ratio:.3f})"
    if kind == "regression":
        return f"{name}: regression: {figures}: B's p90 is below A's p10 x {1 - max_regression:g}"
    if kind == "faster":
        return f"{name}: faster: {figures}: B's p10 is above A's p90 x {1 + max_regression:g}"
    why = "an interval is missing" if not (ta.interval and tb.interval) else "the intervals overlap"
    return (f"{name}: inconclusive: {figures}: the median moved beyond {max_regression:g} but {why}; "
            "rerun with a larger --repeat or on a quieter machine")


def compare(a: dict, b: dict, max_regression: float) -> Comparison:
    """Per row (a backend at a process count: ``cpu`` and ``cpu (nproc 2)`` are two rows), the
    verdict on tokens/s and the B / A ratios of :data:`SHOWN`."""
    va, vb = a["schema_version"], b["schema_version"]
    notes = [
        f"{side} is a version-1 document (no timed windows): its tokens/s and interval are tokens per step / the median, "
        "p90 and p10 of its per-step synchronised step times"
        for side, version in (("A", va), ("B", vb)) if version < 2
    ]
    rows, regressions, findings = [], [], []
    b_rows = {row_key(r): r for r in b["rows"]}
    for ra in a["rows"]:
        name = row_label(ra)
        rb = b_rows.pop(row_key(ra), None)
        entry = {"backend": name, "a_status": ra["status"], "b_status": rb["status"] if rb else "missing",
                 "a": None, "b": None, "ratio": None, "verdict": None, "ratios": {}}
        rows.append(entry)
        if ra["status"] != "ok":
            continue
        if rb is None or rb["status"] != "ok":
            entry["verdict"] = "regression"
            line = f"{name}: finished in A, {entry['b_status']} in B"
            regressions.append(line)
            findings.append(line)
            continue
        for label, path in SHOWN:
            x, y = _get(ra, path), _get(rb, path)
            entry["ratios"][label] = y / x if x and y is not None else None
        ta, tb = throughput(ra, va), throughput(rb, vb)
        if ta is None or tb is None:
            continue
        entry.update(a=ta, b=tb, ratio=tb.median / ta.median, verdict=verdict(ta, tb, max_regression))
        if entry["verdict"] != "same":
            line = _finding(name, entry["verdict"], ta, tb, max_regression)
            findings.append(line)
            if entry["verdict"] == "regression":
                regressions.append(line)
    for rb in b_rows.values():
        rows.append({"backend": row_label(rb), "a_status": "missing", "b_status": rb["status"], "a": None, "b": None,
                     "ratio": None, "verdict": None, "ratios": {}})
    return Comparison(rows, regressions, findings, notes)


def config_differences(a: dict, b: dict, keys: tuple[str, ...] = MUST_MATCH + NOTED) -> list[str]:
    """``"key: A's value vs B's"`` per differing configuration key; a key one document lacks (a
    version-1 document has no repeat; one from before --nproc no parallel mode) is not compared."""
    ca, cb = a["config"], b["config"]
    return [f"{k}: {ca[k]!r} vs {cb[k]!r}" for k in keys if ca.get(k) is not None and cb.get(k) is not None and ca[k] != cb[k]]


def _cell(entry: dict, side: str) -> str:
    status = entry[f"{side}_status"]
    return fmt_throughput(entry[side], short=True) if status == "ok" else status


def print_comparison(result: Comparison, diffs: list[str], a_name: str, b_name: str, max_regression: float, console=None) -> None:
    """The table (tokens/s median [p10-p90] of A and B, B / A, the verdict, the other ratios),
    then the notes, one line per row that is not "same", and the count of regressions."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    console = console or make_console()
    console.print(f"B / A   (A = {a_name}, B = {b_name})", highlight=False, markup=False)
    console.print("tokens/s: median [p10-p90] over the timed windows, judged; step ms, peak mem, final loss: B / A, shown only",
                  highlight=False, markup=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for header in ("backend", "A tokens/s", "B tokens/s", "B/A", "verdict", *(label for label, _ in SHOWN)):
        table.add_column(Text(header), justify="left" if header in ("backend", "verdict") else "right", no_wrap=True)
    for entry in result.rows:
        ratios = [f"{r:.3f}x" if r is not None else "-" for r in (entry["ratios"].get(label) for label, _ in SHOWN)]
        ratio = f"{entry['ratio']:.3f}x" if entry["ratio"] is not None else "-"
        style = {"regression": "red", "faster": "green", "inconclusive": "yellow"}.get(entry["verdict"] or "", "")
        cells = (entry["backend"], _cell(entry, "a"), _cell(entry, "b"), ratio, entry["verdict"] or "-", *ratios)
        table.add_row(*(Text(c, style=style if i == 4 else "") for i, c in enumerate(cells)))
    console.print(table)
    for line in result.notes:
        console.print(f"note: {line}", highlight=False, markup=False)
    for d in diffs:
        console.print(f"note: configurations differ: {d}", highlight=False, markup=False)
    for line in result.findings:
        console.print(line, highlight=False, markup=False)
    inconclusive = sum(1 for e in result.rows if e["verdict"] == "inconclusive")
    maybe = f" ({inconclusive} inconclusive)" if inconclusive else ""
    if result.regressions:
        console.print(f"{len(result.regressions)} regression(s) beyond {max_regression:g}{maybe}", highlight=False, markup=False)
    else:
        console.print(f"no regression beyond {max_regression:g}{maybe}", highlight=False, markup=False)
