"""Test-only backends for ``anychip bench``, loaded through ``ANYCHIP_PLUGINS=anychip_bench_fakes``
in the bench process and in every measuring child. Each is the real ``cpu`` backend with one
behaviour changed; none is ever auto-selected (``auto=False``).

- ``fake-crash``: the process dies with ``os._exit(3)`` inside update ``FAIL_AT`` (no Python
  exception, no chance to report: what a segfault or an OOM kill looks like to the parent);
- ``fake-hang``: sleeps (120 s) inside update ``FAIL_AT`` (appends its pid to ``$ANYCHIP_FAKE_HANG_MARKER``
  first, one line per process, so a test knows when and which processes are stuck);
- ``fake-raise``: raises inside update ``FAIL_AT``;
- ``fake-accel``: works, and claims a peak of :data:`ACCEL_PEAK_FLOPS` so MFU is computed;
- ``fake-slow``: works as ``cpu`` does; with ``$ANYCHIP_FAKE_SLOW`` set, each update then sleeps
  as long as it took, so its steps take about twice as long under the same backend name;
- ``fake-missing``: never available.

Faults injected by tests/bench/test_bench_faults.py, each inside update ``FAIL_AT``:

- ``fake-segv`` / ``fake-abort``: SIGSEGV to itself / ``os.abort()`` (SIGABRT);
- ``fake-hang-noterm``: ignores SIGTERM, then hangs like ``fake-hang``;
- ``fake-memory``: allocates :data:`MEMORY_CHUNK` bytes at a time up to :data:`MEMORY_LIMIT`
  (bounded: the machine is shared), then hangs;
- ``fake-garbage``: writes binary garbage, a forged result event among it, to stdout and stderr
  and exits with status 7;
- ``fake-escape``: starts ``sleep 300.<$ANYCHIP_FAKE_RUN_ID>`` in a session of its own with an empty
  environment (nothing in it says which run it belongs to but its argv), appends its pid to
  ``$ANYCHIP_FAKE_HANG_MARKER``, then finishes;
- ``fake-event-<kind>``: writes one malformed line (:data:`BAD_EVENTS`) on the event socket,
  then finishes as ``cpu`` does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from anychip.backends import Availability, Registration, register, registrations
from anychip.backends.torch.cpu import CpuBackend

FAIL_AT = 2  # with --warmup 1 this is the first timed update
ACCEL_PEAK_FLOPS = 1e9
HANG_MARKER_ENV = "ANYCHIP_FAKE_HANG_MARKER"
SLOW_ENV = "ANYCHIP_FAKE_SLOW"
RUN_ID_ENV = "ANYCHIP_FAKE_RUN_ID"  # digits, unique per test run: in the argv of fake-escape's sleep
MEMORY_CHUNK = 64 << 20
MEMORY_LIMIT = 320 << 20
BAD_EVENTS = {
    "notjson": b"this is not json\n",
    "nophase": b'{"event": "step", "done": 1, "total": 1}\n',
    "rowstr": b'{"event": "result", "row": "fast"}\n',
    "array": b'["event", "ready"]\n',
    "number": b"42\n",
    "binary": b"\xff\xfe\x00{\"event\": \"ready\"}\x80\n",
}
NAMES = ("fake-crash", "fake-hang", "fake-raise", "fake-accel", "fake-slow", "fake-missing", "fake-segv", "fake-abort", "fake-hang-noterm",
         "fake-memory", "fake-garbage", "fake-escape", *(f"fake-event-{kind}" for kind in BAD_EVENTS))


class _Misbehaving(CpuBackend):
    def mark_step(self) -> None:  # called once at the end of every update, inside the step
        self.updates = getattr(self, "updates", 0) + 1
        if self.updates == FAIL_AT:
            self.misbehave()

    def misbehave(self) -> None:
        raise NotImplementedError


class Crash(_Misbehaving):
    name = "fake-crash"

    def misbehave(self) -> None:
        os._exit(3)


def _hang() -> None:
    marker = os.environ.get(HANG_MARKER_ENV)
    if marker:
        with open(marker, "a") as fh:  # one line per process: every rank of a torchrun row hangs
            fh.write(f"{os.getpid()}\n")
    time.sleep(120)  # long enough to be killed; short enough that a broken --timeout fails the test instead of hanging it


class Hang(_Misbehaving):
    name = "fake-hang"

    def misbehave(self) -> None:
        _hang()


class Segv(_Misbehaving):
    name = "fake-segv"

    def misbehave(self) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


class Abort(_Misbehaving):
    name = "fake-abort"

    def misbehave(self) -> None:
        os.abort()


class HangIgnoringSigterm(_Misbehaving):
    name = "fake-hang-noterm"

    def misbehave(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _hang()


class Memory(_Misbehaving):
    name = "fake-memory"

    def misbehave(self) -> None:
        held = []
        while len(held) * MEMORY_CHUNK < MEMORY_LIMIT:
            held.append(b"\x01" * MEMORY_CHUNK)  # written, so resident (not lazily mapped zero pages)
            time.sleep(0.05)
        _hang()


class Garbage(_Misbehaving):
    name = "fake-garbage"

    def misbehave(self) -> None:
        forged = b'{"event": "result", "row": {"losses": []}}\n'  # on stdout, which is not the event channel
        junk = bytes(range(256)) * 64 + b"\x1b[2J\x1b]0;title\x07" + forged + b"\xff" * 5000
        os.write(1, junk)
        os.write(2, junk[::-1])
        os._exit(7)


class Escape(_Misbehaving):
    name = "fake-escape"

    def misbehave(self) -> None:
        sleeper = subprocess.Popen(["sleep", f"300.{os.environ[RUN_ID_ENV]}"], start_new_session=True, env={},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marker = os.environ.get(HANG_MARKER_ENV)
        if marker:  # the test checks that this pid is gone after the run
            with open(marker, "a") as fh:
                fh.write(f"{sleeper.pid}\n")


def _event_socket() -> socket.socket:
    """The measuring child's own connection to the bench (the one ``--events`` names)."""
    path = sys.argv[sys.argv.index("--events") + 1]
    for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # not a socket (or closed meanwhile)
            continue
        try:
            if sock.family == socket.AF_UNIX and sock.getpeername() == path:
                return sock
        except OSError:
            pass
        sock.close()
    raise RuntimeError(f"no connection to {path}")


