"""``anychip bench show RUN.json``: print a saved run's table again and write its Markdown,
CSV or plot, without running anything. Every argument is checked before anything is printed:
a missing file, a directory, a JSON that is not a bench result or an unwritable output path is
one line on stderr and exit status 2."""

from __future__ import annotations

import importlib.util
import os
import sys

from anychip.cliargs import UsageError, check_output




def cmd_show(args) -> int:
    """0 when the table printed and every requested file was written, 1 when a write failed."""
    from anychip.bench import report

    outputs = (("--md", getattr(args, "md", None)), ("--csv", getattr(args, "csv", None)), ("--plot", getattr(args, "plot", None)))
    for flag, path in outputs:
        check_output(flag, path)
        if path is not None and os.path.abspath(path) == os.path.abspath(args.run):
            raise UsageError(f"{flag} {path}: would overwrite the run being shown")
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'anychip[bench]'")
    try:
        doc = report.load(args.run)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    wide = bool(getattr(args, "wide", False))
    report.print_table(doc, wide=wide)
    failed = 0
    writers = {"--md": lambda d, p: report.write_markdown(d, p, wide=wide), "--csv": report.write_csv, "--plot": report.write_plot}
    for flag, path in outputs:
        if not path:
            continue
        try:
            writers[flag](doc, path)
            print(f"wrote {path}", file=sys.stderr)
        except (OSError, ValueError) as exc:
            failed += 1
            print(f"anychip bench show: error: {flag} {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
    return 1 if failed else 0
