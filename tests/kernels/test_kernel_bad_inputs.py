"""Bad inputs raise one clear line (TypeError / ValueError) from the public entry, before an
implementation is even selected (so before any kernel launch)."""

from __future__ import annotations

import importlib

import pytest
import torch

from anychip.kernels.attention import attention
from anychip.kernels.linear_cross_entropy import linear_cross_entropy
from anychip.kernels.rms_norm import rms_norm
from anychip.kernels.rotary import rotary, rotary_tables
from anychip.kernels.swiglu import swiglu


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(device=device, dtype=dtype)


cos, sin = rotary_tables(5, 8)
META = "meta"

CASES = [
    # rms_norm
    (lambda: rms_norm(r(3, 8), r(7)), ValueError, "weight must have shape [N] with N = x.shape[-1]"),
    (lambda: rms_norm(r(3, 8), r(8, 1)), ValueError, "weight must have shape [N]"),
    (lambda: rms_norm(torch.ones(3, 8, dtype=torch.int32), r(8)), TypeError, "must be floating point"),
    (lambda: rms_norm(r(3, 8), r(8, device=META)), ValueError, "x is on cpu but weight is on meta"),
    (lambda: rms_norm(r(3, 8), r(8), eps=-1.0), ValueError, "eps must be a non-negative float"),
    (lambda: rms_norm([1.0], r(8)), TypeError, "must be tensors"),
    # swiglu
    (lambda: swiglu(r(3, 8), r(3, 9)), ValueError, "must have the same shape"),
    (lambda: swiglu(r(3, 8), r(3, 8, dtype=torch.bfloat16)), TypeError, "same floating dtype"),
    (lambda: swiglu(r(3, 8), r(3, 8, device=META)), ValueError, "gate is on cpu but up is on meta"),
    # rotary
    (lambda: rotary(r(1, 2, 5, 8), r(1, 2, 5, 8), cos[:4], sin[:4]), ValueError, "cos and sin must be [T, D/2]"),
    (lambda: rotary(r(1, 2, 5, 7), r(1, 2, 5, 7), cos, sin), ValueError, "head dim D must be even"),
    (lambda: rotary(r(2, 5, 8), r(2, 5, 8), cos, sin), ValueError, "must be [B, H, T, D]"),
    (lambda: rotary(r(1, 2, 5, 8), r(2, 2, 5, 8), cos, sin), ValueError, "must match q"),
    (lambda: rotary(r(1, 2, 5, 8), r(1, 2, 5, 8), cos.requires_grad_(True), sin), ValueError, "constants"),
    (lambda: rotary(r(1, 2, 5, 8), r(1, 2, 5, 8, device=META), cos, sin), ValueError, "different devices"),
    # attention
    (lambda: attention(r(1, 3, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8)), ValueError, "multiple of key/value heads"),
    (lambda: attention(r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 2, 6, 8)), ValueError, "need k = v"),
    (lambda: attention(r(1, 2, 5, 8), r(1, 2, 5, 4), r(1, 2, 5, 4)), ValueError, "need k = v"),
    (lambda: attention(r(1, 2, 5, 8), r(1, 2, 5, 8, dtype=torch.float16), r(1, 2, 5, 8)),
     TypeError, "one floating dtype"),
    (lambda: attention(r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), scale="1"), TypeError, "scale must be a float"),
    # linear_cross_entropy
    (lambda: linear_cross_entropy(r(4, 8), r(10, 7), torch.zeros(4, dtype=torch.long)), ValueError, "weight [V, d]"),
    (lambda: linear_cross_entropy(r(4, 8), r(10, 8), torch.zeros(5, dtype=torch.long)), ValueError, "targets shape"),
    (lambda: linear_cross_entropy(r(4, 8), r(10, 8), torch.zeros(4)), TypeError, "targets must be int64 or int32"),
    (lambda: linear_cross_entropy(r(4, 8), r(10, 8, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long)),
     TypeError, "same floating dtype"),
    (lambda: linear_cross_entropy(r(4, 8), r(10, 8), torch.zeros(4, dtype=torch.long), reduction="avg"),
     ValueError, "reduction must be one of"),
    (lambda: linear_cross_entropy(r(4, 8), r(10, 8), torch.zeros(4, dtype=torch.long), chunk_size=0),
     ValueError, "chunk_size must be a positive int"),
    (lambda: linear_cross_entropy(r(4, 8), r(10, 8), torch.zeros(4, dtype=torch.long, device=META)),
     ValueError, "inputs on different devices"),
]


@pytest.mark.parametrize("call, error, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_raises_one_line(call, error, message, monkeypatch):
    selected = []
    monkeypatch.setattr(
        importlib.import_module("anychip.kernels.selection"), "_selected_name", lambda *a: selected.append(a) or "reference"
    )
    with pytest.raises(error) as excinfo:
        call()
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert not selected


def test_autocast_casts_the_head_like_an_unfused_linear():
    """Under autocast an fp32 weight meets bf16 activations; the entry casts both, as
    autocast does for the matmul of an nn.Linear head, instead of rejecting the mix."""
    h, w, t = r(6, 8, dtype=torch.bfloat16), r(10, 8), torch.randint(0, 10, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, kernels="reference")
        expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), t)
    torch.testing.assert_close(loss, expected)
