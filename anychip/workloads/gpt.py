"""GPT-2 (Radford et al. 2019), written plainly: pre-LayerNorm blocks, causal SDPA, tanh-GELU,
tied token embedding / LM head (an ``anychip.nn.LinearCrossEntropyHead``: fused with the loss
where the backend has a kernel, so the logits are never materialised). ``small`` is GPT-2 124M with the vocabulary padded from 50257
to 50304 (a multiple of 64, as nanoGPT does) so the LM-head matmul tiles evenly."""

from __future__ import annotations

import dataclasses
import math

import torch
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


PRESETS = {
    "tiny": Config(vocab=256, ctx=128, layers=2, heads=4, dim=64),
    "small": Config(vocab=50304, ctx=1024, layers=12, heads=12, dim=768),
}


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads = c.heads
        self.ln_1 = nn.LayerNorm(c.dim)
        self.attn = nn.Linear(c.dim, 3 * c.dim)
        self.attn_proj = nn.Linear(c.dim, c.dim)
        self.ln_2 = nn.LayerNorm(c.dim)
        self.fc = nn.Linear(c.dim, 4 * c.dim)
        self.fc_proj = nn.Linear(4 * c.dim, c.dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab, c.dim)
        self.wpe = nn.Embedding(c.ctx, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.dim)
        self.lm_head = acnn.LinearCrossEntropyHead(c.dim, c.vocab)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 2:
                # GPT-2: residual projections scaled by 1/sqrt(2 L)
                std = 0.02 / math.sqrt(2 * c.layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets=None):
        """The loss when ``targets`` are given (the head fused with cross-entropy), else logits."""
        t = idx.shape[1]
        if t > self.config.ctx:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.config.ctx}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        return self.lm_head.logits(h) if targets is None else self.lm_head(h, targets)


def build(preset: str = "tiny", seed: int = 0) -> GPT:
    return seeded(lambda: GPT(PRESETS[preset]), seed)


loss_fn = lm_loss


def flops_per_token(model: GPT, seq: int) -> float:
    """6 N + 12 L d T (Kaplan et al. 2020; PaLM appendix B). N counts every parameter that
    takes part in a matmul: the position table does not, the tied token table does (LM head)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6.0 * n + 12.0 * c.layers * c.dim * seq