class BadEvent(_Misbehaving):
    def misbehave(self) -> None:
        with _event_socket() as sock:
            sock.sendall(BAD_EVENTS[self.name.removeprefix("fake-event-")])


class Raise(_Misbehaving):
    name = "fake-raise"

    def misbehave(self) -> None:
        raise RuntimeError("fake device lost")


class Accel(CpuBackend):
    name = "fake-accel"

    def peak_flops(self, dtype: str = "bf16") -> float:
        return ACCEL_PEAK_FLOPS


class Slow(CpuBackend):
    name = "fake-slow"

    def mark_step(self) -> None:  # the end of every update: sleep as long as the update took
        now = time.perf_counter()
        last = getattr(self, "last_mark", None)
        if last is not None and os.environ.get(SLOW_ENV):
            time.sleep(now - last)
        self.last_mark = time.perf_counter()


_CLASSES = {cls.name: cls for cls in (Crash, Hang, Raise, Accel, Slow, Segv, Abort, HangIgnoringSigterm, Memory, Garbage, Escape)}
_CLASSES.update({f"fake-event-{kind}": type(f"BadEvent_{kind}", (BadEvent,), {"name": f"fake-event-{kind}"}) for kind in BAD_EVENTS})


def probe(name: str) -> Availability:
    if name == "fake-missing":
        return Availability(name, False, "the fake device is not plugged in", install="pip install fake-driver")
    return Availability(name, True, "test fake", devices=1, device_kind=f"Fake {name[5:].title()} Device")


def create(availability: Availability):
    return _CLASSES[availability.name](availability)


_known = {r.name for r in registrations()}
for _name in NAMES:
    if _name not in _known:
        register(Registration(_name, __name__, priority=1, auto=False, summary="anychip bench test fake"))
