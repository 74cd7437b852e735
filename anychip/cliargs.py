"""What every ``anychip`` sub-command shares: the one-line parser, the usage error and the
argument types. A leaf, so that ``anychip.cli`` can import the modules that add
sub-commands (bench, parity) while they import these helpers, with no circle between them.
It imports nothing of anychip but the errors leaf.
"""

from __future__ import annotations

import argparse
import math
import sys

from anychip.errors import BackendError


class UsageError(Exception):
    """A bad command-line value: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage dump), exit status 2 as usual."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def finite_positive_float(text: str) -> float:
    value = positive_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def run_command(args, command: str) -> int:
    """Run a parsed command (``args.func(args)``): bad input is one line on stderr and exit
    status 2, Ctrl-C is 130. ``command`` names it in the error line."""
    try:
        return args.func(args)
    except (UsageError, BackendError, ValueError) as exc:
        # Bad input: one line, exit status 2 (argparse's convention).
        print(f"anychip {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anychip: interrupted", file=sys.stderr)
        return 130
