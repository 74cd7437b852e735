"""Everything ``anychip bench`` shows and writes, rendered from one JSON document: the terminal
table (:mod:`.table`; its cells :mod:`.cells`, its footer :mod:`.footer`), the JSON / CSV /
Markdown files (:mod:`.files`), the plot (:mod:`.plot`) and ``anychip bench compare``
(:mod:`.compare`)."""

from __future__ import annotations

from anychip.bench.report.cells import columns, short_device, title
from anychip.bench.report.compare import compare, config_differences, print_comparison
from anychip.bench.report.files import document, load, machine, markdown, now_iso, write_csv, write_json, write_markdown
from anychip.bench.report.footer import notes
from anychip.bench.report.plot import figure, write_plot
from anychip.bench.report.table import print_table

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
    "short_device",
    "title",
    "write_csv",
    "write_json",
    "write_markdown",
    "write_plot",
]
