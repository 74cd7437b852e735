"""The files a bench run (``anychip bench``) or a re-rendering (``anychip bench show``) writes:
checked before any work starts, then written each on its own, so one that fails does not cost
the others."""

from __future__ import annotations

import importlib.util
import sys

from anychip.bench.report.files import write_csv, write_json, write_markdown
from anychip.bench.report.plot import write_plot
from anychip.cliargs import UsageError, check_output


def check_outputs(outputs: dict[str, str | None]) -> None:
    """``{flag: path}``: every path writable, and matplotlib there for ``--plot``; else one line."""
    for flag, path in outputs.items():
        check_output(flag, path)
    if outputs.get("--plot") and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'anychip[bench]'")


def write_outputs(doc: dict, outputs: dict[str, str | None], *, wide: bool = False, command: str = "anychip bench") -> int:
    """Write each requested file (``--json``, ``--csv``, ``--md``, ``--plot``); the number that failed."""
    writers = {"--json": write_json, "--csv": write_csv, "--md": lambda d, p: write_markdown(d, p, wide=wide), "--plot": write_plot}
    failed = 0
    for flag, path in outputs.items():
        if not path:
            continue
        try:
            writers[flag](doc, path)
            print(f"wrote {path}", file=sys.stderr)
        except (OSError, ValueError) as exc:  # ValueError: a value JSON cannot hold
            failed += 1
            print(f"{command}: error: {flag} {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
    return failed
