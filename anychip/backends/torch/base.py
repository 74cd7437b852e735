"""The shared base of the native torch accelerators: a backend states its facts in a frozen
:class:`Traits` record and inherits placement, compilation, memory, RNG and process groups.

torch is imported inside methods: importing this module must stay cheap for ``anychip devices``.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

from anychip.backends.contract import Backend, MemoryStats, process_rss_stats, seed_from_torch
from anychip.batch import map_tensors


@dataclasses.dataclass(frozen=True)
class Traits:
    """What differs between the torch stacks, as data.

    device_type:        torch device type, also the autocast device type.
    dist_backend:       torch.distributed process-group backend.
    compile_backend:    ``torch.compile(backend=...)``; None where the stack compiles by itself.
    compile_by_default: ``TrainStep(compile=None)`` compiles.
    compile_options:    extra ``torch.compile`` keyword arguments.
    fused_optimizer:    ``torch.optim`` with ``fused=True`` (one kernel for the whole update).
    pin_memory:         page-locked host staging for asynchronous batch copies.
    lazy_tensors:       ops are traced, not run: reading a value executes the graph so far.
    """

    device_type: str = "cpu"
    dist_backend: str = "gloo"
    compile_backend: str | None = "inductor"
    compile_by_default: bool = False
    compile_options: Mapping = dataclasses.field(default_factory=dict)
    fused_optimizer: bool = False
    pin_memory: bool = False
    lazy_tensors: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile_options", MappingProxyType(dict(self.compile_options)))


class NativeTorchBackend(Backend):
    """cpu, cuda, neuron (and neuron-xla's placement): eager PyTorch, optionally compiled."""

    traits = Traits()

    @property
    def device(self):
        import torch

        return torch.device(self.traits.device_type)

    def place(self, model):
        return model.to(self.device)

    def place_batch(self, batch):
        device, pin = self.device, self.traits.pin_memory

        def move(t):
            if t.device == device:
                return t
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=pin)

        return map_tensors(move, batch)

    def make_engine(self, spec):
        from anychip.backends.torch.engine import TorchEngine

        return TorchEngine(self, spec)

    def make_optimizer(self, spec, params):
        """The torch.optim object for an optimizer spec (fused where the device has kernels), or
        the user's own torch.optim optimizer as given (``params`` is then None)."""
        if params is None:
            return spec
        return spec.to_torch(params, fused=self.traits.fused_optimizer)

    def compile(self, fn):
        """Compile the forward+loss function of a step (the backward follows via AOTAutograd)."""
        import torch

        return torch.compile(fn, backend=self.traits.compile_backend, **self.traits.compile_options)

    def mark_step(self) -> None:
        """Called once at the end of every training step; lazy-tensor backends cut the graph here."""

    def _accelerated(self) -> bool:
        return self.traits.device_type != "cpu"

    def synchronize(self) -> None:
        import torch

        if self._accelerated():
            torch.accelerator.synchronize()

    def memory_stats(self) -> MemoryStats:
        import torch

        if not self._accelerated():
            return process_rss_stats()
        return MemoryStats(torch.accelerator.memory_allocated(), torch.accelerator.max_memory_allocated(), "device allocator")

    def reset_peak_memory(self) -> None:
        import torch

        if self._accelerated():
            torch.accelerator.reset_peak_memory_stats()

    def rng_state(self) -> dict:
        """The accelerator's generator state (the CPU generator is saved by checkpoints anyway)."""
        import torch

        if not self._accelerated():
            return {}
        module = torch.get_device_module(self.traits.device_type)
        return {self.traits.device_type: bytes(module.get_rng_state().numpy().tobytes())}

    def set_rng_state(self, state: dict) -> None:
        import torch

        if not self._accelerated():
            return
        module = torch.get_device_module(self.traits.device_type)
        raw = state.get(self.traits.device_type)
        if raw is not None:
            module.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        elif hasattr(module, "manual_seed"):  # saved where this generator does not exist
            module.manual_seed(seed_from_torch())

    def init_distributed(self) -> None:
        """Join torchrun's process group; an accelerator first binds this process to its
        LOCAL_RANK device (one device per rank; nccl and neuron need it set)."""
        import os

        from anychip.distributed import init_process_group, local_rank

        if self._accelerated() and "WORLD_SIZE" in os.environ:
            import torch

            torch.accelerator.set_device_index(local_rank())
        init_process_group(self.traits.dist_backend)
