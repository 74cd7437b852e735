"""The backend contract, and the shared base for native torch accelerators (cpu, cuda, neuron).

A backend answers seven questions: where tensors live (``place``/``place_batch``), how a
training step is built (``make_engine``), how to wait for the device (``synchronize``), how
much memory is in use (``memory_stats``), how fast the device is (``peak_flops``) and how to
join a process group (``init_distributed``). Everything the native torch stacks have in
common is written once in :class:`NativeTorchBackend`; a subclass only states its facts
(device type, compile backend, process-group name, ...) as class attributes.

torch is imported inside methods: importing this module must stay cheap for ``anychip devices``.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
from anychip.backends import Availability


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    current_bytes: int | None
    peak_bytes: int | None
    source: str  # what was measured: "device allocator", "process RSS", ...


class Backend:
    """The contract. A new backend implements these methods in one module."""

    name: str = "?"

    def __init__(self, availability: Availability):
        self.availability = availability

    def __repr__(self) -> str:
        return f"<anychip backend {self.name!r}: {self.availability.device_kind or '?'} x{self.availability.devices}>"

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
        """Build the step engine for a :class:`anychip.step.StepSpec`."""
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def memory_stats(self) -> MemoryStats:
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (benchmarks measure the steady state)."""

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        """Dense peak FLOP/s of the devices in use, or None when unknown."""
        return None

    def init_distributed(self) -> None:
        raise NotImplementedError


def map_tensors(fn, tree):
    """Apply ``fn`` to every tensor in a batch made of tensors, tuples, lists and dicts."""
    import torch

    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        out = [map_tensors(fn, v) for v in tree]
        return type(tree)(*out) if hasattr(tree, "_fields") else type(tree)(out)
    return tree


def process_rss_stats() -> MemoryStats:
    """Peak resident set size of this process: the only honest 'memory' figure on a CPU."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    current = None
    try:
        with open("/proc/self/statm") as fh:
            import os

            current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return MemoryStats(current, peak, "process RSS")


class NativeTorchBackend(Backend):
    """cpu, cuda and neuron: eager PyTorch on a device, optionally ``torch.compile``-d."""

    device_type: str = "cpu"  # torch device type, also the autocast device type
    dist_backend: str = "gloo"  # torch.distributed process-group backend
    compile_backend: str | None = "inductor"  # torch.compile(backend=...)
    compile_by_default: bool = False
    compile_options: dict = {}  # extra torch.compile keyword arguments
    fused_optimizer: bool = False  # torch.optim fused=True (one kernel for the whole update)
    pin_memory: bool = False  # page-locked host staging for asynchronous copies
    lazy_tensors: bool = False  # ops are traced, not run: reading a value executes the graph so far

    # -- placement ---------------------------------------------------------------------------
    @property
    def device(self):
        import torch

        return torch.device(self.device_type)

    def place(self, model):
        return model.to(self.device)

    def place_batch(self, batch):
        device = self.device

        def move(t):
            if t.device == device:
                return t
            if self.pin_memory and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=self.pin_memory)

        return map_tensors(move, batch)

    # -- step ----------------------------------------------------------------------------------
    def make_engine(self, spec):
        from anychip.step import TorchEngine

        return TorchEngine(self, spec)

    def make_optimizer(self, spec, params):
        """The torch.optim object for an optimizer spec (fused where the device has kernels)."""
        return spec.to_torch(params, fused=self.fused_optimizer)

    def compile(self, fn):
        """Compile the forward+loss function of a step (the backward follows via AOTAutograd)."""
        import torch

        return torch.compile(fn, backend=self.compile_backend, **self.compile_options)

    def mark_step(self) -> None:
        """Called once at the end of every training step; lazy-tensor backends cut the graph here."""

    # -- device facts --------------------------------------------------------------------------
    def synchronize(self) -> None:
        import torch

        if self.device_type != "cpu":
            torch.accelerator.synchronize()

    def memory_stats(self) -> MemoryStats:
        import torch

        if self.device_type == "cpu":
            return process_rss_stats()
        return MemoryStats(
            torch.accelerator.memory_allocated(), torch.accelerator.max_memory_allocated(), "device allocator"
        )

    def reset_peak_memory(self) -> None:
        import torch

        if self.device_type != "cpu":
            torch.accelerator.reset_peak_memory_stats()

    def init_distributed(self) -> None:
        """Join torchrun's process group; an accelerator first binds this process to its
        LOCAL_RANK device (one device per rank; nccl and neuron need it set)."""
        from anychip.distributed import init_process_group, local_rank

        if self.device_type != "cpu" and "WORLD_SIZE" in os.environ:
            import torch

            torch.accelerator.set_device_index(local_rank())
        init_process_group(self.dist_backend)

