"""Process groups on the engines users already run (torchrun / torch.distributed).

Reads the standard torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import datetime
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_process_group(backend: str, timeout_s: float = 300.0) -> None:
    """Join the process group torchrun set up; a no-op outside torchrun or when already joined."""
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
