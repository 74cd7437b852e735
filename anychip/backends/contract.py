"""The device contract: what anychip asks of a backend, and nothing else.

A backend is hardware: where tensors live (``place``, ``place_batch``), how to wait for the
device (``synchronize``), how much memory is in use (``memory_stats``), how fast the device is
(``peak_flops``), its random-number generator (``rng_state``), how to join a process group
(``init_distributed``), and which engine runs a step on it (``make_engine``). The step loop,
the parallel strategy and checkpoints are built on these answers, elsewhere.

Importing this module imports no torch: ``anychip devices`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys

from anychip.backends.facts import peaks
from anychip.backends.registry import Availability, find


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    current_bytes: int | None
    peak_bytes: int | None
    source: str  # what was measured: "device allocator", "process RSS", ...


def process_rss_stats() -> MemoryStats:
    """Peak resident set size of this process: the only honest 'memory' figure on a CPU."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    current = None
    try:
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return MemoryStats(current, peak, "process RSS")


def seed_from_torch() -> int:
    """A 63-bit seed read from torch's CPU generator without drawing from it, for the generators
    ``torch.manual_seed`` does not reach (the XLA device's, a JAX key): the same torch state
    gives the same seed, so ``torch.manual_seed(s)`` governs them as it governs torch's own."""
    import hashlib

    import torch

    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Backend:
    """The contract. A new backend implements the methods that raise here, in one module."""

    name: str = "?"

    def __init__(self, availability: Availability):
        self.availability = availability

    def __repr__(self) -> str:
        return f"<anychip backend {self.name!r}: {self.availability.device_kind or '?'} x{self.availability.devices}>"

    @property
    def registration(self):
        """This backend's row in the registry (every fact about it)."""
        return find(self.name)

    @property
    def device_kind(self) -> str:
        return self.availability.device_kind

    @property
    def device_count(self) -> int:
        return self.availability.devices

    @property
    def devices_in_use(self) -> int:
        """Devices one process drives: what peak_flops() covers and what cost is charged for.
        One for the torch backends (one device per torchrun rank)."""
        return 1

    def place(self, model):
        raise NotImplementedError

    def place_batch(self, batch):
        raise NotImplementedError

    def make_engine(self, spec):
        """The step engine (:class:`anychip.engine.Engine`) for a :class:`anychip.engine.StepSpec`."""
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def memory_stats(self) -> MemoryStats:
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (benchmarks measure the steady state)."""

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        """Dense peak FLOP/s of the devices in use, or None when unknown: the datasheet table
        for this device kind, else the registration's own ``peak_tflops``."""
        per_device = peaks.peak_flops(self.device_kind, dtype)
        if per_device is None:
            reg = self.registration
            tflops = reg.peak_tflops.get(dtype) if reg is not None else None
            per_device = tflops * 1e12 if tflops else None
        return per_device * self.devices_in_use if per_device else None

    def rng_state(self) -> dict:
        """The device generator's state, as ``{name: bytes}`` (empty when the device has no
        generator of its own beyond torch's CPU one, which checkpoints save anyway)."""
        return {}

    def set_rng_state(self, state: dict) -> None:
        """Restore what :meth:`rng_state` returned. A state saved elsewhere may be partial or
        empty: a generator it lacks is seeded from torch's (just restored) CPU generator with
        :func:`seed_from_torch`, so a run resumed from another backend's checkpoint does not
        replay the stream of a fresh run."""

    def init_distributed(self) -> None:
        raise NotImplementedError
