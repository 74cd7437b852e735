"""``anychip bench --plot``: one PNG a platform team can show. Six panels, one colour per row
in all of them: tokens/s with its p10-p90 spread, MFU, peak memory, USD per million tokens,
the loss curves, and each row's loss difference from its parity reference."""

from __future__ import annotations

import math

from anychip.bench.metrics import row_label
from anychip.bench.report.cells import fmt_percent, fmt_usd, tokens_interval, title
from anychip.parity import rel_diff

# Qualitative palette (matplotlib's tab10): neighbouring rows stay distinguishable.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
PANELS = ("throughput", "MFU", "peak memory", "cost", "loss", "loss difference")


def colours(doc: dict) -> dict[str, str]:
    """{row label: colour}, one per row in row order, shared by every panel."""
    return {row_label(r): PALETTE[i % len(PALETTE)] for i, r in enumerate(doc["rows"])}


def throughput_label(doc: dict) -> str:
    """The y label of the tokens/s panel, saying what the bar height is."""
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    repeats = sorted({r["repeat"] for r in rows if r.get("repeat")})
    if repeats:
        return f"tokens / s (median of {'/'.join(map(str, repeats))} windows)"
    windows = sorted({r["throughput_window"]["steps"] for r in rows if r.get("throughput_window")})
    if windows:
        return f"tokens / s (one window of {'/'.join(map(str, windows))} steps)"
    return "tokens / s (median step)"


def _bars(ax, doc, colour, values, texts, *, ylabel, title_text, missing_text, yerr=None):
    """One bar per row (height 0 where ``values`` has None, labelled ``missing_text`` for a
    finished row and the status for one that did not finish); labels sit above any error bar."""
    rows = doc["rows"]
    names = [row_label(r) for r in rows]
    heights = [0.0 if v is None else v for v in values]
    bars = ax.bar(names, heights, color=[colour[n] for n in names], yerr=yerr, ecolor="0.2", capsize=4 if yerr else 0)
    labels = [
        (text if v is not None else missing_text) if r["status"] == "ok" else r["status"]
        for r, v, text in zip(rows, values, texts)
    ]
    ax.bar_label(bars, labels=labels, padding=2, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title_text, fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.margins(y=0.18)
    if not any(heights):  # nothing to draw: a 0..1 axis with the labels, not a range around zero
        ax.set_ylim(0, 1)
        ax.set_yticks([])
    return bars


def _memory(rows: list[dict]) -> tuple[list[float | None], str]:
    """Peak bytes in one unit for every bar (the largest that keeps them readable)."""
    peaks = [(r["memory"] or {}).get("peak_bytes") for r in rows]
    top = max((p for p in peaks if p), default=0)
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= s), ("B", 1))
    return [None if p is None else p / scale for p in peaks], unit


def _losses(row: dict) -> list[float]:
    return [math.nan if x is None else x for x in row["losses"]]


def _loss_panels(doc, colour, loss_ax, diff_ax) -> None:
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in doc["rows"] if r["status"] == "ok" and r["losses"]]
    by_label = {row_label(r): r for r in rows}
    references = {r["parity"]["reference"] for r in rows if r["parity"]}
    for r in rows:
        name = row_label(r)
        steps = list(range(1, len(r["losses"]) + 1))
        if name in references:  # under the others, wide and dashed, so a curve on top of it still shows it
            loss_ax.plot(steps, _losses(r), label=f"{name} (reference)", color=colour[name],
                         linewidth=3.5, linestyle="--", alpha=0.6, zorder=1)
        else:
            loss_ax.plot(steps, _losses(r), label=name, color=colour[name], linewidth=1.3, zorder=2)
    warm = doc["config"]["warmup"]
    loss_ax.axvspan(0.5, warm + 0.5, color="0.92", zorder=0, label=f"warm-up ({warm})")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("loss (same seed, data and init)", fontsize=10)
    if rows:
        loss_ax.legend(fontsize=7)

    drawn = False
    for r in rows:
        ref = by_label.get((r["parity"] or {}).get("reference"))
        if ref is None or ref is r:
            continue
        diffs = []
        for a, b in zip(_losses(r), _losses(ref)):
            d = rel_diff(a, b)  # the parity column's definition, step by step
            diffs.append(d if 0 < d < math.inf else math.nan)  # a log axis cannot show 0 or inf: that step is a gap
        diff_ax.plot(range(1, len(diffs) + 1), diffs, label=f"{row_label(r)} vs {row_label(ref)}", color=colour[row_label(r)],
                     marker=".", linewidth=1.2)
        drawn = drawn or any(math.isfinite(d) for d in diffs)
    tol = doc["config"]["parity_tolerance"]
    diff_ax.axhline(tol, color="0.3", linestyle=":", linewidth=1, label=f"tolerance {tol:g}")
    if drawn:
        diff_ax.set_yscale("log")
    else:
        diff_ax.text(0.5, 0.5, "no difference to show", transform=diff_ax.transAxes, ha="center", fontsize=8)
    diff_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    diff_ax.set_xlabel("step")
    diff_ax.set_ylabel("|loss - reference| / |reference|")
    diff_ax.set_title("loss difference vs the parity reference", fontsize=10)
    diff_ax.legend(fontsize=7)


def figure(doc: dict):
    """The figure ``--plot`` saves (2 x 3 panels, in :data:`PANELS` order); a row without a
    result gets an empty bar labelled with its status. Returns the figure; the caller saves or
    inspects it."""
    # A bare Figure renders with Agg and leaves pyplot (and the user's backend) alone.
    from matplotlib.figure import Figure

    rows, colour = doc["rows"], colours(doc)
    fig = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    (tok_ax, mfu_ax, mem_ax), (usd_ax, loss_ax, diff_ax) = fig.subplots(2, 3)

    tokens = [r["tokens_per_s"] for r in rows]
    lower, upper = [], []
    for r, v in zip(rows, tokens):
        interval = tokens_interval(r) if v is not None else None
        lower.append(max(v - interval[0], 0.0) if interval else 0.0)
        upper.append(max(interval[1] - v, 0.0) if interval else 0.0)
    _bars(tok_ax, doc, colour, tokens, [f"{v:,.0f}" for v in (t or 0 for t in tokens)], ylabel=throughput_label(doc),
          title_text="throughput (error bars: p10-p90)", missing_text="-", yerr=[lower, upper] if any(lower + upper) else None)

    mfu = [None if r["mfu"] is None else r["mfu"] * 100 for r in rows]
    _bars(mfu_ax, doc, colour, mfu, [fmt_percent(r["mfu"]) for r in rows],
          ylabel="MFU (% of peak FLOP/s)", title_text="model FLOPs utilisation", missing_text="n/a: no peak")

    memory, unit = _memory(rows)
    sources = sorted({r["memory"]["source"] for r in rows if r["memory"]})
    _bars(mem_ax, doc, colour, memory, [f"{m:.1f}" if m is not None else "" for m in memory],
          ylabel=f"peak memory ({unit})", title_text="peak memory" + (f" ({', '.join(sources)})" if sources else ""),
          missing_text="n/a")

    usd = [r["usd_per_million_tokens"] for r in rows]
    _bars(usd_ax, doc, colour, usd, [fmt_usd(v) for v in usd], ylabel="USD per million tokens",
          title_text=f"cost (prices as of {doc['config']['prices_as_of']})", missing_text="no price")

    _loss_panels(doc, colour, loss_ax, diff_ax)
    fig.suptitle(title(doc), fontsize=11)
    return fig


def write_plot(doc: dict, path: str) -> None:
    figure(doc).savefig(path, format="png")
