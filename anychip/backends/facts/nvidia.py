"""NVIDIA GPUs, seen through ``/dev/nvidia<N>`` and ``nvidia-smi`` (no CUDA library is loaded)."""

from __future__ import annotations

import dataclasses

from anychip.backends.facts import host


@dataclasses.dataclass(frozen=True)
class NvidiaHost:
    gpus: int  # /dev/nvidia<N> nodes
    kind: str  # the first GPU's name from nvidia-smi, "" when it is absent or failed
    driver: str


def nvidia_host() -> NvidiaHost:
    gpus = host.device_files("/dev/nvidia")
    kind = driver = ""
    if gpus:
        smi = host.run_tool(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if smi and smi[0] == 0 and smi[1].strip():
            first = smi[1].strip().splitlines()[0].split(",")
            kind = first[0].strip()
            driver = first[1].strip() if len(first) > 1 else ""
    return NvidiaHost(len(gpus), kind, driver)
