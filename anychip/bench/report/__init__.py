"""Everything ``anychip bench`` shows and writes, rendered from one JSON document: the terminal
table (:mod:`.table`), the JSON / CSV / Markdown files (:mod:`.files`), the plot (:mod:`.plot`)
and ``anychip bench compare`` (:mod:`.compare`)."""

from __future__ import annotations

from anychip.bench.report.compare import compare, config_differences, print_comparison
from anychip.bench.report.files import document, load, machine, markdown, now_iso, write_csv, write_json, write_markdown
from anychip.bench.report.plot import figure, write_plot
from anychip.bench.report.table import columns, notes, print_table, title

__all__ = [
    "columns",
    "compare",
    "config_differences",
    "document",
    "figure",
    "load",
    "machine",
    "markdown",
    "notes",
    "now_iso",
    "print_comparison",
    "print_table",
    "title",
    "write_csv",
    "write_json",
    "write_markdown",
    "write_plot",
]
