"""The bench table: figures never folded or cut at any width, the stacked layout under 100
columns, markup printed literally, the footer's sources and reasons, and Markdown."""

from __future__ import annotations

import io

import pytest
from bench_support import finished_row, make_doc

from anychip.bench import metrics, report
from anychip.bench.report.cells import columns

LONG_CPU = "Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz"
LONG_ERROR = "RuntimeError: [red]boom[/red] in [bold]step[/bold]: " + "the compiler gave up on this graph " * 6


def _windows(row, median_s: float, interval, repeat: int = 5):
    """The fields a run with timed windows adds: ``repeat`` windows, tokens/s p10-p90."""
    row["step_time_s"] = {"median": median_s, "p10": median_s * 0.97, "p90": median_s * 1.04, "mean": median_s,
                          "min": median_s * 0.95, "max": median_s * 1.06}
    row["repeat"] = repeat
    row["tokens_per_s_interval"] = list(interval)
    return row


def _doc():
    cuda = _windows(finished_row("cuda", tokens_per_s=57683.2, losses=[3.0, 2.0, 1.5], device_kind="NVIDIA H100 80GB HBM3",
                                 mfu_peak_tflops=989.0), 0.01461, (55123.0, 58210.0))
    cuda["price"] = {"usd_per_device_hour": 3.9, "source": "--price cuda=3.9"}
    cuda["usd_per_million_tokens"] = 0.01878
    cpu = _windows(finished_row("cpu", tokens_per_s=2000.0, losses=[3.0, 2.0 + 2.2e-7, 1.5], device_kind=LONG_CPU), 0.5, (1950.0, 2040.0))
    crash = metrics.empty_row("fake[bold]crash", "crashed", LONG_ERROR, "fp32")
    cpu2 = _windows(finished_row("cpu", tokens_per_s=3000.0, losses=[3.0, 1.8, 1.4], device_kind=LONG_CPU, world_size=2),
                    0.6667, (2900.0, 3100.0))
    doc = make_doc([cuda, cpu, crash, cpu2], nproc=[1, 2], parallel="ddp")
    doc["machine"]["load"] = {"cores": 2, "max_1min": 3.5}
    doc["warnings"] = ["the machine was busy: load 3.5 on 2 cores [check]"]
    return doc


def _render(doc, width: int, wide: bool = False) -> list[str]:
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    report.print_table(doc, console, wide=wide)
    return console.export_text().splitlines()


def test_figures_as_the_table_formats_them():
    cuda, cpu, _, cpu2 = _doc()["rows"]
    cells = {c.header: c.cell for c in columns(_doc(), wide=True)}
    assert cells["tokens/s"](cuda) == "57,683 ±3%"  # (58210 - 55123) / 2 / 57683.2 = 2.7%
    assert cells["tokens/s p10-p90"](cuda) == "55.1k-58.2k"
    assert cells["step ms"](cuda) == "14.61"
    assert cells["parity"](cpu) == "1.1e-07" and cells["parity"](cuda) == "reference"
    assert cells["MFU"](cuda) == "0.0058%"  # 57683.2 x 1e6 / 989e12: two significant figures, not 0.0%
    assert cells["USD/M tokens"](cuda) == "0.01878"
    assert cells["backend"](cpu2) == "cpu (nproc 2)" and cells["scaling eff."](cpu2) == "75.0%"


@pytest.mark.parametrize("width, wide", [(80, False), (100, False), (120, False), (80, True), (120, True), (260, True)])
def test_no_figure_is_folded_or_cut_and_no_line_is_too_long(width, wide):
    from rich.cells import cell_len

    doc = _doc()
    lines = _render(doc, width, wide)
    assert max(cell_len(line) for line in lines) <= width
    for col in columns(doc, wide):
        for row in doc["rows"]:
            text = col.cell(row)
            pieces = text.split() if col.wraps else [text]  # device names and versions may break at spaces
            for piece in pieces:
                assert any(piece in line for line in lines), (col.header, piece)
    assert any("57,683 ±3%" in line for line in lines) and any("1.1e-07" in line for line in lines)


def test_under_100_columns_every_row_is_a_block_of_label_value_lines():
    lines = _render(_doc(), 80)
    assert not any(line.startswith("─") for line in lines)  # no table rule
    assert "cuda  ok  H100 80GB" in lines
    assert any(line.split() == ["tokens/s", "57,683", "±3%"] for line in lines)
    assert any(line.split() == ["step", "ms", "14.61"] for line in lines)
    compact = _render(_doc(), 100)
    header = next(line for line in compact if line.startswith("backend"))
    assert header.split() == ["backend", "status", "step", "ms", "tokens/s", "MFU", "peak", "mem", "parity", "USD/M", "tokens"]
    assert any(line.startswith("─") for line in compact)


