"""anychip.nn: drop-in modules with the state_dict keys of the plain PyTorch layers."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anychip.kernels as kernels
from anychip.nn import Attention, LinearCrossEntropyHead, RMSNorm, Rotary, SwiGLU


class PlainLlamaMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _same_keys_and_load(ours: nn.Module, plain: nn.Module) -> None:
    assert list(ours.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        assert a.shape == b.shape, name
    ours.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("kernels_mode", ["auto", "reference"])
def test_rms_norm_is_torch_rms_norm(kernels_mode):
    plain = nn.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        plain.weight.normal_()
    ours = RMSNorm(12, eps=1e-6, kernels=kernels_mode)
    _same_keys_and_load(ours, plain)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), plain(x))


@pytest.mark.parametrize("kernels_mode", ["auto", "reference"])
def test_swiglu_is_the_llama_mlp(kernels_mode):
    torch.manual_seed(0)
    plain, ours = PlainLlamaMLP(8, 20), SwiGLU(8, 20, kernels=kernels_mode)
    _same_keys_and_load(ours, plain)
    x = torch.randn(4, 8, requires_grad=True)
    torch.testing.assert_close(ours(x), plain(x))
    ours(x).sum().backward()
    assert ours.gate_proj.weight.grad is not None


@pytest.mark.parametrize("kernels_mode", ["auto", "reference", "torch_chunked"])
def test_head_is_a_linear_then_cross_entropy(kernels_mode):
    torch.manual_seed(0)
    plain = nn.Linear(8, 30, bias=False)
    head = LinearCrossEntropyHead(8, 30, chunk_size=3, kernels=kernels_mode)
    _same_keys_and_load(head, plain)
    h, t = torch.randn(2, 5, 8), torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(head(h, t), F.cross_entropy(plain(h).flatten(0, 1), t.flatten()))
    torch.testing.assert_close(head.logits(h), plain(h))


def test_head_weight_can_be_tied_to_an_embedding():
    embedding = nn.Embedding(30, 8)
    head = LinearCrossEntropyHead(8, 30)
    head.weight = embedding.weight
    tokens = torch.randint(0, 30, (2, 6))
    head(embedding(tokens), tokens).backward()
    assert embedding.weight.grad is not None


def test_rotary_and_attention_have_no_state_and_match_the_reference():
    rot, attn = Rotary(8, max_seq_len=16), Attention(causal=True)
    assert not rot.state_dict() and not attn.state_dict()
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    q_rot, k_rot = rot(q, k)
    eq, ek = kernels.rotary.reference.rotary(q, k, rot.cos[:6], rot.sin[:6])
    torch.testing.assert_close(q_rot, eq)
    torch.testing.assert_close(k_rot, ek)
    torch.testing.assert_close(attn(q_rot, k_rot, v), kernels.attention.reference.attention(q_rot, k_rot, v, True))
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        rot(torch.randn(1, 1, 17, 8), torch.randn(1, 1, 17, 8))


def test_kernels_argument_is_checked_at_construction():
    with pytest.raises(ValueError, match="kernels for rms_norm must be auto, reference or one of"):
        RMSNorm(4, kernels="fast")
    with pytest.raises(ValueError, match="kernels for swiglu"):
        SwiGLU(4, 8, kernels="torch_chunked")  # an implementation of another op
    RMSNorm(4, kernels="triton")  # known name: checked against the backend only when it runs


def test_modules_follow_the_default_backend(monkeypatch):
    """TrainStep sets the default backend; explicit backend= on a module wins."""
    seen = []
    select_module = importlib.import_module("anychip.kernels.selection")
    original = select_module.select
    monkeypatch.setattr(
        select_module, "select", lambda op, backend, mode="auto": seen.append(backend) or original(op, backend, mode)
    )
    kernels.set_default_backend("neuron")  # the reference everywhere; the fixture resets it
    RMSNorm(4)(torch.randn(2, 4))
    RMSNorm(4, backend="cpu")(torch.randn(2, 4))
    assert seen == ["neuron", "cpu"]
