"""The tiny job whose checkpoint in data/format-1 was written by anychip's format 1 (one
model.safetensors and one optimizer.safetensors, written whole by rank 0): newer versions
must keep loading it."""

from __future__ import annotations

import torch

import anychip as ac


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def make_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return ac.TrainStep(model, loss_fn, ac.AdamW(lr=1e-2, weight_decay=0.1), backend="cpu")


def batch(n: int):
    g = torch.Generator().manual_seed(n)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
