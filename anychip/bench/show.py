"""``anychip bench show RUN.json``: print a saved run's table again and write its Markdown,
CSV or plot, without running anything. Every argument is checked before anything is printed:
a missing file, a directory, a JSON that is not a bench result or an unwritable output path is
one line on stderr and exit status 2."""

from __future__ import annotations

import os

from anychip.cliargs import UsageError


def cmd_show(args) -> int:
    """0 when the table printed and every requested file was written, 1 when a write failed."""
    from anychip.bench import report
    from anychip.bench.report.outputs import check_outputs, write_outputs

    outputs = {flag: getattr(args, flag[2:], None) for flag in ("--md", "--csv", "--plot")}
    check_outputs(outputs)
    for flag, path in outputs.items():
        if path is not None and os.path.abspath(path) == os.path.abspath(args.run):
            raise UsageError(f"{flag} {path}: would overwrite the run being shown")
    try:
        doc = report.load(args.run)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    wide = bool(getattr(args, "wide", False))
    report.print_table(doc, wide=wide)
    return 1 if write_outputs(doc, outputs, wide=wide, command="anychip bench show") else 0