def test_wide_adds_the_long_columns_with_full_device_names():
    lines = _render(_doc(), 260, wide=True)
    header = next(line for line in lines if line.startswith("backend"))
    for name in ("procs", "device", "compile+warm-up s", "samples/s", "final loss", "scaling eff.", "versions"):
        assert name in header
    assert any(LONG_CPU + " x1" in line for line in lines)
    narrow = _render(_doc(), 100)
    cpu_line = next(line for line in narrow if line.startswith("cpu ") and "500.00" in line)
    assert "Xeon" not in cpu_line  # the compact table has no device column
    assert any("Xeon 8488C (cpu, cpu (nproc 2))" in line for line in narrow)  # the footer names it in short


def test_markup_in_names_and_errors_prints_literally():
    for width in (80, 120):
        text = "\n".join(_render(_doc(), width))
        assert "fake[bold]crash" in text
        assert "[red]boom[/red] in [bold]step[/bold]" in text
        assert "load 3.5 on 2 cores [check]" in text


@pytest.mark.parametrize(
    "name, short",
    [("Intel(R) Xeon(R) Processor", "Xeon"), ("NVIDIA H100 80GB HBM3", "H100 80GB"), (LONG_CPU, "Xeon 8488C"),
     ("AMD EPYC 7R13 Processor", "EPYC 7R13"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("TPU v5 lite", "TPU v5 lite"),
     ("13th Gen Intel(R) Core(TM) i7-13700K", "Core i7-13700K"), ("CPU", "CPU")],
)
def test_short_device_names(name, short):
    assert report.short_device(name) == short


def test_footer_says_where_each_figure_comes_from_and_why_one_is_missing():
    notes = report.notes(_doc())
    text = "\n".join(notes)
    assert "median over the timed windows (5 windows of 3 steps, one synchronisation per window)" in text
    assert "p10-p90" in text
    assert "peak mem: process RSS (cuda, cpu, cpu (nproc 2), includes the framework" in text
    assert f"MFU - (cpu, cpu (nproc 2)): no peak FLOP/s known for {LONG_CPU}: pass --peak-tflops" in notes
    assert "cuda 989 TFLOP/s (--peak-tflops cuda=989)" in text
    assert any(n.startswith("USD/M tokens - (cpu, cpu (nproc 2)): no price: pass --price") and n.endswith(
        f"(prices as of {_doc()['config']['prices_as_of']})") for n in notes)
    assert "against cuda for 1 process(es), cpu (nproc 2) for 2 process(es) (the first row to finish); tolerance 0.001" in text
    assert "machine load: highest 1-minute load average 3.50 on 2 cores during the run" in notes
    assert notes[-1] == "warning: the machine was busy: load 3.5 on 2 cores [check]"
    assert notes[0].startswith("fake[bold]crash: crashed: RuntimeError: [red]boom[/red]")


def test_a_document_without_timed_windows_says_how_it_was_measured():
    row = finished_row("cpu", tokens_per_s=2000.0, losses=[3.0, 2.0])
    times = [0.5, 0.48, 0.52, 0.55]
    row.update(step_times_s=times, step_time_s=metrics.step_time_summary(times))  # per-step times, as version 1 kept them
    for key in ("repeat", "window_step_s", "tokens_per_s_interval", "samples_per_s_interval"):
        del row[key]
    doc = make_doc([row])
    cells = {c.header: c.cell for c in columns(doc)}
    spread = (1000 / metrics.percentile(times, 10) - 1000 / metrics.percentile(times, 90)) / 2 / 2000 * 100
    assert cells["tokens/s"](row) == f"2,000 ±{spread:.0f}%"
    assert "step ms: median of the timed steps, each synchronised" in "\n".join(report.notes(doc))
    one = make_doc([finished_row("cpu", tokens_per_s=2000.0, losses=[3.0, 2.0])])
    assert columns(one)[3].cell(one["rows"][0]) == "2,000"  # one step: no spread to show


def test_markdown_has_the_compact_columns_the_footer_and_escapes_pipes():
    doc = _doc()
    doc["rows"][2]["error"] = "a | b"
    md = report.markdown(doc)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| backend | status | step ms | tokens/s | MFU | peak mem | parity | USD/M tokens |"
    assert table[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert table[2] == "| cuda | ok | 14.61 | 57,683 ±3% | 0.0058% | 1.0 MiB | reference | 0.01878 |"
    assert len(table) == 2 + 4
    assert "- fake[bold]crash: crashed: a \\| b" in md and "- warning: the machine was busy" in md
    assert "| procs |" in report.markdown(doc, wide=True) and "| scaling eff. |" in report.markdown(doc, wide=True)


def test_piped_output_is_100_columns_unless_columns_says_otherwise(monkeypatch):
    from anychip.bench.report.table import make_console

    for var in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    assert make_console().width == 100  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "132")
    assert make_console().width == 132
