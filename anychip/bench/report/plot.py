"""``anychip bench --plot``: tokens/s per row with its MFU, and the loss curves, in one PNG."""

from __future__ import annotations

from anychip.bench.metrics import row_label
from anychip.bench.report.table import title


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
