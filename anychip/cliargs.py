"""What every ``anychip`` sub-command shares: the one-line parser, the usage error, the argument
types, the batch-shape check and the one error boundary (:func:`run_command`). A leaf, so that
``anychip.cli`` can import the modules that add sub-commands (bench, parity) while they import
these helpers, with no circle between them. It imports nothing of anychip but the errors leaf.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from anychip.errors import AnychipError

DEBUG_ENV = "ANYCHIP_DEBUG"
# The largest --seed every consumer takes: torch.manual_seed stops at 2**64 - 1 and the MLP's
# teacher is seeded with seed + 10_000.
MAX_SEED = 2**63 - 1


class UsageError(AnychipError):
    """A bad command-line value: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (no usage dump), exit status 2 as usual."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def add_debug_flag(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--debug``: on the top-level parser (``anychip --debug train``) and after a sub-command
    (``anychip train --debug``); a sub-command's copy leaves the top-level value alone unless given."""
    parser.add_argument(
        "--debug", action="store_true", default=False if top else argparse.SUPPRESS,
        help=f"show the traceback of an error instead of one line (also ${DEBUG_ENV}=1)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def random_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, got {value}")
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


# -- the batch a run asks for ------------------------------------------------------------------------


def host_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_batch_shape(workload, batch: int | None, seq: int | None, *, host_cpu: bool = False) -> tuple[int, int]:
    """``(batch, seq)`` of a run of ``workload`` (its defaults where None), refused before anything
    is built when the model cannot take that sequence length, or when one batch (with
    ``host_cpu``, also the activations kept for backward) cannot fit in this machine's memory:
    refusing a lower bound up front is deterministic, unlike waiting for the allocator."""
    batch, seq = batch or workload.default_batch, seq or workload.default_seq
    limit = workload.max_seq
    if limit is not None and seq > limit:
        if limit == 1:
            raise UsageError(f"--seq {seq}: workload {workload.name!r} has no sequence dimension (a sample is one token); leave --seq out")
        raise UsageError(
            f"--seq {seq} is longer than the context length of workload {workload.name!r} ({limit} positions); use --seq {limit} or less"
        )
    per_token = workload.batch_bytes_per_token + (workload.activation_bytes_per_token if host_cpu else 0)
    need, memory = batch * seq * per_token, host_memory_bytes()
    if memory and need > memory:
        raise UsageError(
            f"--batch {batch} x --seq {seq}: one step of {workload.name!r} needs at least {_gib(need)} of host memory, "
            f"more than this machine's {_gib(memory)}; use a smaller --batch or --seq"
        )
    return batch, seq


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is an allocator giving up: MemoryError, torch's
    OutOfMemoryError, or the RuntimeError torch's CPU allocator raises."""
    while exc is not None:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and any(s in text for s in ("can't allocate memory", "out of memory", "not enough memory")):
            return True
        exc = exc.__cause__
    return False


# -- the one error boundary -------------------------------------------------------------------------

# Bad input: anything anychip refuses on purpose, and the ValueError / TypeError that a bad
# value raises from the libraries underneath (an unparsable file, a wrong-typed factory).
BAD_INPUT = (AnychipError, ValueError, TypeError)


def one_line(message) -> str:
    """``message`` (an exception or text) as one line; an exception without text gives its type."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text or (type(message).__name__ if isinstance(message, BaseException) else "")


def debug_requested(args=None) -> bool:
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no", "off")


def run_command(args, command: str) -> int:
    """Run a parsed command (``args.func(args)``) and return its exit status. Bad input is one
    line on stderr, ``anychip COMMAND: error: ...``, and status 2; Ctrl-C is 130; any other
    exception is a bug: one line naming its type, status 1. ``--debug`` or ``$ANYCHIP_DEBUG=1``
    re-raises instead, so the traceback shows."""
    debug = debug_requested(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("anychip: interrupted", file=sys.stderr)
        return 130
    except BAD_INPUT as exc:
        if debug:
            raise
        print(f"anychip {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug still ends in one line, and --debug shows it whole
        if debug:
            raise
        print(f"anychip {command}: internal error: {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def check_output(flag: str, path: str | None) -> None:
    """An output path that cannot be written is a usage error, found before any work starts."""
    if path is None:
        return
    if not path.strip():
        raise UsageError(f"{flag}: empty path")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")
