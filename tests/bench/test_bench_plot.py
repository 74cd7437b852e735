"""The bench plot: six panels with truthful labels, bar heights equal to the JSON figures, the
parity reference drawn distinctly, and one colour per row across every panel."""

from __future__ import annotations

import pytest
from bench_support import finished_row, make_doc
from support import requires

from anychip.bench import metrics, report

pytestmark = requires("matplotlib")


def _doc():
    cuda = finished_row("cuda", tokens_per_s=57683.2, losses=[3.0, 2.0, 1.5], device_kind="NVIDIA H100 80GB HBM3", mfu_peak_tflops=989.0,
                        peak_bytes=3 << 30)
    cuda.update(repeat=5, tokens_per_s_interval=[55123.0, 58210.0], price={"usd_per_device_hour": 3.9, "source": "--price"},
                usd_per_million_tokens=0.01878)
    cpu = finished_row("cpu", tokens_per_s=2000.0, losses=[3.0, 2.002, 1.5], peak_bytes=1 << 30)
    cpu.update(repeat=5, tokens_per_s_interval=[1950.0, 2040.0])
    crash = metrics.empty_row("fake-crash", "crashed", "exited with status 3", "fp32")
    return make_doc([cuda, cpu, crash], steps=3)


def _panels(fig):
    return dict(zip(("tokens", "mfu", "mem", "usd", "loss", "diff"), fig.axes))


def test_six_panels_with_truthful_titles_and_labels():
    ax = _panels(report.figure(_doc()))
    assert len(ax) == 6 and len(report.figure(_doc()).axes) == 6
    assert ax["tokens"].get_ylabel() == "tokens / s (median of 5 windows)"
    assert ax["tokens"].get_title() == "throughput (error bars: p10-p90)"
    assert ax["mfu"].get_ylabel() == "MFU (% of peak FLOP/s)"
    assert ax["mem"].get_ylabel() == "peak memory (GiB)" and ax["mem"].get_title() == "peak memory (process RSS)"
    assert ax["usd"].get_ylabel() == "USD per million tokens"
    assert ax["loss"].get_xlabel() == "step" and ax["loss"].get_ylabel() == "training loss"
    assert ax["diff"].get_ylabel() == "|loss - reference| / |reference|" and ax["diff"].get_yscale() == "log"
    for name in ("tokens", "mfu", "mem", "usd"):
        assert [t.get_text() for t in ax[name].get_xticklabels()] == ["cuda", "cpu", "fake-crash"]


def test_bars_are_the_json_figures_and_missing_ones_say_why():
    doc = _doc()
    rows = doc["rows"]
    ax = _panels(report.figure(doc))

    def heights(name):
        return [b.get_height() for b in ax[name].patches]

    assert heights("tokens") == pytest.approx([57683.2, 2000.0, 0.0])
    assert heights("mfu") == pytest.approx([rows[0]["mfu"] * 100, 0.0, 0.0])
    assert heights("mem") == pytest.approx([3.0, 1.0, 0.0])
    assert heights("usd") == pytest.approx([0.01878, 0.0, 0.0])
    assert [t.get_text() for t in ax["tokens"].texts] == ["57,683", "2,000", "crashed"]
    assert [t.get_text() for t in ax["mfu"].texts] == ["0.0058%", "n/a: no peak", "crashed"]
    assert [t.get_text() for t in ax["usd"].texts] == ["0.01878", "no price", "crashed"]
    # error bars span tokens/s p10..p90 of each row
    from matplotlib.container import ErrorbarContainer

    errorbar = next(c for c in ax["tokens"].containers if isinstance(c, ErrorbarContainer))
    segments = errorbar.lines[2][0].get_segments()
    assert [(s[0][1], s[1][1]) for s in segments[:2]] == [pytest.approx((55123.0, 58210.0)), pytest.approx((1950.0, 2040.0))]


def test_reference_curve_is_drawn_distinctly_and_the_difference_is_relative():
    ax = _panels(report.figure(_doc()))
    lines = {line.get_label(): line for line in ax["loss"].get_lines()}
    ref, cpu = lines["cuda (reference)"], lines["cpu"]
    assert ref.get_linestyle() == "--" and ref.get_linewidth() > cpu.get_linewidth() and ref.get_zorder() < cpu.get_zorder()
    assert list(ref.get_ydata()) == [3.0, 2.0, 1.5]
    diff = {line.get_label(): line for line in ax["diff"].get_lines()}["cpu vs cuda"]
    y = list(diff.get_ydata())
    assert y[1] == pytest.approx(0.002 / 2.0)
    assert y[0] != y[0] and y[2] != y[2]  # equal losses: nan, a gap on the log axis rather than a fake point
    assert any(line.get_label() == "tolerance 0.001" for line in ax["diff"].get_lines())


def test_one_colour_per_row_across_every_panel():
    from matplotlib.colors import to_hex

    ax = _panels(report.figure(_doc()))
    for i, name in enumerate(("cuda", "cpu")):
        bar_colours = {to_hex(ax[p].patches[i].get_facecolor()) for p in ("tokens", "mfu", "mem", "usd")}
        loss = next(line for line in ax["loss"].get_lines() if line.get_label().startswith(name))
        assert bar_colours == {to_hex(loss.get_color())}
    diff = next(line for line in ax["diff"].get_lines() if line.get_label() == "cpu vs cuda")
    assert to_hex(diff.get_color()) == to_hex(ax["tokens"].patches[1].get_facecolor())
    assert to_hex(ax["tokens"].patches[0].get_facecolor()) != to_hex(ax["tokens"].patches[1].get_facecolor())


def test_write_plot_writes_a_png(tmp_path):
    path = tmp_path / "bench.png"
    report.write_plot(_doc(), str(path))
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes the whole file
        assert img.format == "PNG" and img.size == (1600, 900)  # 16 x 9 in at 100 dpi
