"""The terminal table of ``anychip bench``: the title, the table and the footer, rendered with rich.

A number is never wrapped, folded or cut: every cell is a literal ``Text`` (a ``[...]`` in a
backend name or an error prints as itself) and every figure column is ``no_wrap``. When the
table does not fit the console (under :data:`TABLE_MIN_WIDTH` columns, or a ``--wide`` table
wider than the console), each row becomes a block of ``label  value`` lines instead.
"""

from __future__ import annotations

import os

from anychip.bench.metrics import row_label
from anychip.bench.report.cells import columns, fmt_device, title
from anychip.bench.report.footer import notes

# Below this width the compact table no longer fits typical backend names: stack the rows.
TABLE_MIN_WIDTH = 100
# Width of output that is not a terminal (a pipe, a CI log) unless $COLUMNS says otherwise.
PIPE_WIDTH = 100


_STATUS_STYLE = {"ok": "green", "unavailable": "dim", "skipped": "dim"}


def _status_style(row: dict) -> str:
    return _STATUS_STYLE.get(row["status"], "red")


def build_table(doc: dict, wide: bool = False):
    """The rich Table: literal Text cells, figures never wrapped."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    cols = columns(doc, wide)
    for col in cols:
        table.add_column(
            Text(col.header), justify="left" if col.left else "right", no_wrap=not col.wraps, overflow="fold" if col.wraps else "ellipsis"
        )
    for r in doc["rows"]:
        table.add_row(*(Text(col.cell(r), style=_status_style(r) if col.header == "status" else "") for col in cols))
    return table


def stacked(doc: dict, wide: bool = False) -> list:
    """One block per row: the row's name, status and device, then ``label  value`` lines (a row
    that did not finish shows only what it has). For consoles too narrow for the table."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    blocks = []
    for r in doc["rows"]:
        device = fmt_device(r, short=not wide)
        blocks.append(Text.assemble((row_label(r), "bold"), "  ", (r["status"], _status_style(r)), f"  {device}" if device != "-" else ""))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for col in columns(doc, wide):
            value = col.cell(r)
            if col.header not in ("backend", "status", "device") and (value != "-" or r["status"] == "ok"):
                grid.add_row(Text(col.header, style="dim"), Text(value))
        if grid.row_count:
            blocks.append(Padding(grid, (0, 0, 0, 2), expand=False))
    return blocks


def table_width(doc: dict, wide: bool = False) -> int:
    """The narrowest the table can be with every cell that must not break whole: the widest
    cell of a figure column, the longest word of one that wraps, plus one space of padding and
    one of separator per column."""
    from rich.cells import cell_len

    cols = columns(doc, wide)
    total = 2 * len(cols) - 1
    for col in cols:
        texts = [col.header] + [col.cell(r) for r in doc["rows"]]
        total += max(cell_len(word) for t in texts for word in (t.split() or [""])) if col.wraps else max(map(cell_len, texts))
    return total


def fits(doc: dict, console, wide: bool = False) -> bool:
    return console.width >= TABLE_MIN_WIDTH and table_width(doc, wide) <= console.width


def print_table(doc: dict, console=None, wide: bool = False) -> None:
    """The title, the table (or one block per row where it does not fit) and the footer."""
    console = console or make_console()
    console.print(title(doc), highlight=False, markup=False)
    if fits(doc, console, wide):
        console.print(build_table(doc, wide))
    else:
        for block in stacked(doc, wide):
            console.print(block)
    for line in notes(doc):
        console.print(line, highlight=False, markup=False)


def make_console():
    """stdout at the terminal's width ($COLUMNS when set); output that is not a terminal (a pipe,
    a CI log) gets :data:`PIPE_WIDTH` columns rather than rich's 80."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PIPE_WIDTH)
    return console
