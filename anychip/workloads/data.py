"""Seeded synthetic data with structure a model can learn (so that "loss falls" means something)."""

from __future__ import annotations


def generator(step: int, seed: int):
    """A CPU generator whose stream depends only on (seed, step): batches are reproducible and
    a resumed run continues with exactly the data it would have seen."""
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)


def synthetic_tokens(step: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """(inputs, targets) of shape [batch, seq]: a noisy affine recurrence over the vocabulary,
    next = (a * prev + b) mod V with 10% random tokens, so the next token is mostly predictable.
    The recurrence's (a, b) are fixed per seed; the sequences' starts and noise vary per step."""
    import torch

    rule = torch.Generator().manual_seed(seed)
    a = int(torch.randint(1, max(2, vocab), (1,), generator=rule)) | 1
    b = int(torch.randint(0, vocab, (1,), generator=rule))
    g = generator(step, seed)
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    noise = torch.rand(batch, seq, generator=g) < 0.1
    random_tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    for t in range(seq):
        nxt = (a * tokens[:, t] + b) % vocab
        tokens[:, t + 1] = torch.where(noise[:, t], random_tokens[:, t], nxt)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def seeded(factory, seed: int):
    """``factory()`` with torch's global RNG seeded and then restored: the same seed gives the
    same initial weights on every backend, and the caller's RNG stream is left untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def lm_loss(model, batch):
    """Loss of a language model whose ``forward(inputs, targets)`` returns the mean loss."""
    inputs, targets = batch
    return model(inputs, targets)
