"""What every Triton launcher in anychip/kernels needs: where it may run and how wide to launch.

Imports no triton: the launchers import it themselves, this only looks at torch tensors.
"""

from __future__ import annotations

import functools
import os

import torch


def check_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise a one-line error unless Triton can run on these tensors.

    Triton runs CUDA tensors, or CPU tensors in its interpreter (TRITON_INTERPRET=1, read by
    triton when a kernel is decorated, so it must be set before the kernel module is imported).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for t in tensors:
        if t.device.type == "cuda" and not interpret:
            continue
        if t.device.type == "cpu" and interpret:
            continue
        raise RuntimeError(
            f"{op}/triton cannot run on a {t.device.type} tensor "
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}): it needs CUDA "
            "tensors, or CPU tensors with TRITON_INTERPRET=1"
        )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: torch.device) -> int:
    """Programs for a persistent grid: a few per SM on CUDA; a handful in the interpreter."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def num_warps(block_elements: int) -> int:
    """Warps for a block of this many elements (Liger-Kernel's calculate_settings thresholds)."""
    if block_elements >= 32768:
        return 32
    if block_elements >= 8192:
        return 16
    if block_elements >= 2048:
        return 8
    return 4


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
