"""Test-only backends for ``anychip bench``, loaded through ``ANYCHIP_PLUGINS=anychip_bench_fakes``
in the bench process and in every measuring child. Each is the real ``cpu`` backend with one
behaviour changed; none is ever auto-selected (``auto=False``).

- ``fake-crash``: the process dies with ``os._exit(3)`` inside update ``FAIL_AT`` (no Python
  exception, no chance to report: what a segfault or an OOM kill looks like to the parent);
- ``fake-hang``: sleeps (120 s) inside update ``FAIL_AT`` (appends its pid to ``$ANYCHIP_FAKE_HANG_MARKER``
  first, one line per process, so a test knows when and which processes are stuck);
- ``fake-raise``: raises inside update ``FAIL_AT``;
- ``fake-accel``: works, and claims a peak of :data:`ACCEL_PEAK_FLOPS` so MFU is computed;
- ``fake-missing``: never available.
"""

from __future__ import annotations

import os
import time

from anychip.backends import Availability, Registration, register, registrations
from anychip.backends.torch.cpu import CpuBackend

FAIL_AT = 2  # with --warmup 1 this is the first timed update
ACCEL_PEAK_FLOPS = 1e9
HANG_MARKER_ENV = "ANYCHIP_FAKE_HANG_MARKER"
NAMES = ("fake-crash", "fake-hang", "fake-raise", "fake-accel", "fake-missing")


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


class Hang(_Misbehaving):
    name = "fake-hang"

    def misbehave(self) -> None:
        marker = os.environ.get(HANG_MARKER_ENV)
        if marker:
            with open(marker, "a") as fh:  # one line per process: every rank of a torchrun row hangs
                fh.write(f"{os.getpid()}\n")
        time.sleep(120)  # long enough to be killed; short enough that a broken --timeout fails the test instead of hanging it


class Raise(_Misbehaving):
    name = "fake-raise"

    def misbehave(self) -> None:
        raise RuntimeError("fake device lost")


class Accel(CpuBackend):
    name = "fake-accel"

    def peak_flops(self, dtype: str = "bf16") -> float:
        return ACCEL_PEAK_FLOPS


_CLASSES = {cls.name: cls for cls in (Crash, Hang, Raise, Accel)}


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
