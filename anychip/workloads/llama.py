"""Llama-style decoder (Touvron et al. 2023): RMSNorm, rotary position embedding (rotate-half
form), SwiGLU MLP, no biases, untied LM head. ``small`` is about 134M parameters."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from anychip.workloads.data import synthetic_tokens  # noqa: F401 - part of the workload interface


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads = c.heads
        self.attn_norm = RMSNorm(c.dim, c.eps)
        self.wqkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.mlp_norm = RMSNorm(c.dim, c.eps)
        self.w_gate = nn.Linear(c.dim, c.hidden, bias=False)
        self.w_up = nn.Linear(c.dim, c.hidden, bias=False)
        self.w_down = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.dim, c.eps)
        self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
        half = c.dim // c.heads // 2
        inv_freq = 1.0 / (c.rope_base ** (torch.arange(half, dtype=torch.float32) / half))
        angles = torch.outer(torch.arange(c.ctx, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: [T, head_dim]
        # Not trained and not saved: derived from the config, identical on every backend.
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        t = idx.shape[1]
        if t > self.config.ctx:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.config.ctx}")
        x = self.embed(idx)
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(preset: str = "tiny", seed: int = 0) -> Llama:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Llama(PRESETS[preset])


def loss_fn(model, batch):
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def flops_per_token(model: Llama, seq: int) -> float:
    """6 N + 12 L d T, N without the input embedding table (a lookup, not a matmul)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    return 6.0 * n + 12.0 * c.layers * c.dim * seq
