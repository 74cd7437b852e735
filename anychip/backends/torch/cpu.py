"""`cpu`: PyTorch on the host CPU. Always there when torch is; eager by default (compiling a
small model on a 2-core machine costs more than it saves), ``compile=True`` uses inductor."""

from __future__ import annotations

import os

from anychip.backends.facts import host
from anychip.backends.registry import Availability
from anychip.backends.torch.base import NativeTorchBackend, Traits
from anychip.batch import map_tensors


def probe(name: str = "cpu") -> Availability:
    torch_version = host.version("torch")
    if torch_version is None:
        return Availability(name, False, "torch is not installed", install="pip install torch")
    return Availability(
        name, True, f"{os.cpu_count()} cores", devices=1, device_kind=host.cpu_name(), versions={"torch": torch_version}
    )


class CpuBackend(NativeTorchBackend):
    name = "cpu"
    traits = Traits(device_type="cpu", dist_backend="gloo")

    def place_batch(self, batch):
        # A host batch is already in place: one walk, no device object per step (the step
        # overhead benchmark measures microseconds here).
        return map_tensors(lambda t: t if t.device.type == "cpu" else t.cpu(), batch)


def create(availability: Availability) -> CpuBackend:
    return CpuBackend(availability)
