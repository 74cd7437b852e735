"""Llama-style decoder (Touvron et al. 2023): RMSNorm, rotary position embedding (rotate-half
form), SwiGLU MLP, no biases, untied LM head fused with the loss. ``small`` is about 134M
parameters. Norms, MLP, rotary and head are ``anychip.nn`` layers, so the step picks fused
kernels for its backend; ``TrainStep(kernels="reference")`` gives plain PyTorch."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import nn

from anychip import nn as acnn
from anychip.workloads.data import lm_loss, seeded, synthetic_tokens  # noqa: F401 - synthetic_tokens: part of the workload interface


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    ctx: int
    layers: int
    heads: int
    dim: int
    hidden: int
    eps: float = 1e-5
    rope_base: float = 10000.0


PRESETS = {
    "tiny": Config(vocab=256, ctx=128, layers=2, heads=4, dim=64, hidden=176),
    "small": Config(vocab=32000, ctx=1024, layers=12, heads=12, dim=768, hidden=2048),
}


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads = c.heads
        self.attn_norm = acnn.RMSNorm(c.dim, c.eps)
        self.wqkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.mlp_norm = acnn.RMSNorm(c.dim, c.eps)
        self.mlp = acnn.SwiGLU(c.dim, c.hidden)

    def forward(self, x, rotary):
        b, t, d = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        q, k = rotary(q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = acnn.RMSNorm(c.dim, c.eps)
        self.lm_head = acnn.LinearCrossEntropyHead(c.dim, c.vocab)
        # Tables derived from the config, not saved: identical on every backend.
        self.rotary = acnn.Rotary(c.dim // c.heads, c.ctx, c.rope_base)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets=None):
        """The loss when ``targets`` are given (the head fused with cross-entropy), else logits."""
        t = idx.shape[1]
        if t > self.config.ctx:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.config.ctx}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.rotary)
        h = self.norm(x)
        return self.lm_head.logits(h) if targets is None else self.lm_head(h, targets)


def build(preset: str = "tiny", seed: int = 0) -> Llama:
    return seeded(lambda: Llama(PRESETS[preset]), seed)


loss_fn = lm_loss


def flops_per_token(model: Llama, seq: int) -> float:
    """6 N + 12 L d T, N without the input embedding table (a lookup, not a matmul)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    return 6.0 * n + 12.0 * c.layers * c.dim * seq
