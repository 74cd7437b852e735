"""Run under ``torchrun --standalone --nproc-per-node 2`` by tests/test_torchrun_exit.py: a
script that trains a few DDP steps on the CPU (gloo) and ends, with no teardown of its own.

``ends``: both ranks train and return; the process group is left by anychip at exit.
``leave-early``: rank 1 leaves with ``os._exit(0)`` after training (skipping every exit
handler, as a rank that died would), so rank 0's teardown finds a peer missing.
"""

from __future__ import annotations

import os
import sys

import torch

import anychip as ac
from anychip import distributed

STEPS = 3


def main(mode: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    step = ac.TrainStep(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), ac.SGD(lr=0.1),
                        backend="cpu", parallel="ddp")
    for i in range(STEPS):
        g = torch.Generator().manual_seed(i)
        step((torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)))
    if mode == "leave-early" and distributed.rank() == 1:
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
