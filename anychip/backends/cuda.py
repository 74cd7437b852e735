"""`cuda`: PyTorch on NVIDIA GPUs: torch.compile (inductor) on by default, bf16 autocast,
fused AdamW, pinned host memory with non-blocking copies, NCCL for process groups."""

from __future__ import annotations

import os

from anychip.backends import Availability
from anychip.backends import probe as facts
from anychip.backends.base import NativeTorchBackend

INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu128"


def probe(name: str = "cuda") -> Availability:
    torch_version = facts.version("torch")
    if torch_version is None:
        return Availability(name, False, "torch is not installed", install=INSTALL)
    versions = {"torch": torch_version}
    if "+cpu" in torch_version:
        return Availability(name, False, f"torch {torch_version} is a CPU-only build", versions=versions, install=INSTALL)
    gpus = facts.device_files("/dev/nvidia")
    if not gpus:
        return Availability(name, False, "no NVIDIA GPU found (no /dev/nvidia0)", versions=versions)
    kind = ""
    if (smi := facts.run_tool(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])) and smi[0] == 0:
        first = smi[1].strip().splitlines()[0].split(",")
        kind = first[0].strip()
        versions["driver"] = first[1].strip() if len(first) > 1 else ""
    return Availability(name, True, f"{len(gpus)} NVIDIA GPU(s)", devices=len(gpus), device_kind=kind, versions=versions)


class CudaBackend(NativeTorchBackend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    compile_by_default = True
    fused_optimizer = True
    pin_memory = True

    @property
    def device(self):
        import torch

        # One GPU per process; torchrun says which through LOCAL_RANK.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        import torch

        from anychip.bench.peaks import peak_flops

        return peak_flops(torch.cuda.get_device_name(self.device), dtype)


def create(availability: Availability) -> CudaBackend:
    import torch

    backend = CudaBackend(availability)
    torch.cuda.set_device(backend.device)
    # TF32 stays as the user set it (torch.set_float32_matmul_precision): a library that flips
    # global numerics behind the user's back breaks fp32 parity checks.
    return backend
