"""How ``anychip bench`` takes a stop request: SIGINT, SIGTERM or SIGHUP, once or many times.

The first of them becomes a KeyboardInterrupt, so Ctrl-C, ``kill`` and a closed terminal all
take the one path that stops the row in flight and writes the rows that finished. Every later
one is only recorded: a second Ctrl-C a few milliseconds after the first, or a SIGTERM from a
scheduler that lost patience, must not cut that clean-up short and lose the results. The
handlers are Python functions, never ``SIG_IGN`` or a blocked mask, because children inherit
those across ``exec`` and a row would start deaf to its own timeout's signals.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupts:
    """A context manager that installs the handlers for its block and restores the previous
    ones on the way out (``anychip bench`` also runs inside other programs: tests)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._raising = True
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; the defaults stay
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN:
                continue  # started under nohup, or in the background by a shell: ignoring stays
            self._previous[sig] = signal.SIG_DFL if previous is None else previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if self._raising:
            self._raising = False  # before raising: a signal during the clean-up is recorded, nothing more
            raise KeyboardInterrupt

    def hold(self) -> None:
        """From now on a stop request is recorded, not raised (the outputs are being written)."""
        self._raising = False

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def reason(self) -> str:
        """The first stop request, in words ("SIGINT (Ctrl-C)" also for a KeyboardInterrupt
        raised without these handlers)."""
        sig = self.first if self.first is not None else signal.SIGINT
        name = signal.Signals(sig).name
        return f"{name} (Ctrl-C)" if sig == signal.SIGINT else name

    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.first if self.first is not None else signal.SIGINT)
