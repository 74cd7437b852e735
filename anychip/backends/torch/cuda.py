"""`cuda`: PyTorch on NVIDIA GPUs: torch.compile (inductor) on by default, bf16 autocast,
fused AdamW, pinned host memory with non-blocking copies, NCCL for process groups."""

from __future__ import annotations

import os

from anychip.backends.facts import host, nvidia, peaks
from anychip.backends.registry import Availability
from anychip.backends.torch.base import NativeTorchBackend, Traits

INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu128"


def probe(name: str = "cuda") -> Availability:
    torch_version = host.version("torch")
    if torch_version is None:
        return Availability(name, False, "torch is not installed", install=INSTALL)
    versions = {"torch": torch_version}
    if "+cpu" in torch_version:
        return Availability(name, False, f"torch {torch_version} is a CPU-only build", versions=versions, install=INSTALL)
    gpus = nvidia.nvidia_host()
    if not gpus.gpus:
        return Availability(name, False, "no NVIDIA GPU found (no /dev/nvidia0)", versions=versions)
    if gpus.driver:
        versions["driver"] = gpus.driver
    return Availability(name, True, f"{gpus.gpus} NVIDIA GPU(s)", devices=gpus.gpus, device_kind=gpus.kind, versions=versions)


class CudaBackend(NativeTorchBackend):
    name = "cuda"
    traits = Traits(device_type="cuda", dist_backend="nccl", compile_by_default=True, fused_optimizer=True, pin_memory=True)

    @property
    def device(self):
        import torch

        # One GPU per process; torchrun says which through LOCAL_RANK.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        import torch

        # The name torch reports is the one the datasheet table is written against.
        return peaks.peak_flops(torch.cuda.get_device_name(self.device), dtype)


def create(availability: Availability) -> CudaBackend:
    import torch

    backend = CudaBackend(availability)
    torch.cuda.set_device(backend.device)
    # TF32 stays as the user set it (torch.set_float32_matmul_precision): a library that flips
    # global numerics behind the user's back breaks fp32 parity checks.
    return backend
