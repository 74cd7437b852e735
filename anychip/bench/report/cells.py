"""What each column of the bench table shows: the cell text of every figure, the column set
(compact, or ``--wide``) and the title. The terminal table (:mod:`.table`), Markdown
(:mod:`.files`) and the footer (:mod:`.footer`) all format through here, so they never disagree."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

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


def fmt_si(value: float | None) -> str:
    """Three significant figures with a k / M / G suffix: 55123 -> 55.1k."""
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_percent(fraction: float | None) -> str:
    """MFU and scaling: one decimal, two significant figures below 1% (a CPU's 0.031% is not 0.0%)."""
    if fraction is None:
        return "-"
    pct = fraction * 100
    return f"{pct:.2g}%" if 0 < pct < 1 else f"{pct:.1f}%"


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def fmt_parity(row: dict) -> str:
    p = row["parity"]
    if p is None:
        return "-"
    if p["reference"] == row_label(row):
        return "reference"
    worst = "inf" if p["max_rel_diff"] is None else f"{p['max_rel_diff']:.1e}"
    return f"{worst} >tol" if p["first_step_over"] else worst


# Marketing words that make a device name long without telling two machines apart.
_DEVICE_NOISE = re.compile(
    r"\((?:R|TM|tm)\)|\b(?:NVIDIA|Intel|AMD|GeForce|CPU|Processor|Platinum|Gold|Silver|Bronze)\b"
    r"|\b\d+(?:st|nd|rd|th) Gen\b|\b\d+-Core\b|@ ?[\d.]+ ?GHz|\bHBM\w*"
)


def short_device(name: str) -> str:
    """A device name for the compact table: "NVIDIA H100 80GB HBM3" -> "H100 80GB", "Intel(R)
    Xeon(R) Processor" -> "Xeon". The JSON and ``--wide`` keep the full name."""
    short = " ".join(_DEVICE_NOISE.sub(" ", name).split())
    return short or name.strip()


def fmt_device(row: dict, short: bool = False) -> str:
    if not row["device_kind"] and row["devices"] is None:
        return "-"
    kind = (short_device(row["device_kind"]) if short else row["device_kind"]) or "?"
    used = row["devices_used"]
    if short:
        return f"{kind} x{used}" if used and used > 1 else kind
    count = f" x{used}" if used else ""
    seen = f" (of {row['devices']})" if row["devices"] and used and row["devices"] != used else ""
    return f"{kind}{count}{seen}"


def fmt_step(row: dict) -> str:
    s = row["step_time_s"]
    return "-" if s is None else f"{s['median'] * 1e3:.2f}"


def fmt_step_spread(row: dict) -> str:
    s = row["step_time_s"]
    return "-" if s is None else f"{s['p10'] * 1e3:.2f}-{s['p90'] * 1e3:.2f}"


def tokens_interval(row: dict) -> tuple[float, float] | None:
    """p10 and p90 of tokens/s: over the timed windows where the row has them; a document from
    before timed windows has per-step times, whose spread it is then."""
    interval = row.get("tokens_per_s_interval")
    if interval:
        return float(interval[0]), float(interval[1])
    st, tokens = row["step_time_s"], row["tokens_per_step"]
    if "repeat" in row or not st or not tokens or len(row["step_times_s"]) < 2 or min(st["p10"], st["p90"]) <= 0:
        return None
    return tokens / st["p90"], tokens / st["p10"]


def fmt_tokens(row: dict) -> str:
    """``57,683 ±3%``: the median and half the p10-p90 range relative to it."""
    value = row["tokens_per_s"]
    if value is None:
        return "-"
    text = f"{value:,.0f}"
    interval = tokens_interval(row)
    if interval and value > 0 and interval[1] > interval[0]:
        spread = (interval[1] - interval[0]) / 2 / value * 100
        text += f" ±{spread:.0f}%" if spread >= 1 else f" ±{spread:.1f}%"
    return text


def fmt_tokens_spread(row: dict) -> str:
    interval = tokens_interval(row)
    return "-" if interval is None else f"{fmt_si(interval[0])}-{fmt_si(interval[1])}"


def fmt_versions(row: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in row["versions"].items() if k not in ("python", "anychip"))


def fmt_procs(row: dict) -> str:
    world = row_world_size(row)
    return str(world) if world == 1 else f"{world} {row.get('parallel') or '?'}"


def multi_process(doc: dict) -> bool:
    """Whether the run has rows of more than one process (the scaling columns are shown)."""
    return any(row_world_size(r) > 1 for r in doc["rows"]) or (doc["config"].get("nproc") or [1]) != [1]


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]
    shown: str = "both"  # "compact": the default table only, "wide": --wide only, "both"
    left: bool = False  # text, left-aligned; figures are right-aligned
    wraps: bool = False  # may break at spaces (device names, versions); figures never do
    multi: bool = False  # only in runs with multi-process rows


COLUMNS = (
    Column("backend", row_label, left=True),
    Column("procs", fmt_procs, shown="wide", left=True, multi=True),
    Column("status", lambda r: r["status"], left=True),
    Column("device", fmt_device, shown="wide", left=True, wraps=True),
    Column("compile+warm-up s", lambda r: _fmt(r["warmup_s"], ".2f"), shown="wide"),
    Column("step ms", fmt_step),
    Column("step ms p10-p90", fmt_step_spread, shown="wide"),
    Column("tokens/s", fmt_tokens),
    Column("tokens/s p10-p90", fmt_tokens_spread, shown="wide"),
    Column("samples/s", lambda r: _fmt(r["samples_per_s"], ",.1f"), shown="wide"),
    Column("MFU", lambda r: fmt_percent(r["mfu"])),
    Column("peak mem", lambda r: fmt_bytes((r["memory"] or {}).get("peak_bytes"))),
    Column("final loss", lambda r: _fmt(r["final_loss"], ".4f"), shown="wide"),
    Column("parity", fmt_parity),
    Column("USD/M tokens", lambda r: fmt_usd(r["usd_per_million_tokens"])),
    Column("scaling eff.", lambda r: fmt_percent(r.get("scaling_efficiency")), shown="wide", multi=True),
    Column("versions", fmt_versions, shown="wide", left=True, wraps=True),
)


def columns(doc: dict, wide: bool = False) -> tuple[Column, ...]:
    """The columns of this document: the compact set, or with ``wide`` every one; the process
    count and scaling efficiency only when some row ran on more than one process."""
    multi = multi_process(doc)
    hidden = "compact" if wide else "wide"
    return tuple(c for c in COLUMNS if c.shown != hidden and (multi or not c.multi))


def _timed(config: dict) -> str:
    repeat = config.get("repeat")  # absent in version-1 documents: one timed run of `steps`
    return f"{repeat} x {config['steps']} timed steps" if repeat else f"{config['steps']} timed steps"


def title(doc: dict) -> str:
    c = doc["config"]
    shape = f"batch {c['batch']} x seq {c['seq']}" if c["batch"] and c["seq"] else "default batch"
    if multi_process(doc):
        shape = shape.replace("batch", "batch per process", 1)
        shape += f", {','.join(map(str, c.get('nproc') or [1]))} process(es) ({c.get('parallel') or 'ddp'})"
    return (
        f"anychip bench: {c['workload']}, {shape}, {c['precision']}, "
        f"{c['warmup']} warm-up + {_timed(c)}, seed {c['seed']}"
    )
