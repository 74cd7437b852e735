"""A small MLP classifier on a teacher-labelled Gaussian stream: the quickest real training job."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anychip.workloads.data import generator, seeded

IN, HIDDEN, CLASSES = 32, 128, 10
SAMPLE_BYTES = 4 * IN + 8  # float32 features and an int64 label
ACTIVATION_BYTES = 4 * (4 * HIDDEN + CLASSES)  # two hidden layers, each before and after its GELU, and the logits


def build(seed: int = 0) -> nn.Module:
    return seeded(
        lambda: nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES)), seed
    )


def batch(step: int, batch_size: int, seq: int = 1, seed: int = 0):
    """(x, labels): x ~ N(0, 1); labels from a fixed random linear teacher, so they are learnable."""
    teacher = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(10_000 + seed))
    x = torch.randn(batch_size, IN, generator=generator(step, seed))
    return x, (x @ teacher).argmax(dim=1)


def loss_fn(model, batch):
    x, labels = batch
    return F.cross_entropy(model(x).float(), labels)


def flops_per_token(model: nn.Module, seq: int = 1) -> float:
    """6 N per sample (forward 2N, backward 4N); a 'token' is one sample here."""
    return 6.0 * sum(p.numel() for p in model.parameters())
