"""torch.compile(fullgraph=True) keeps every anychip op in one graph, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, TRITON_RUNS

import anychip.kernels  # noqa: F401  (registers the ops)
from anychip.kernels.attention import attention, attention_op
from anychip.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_op
from anychip.kernels.rms_norm import rms_norm, rms_norm_op
from anychip.kernels.rotary import rotary, rotary_op, rotary_tables
from anychip.kernels.swiglu import swiglu, swiglu_op

B, H, T, D, V = 2, 2, 8, 8, 37
KERNEL = "triton" if TRITON_RUNS else "reference"
OPS = ["rms_norm", "rotary", "attention", "swiglu", "linear_cross_entropy"]
pytestmark = pytest.mark.before_torchax  # see tests/conftest.py


def _params():
    gen = torch.Generator().manual_seed(0)
    shapes = [(B, T, 16), (16,), (16, 3 * H * D), (H * D, 24), (H * D, 24), (V, 24)]
    params = [(torch.randn(s, generator=gen) * 0.3).to(DEVICE).requires_grad_(True) for s in shapes]
    targets = torch.randint(0, V, (B * T,), generator=gen).to(DEVICE)
    return params, targets


def _through_ops(x, w, wqkv, wg, wu, head, targets, cos, sin):
    """Every custom op called directly, with implementations that run on this machine."""
    h = rms_norm_op(x, w, 1e-6, KERNEL)
    q, k, v = (h @ wqkv).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = rotary_op(q, k, cos, sin, KERNEL)
    a = attention_op(q, k, v, True, None, "reference").transpose(1, 2).reshape(B * T, H * D)
    m = swiglu_op(a @ wg, a @ wu, KERNEL)
    return linear_cross_entropy_op(m, head, targets, -100, "mean", 5, "torch_chunked")[0]


def _through_entries(x, w, wqkv, wg, wu, head, targets, cos, sin):
    """The public entries with kernels="auto": dispatch must not break the graph."""
    h = rms_norm(x, w)
    q, k, v = (h @ wqkv).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = rotary(q, k, cos, sin)
    a = attention(q, k, v, True).transpose(1, 2).reshape(B * T, H * D)
    m = swiglu(a @ wg, a @ wu)
    return linear_cross_entropy(m, head, targets, chunk_size=5)


def _eager_and_compiled(fn, backend):
    params, targets = _params()
    cos, sin = rotary_tables(T, D, device=DEVICE)
    loss = fn(*params, targets, cos, sin)
    grads = torch.autograd.grad(loss, params)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    c_loss = compiled(*params, targets, cos, sin)
    c_grads = torch.autograd.grad(c_loss, params)
    torch.testing.assert_close(c_loss, loss)
    for a, e in zip(c_grads, grads):
        torch.testing.assert_close(a, e)


def test_every_op_in_one_graph_forward_and_backward():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    _eager_and_compiled(_through_ops, backend)
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1  # fullgraph: one of each
    for op in OPS:
        assert f"anychip.{op}.default" in graphs["forward"][0], op
        assert f"anychip.{op}_backward.default" in graphs["backward"][0], op


def test_public_entries_compile_without_graph_breaks():
    torch._dynamo.reset()
    params, targets = _params()
    cos, sin = rotary_tables(T, D, device=DEVICE)
    explanation = torch._dynamo.explain(_through_entries)(*params, targets, cos, sin)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_inductor_compiles_the_ops():
    """One real torch.compile (inductor) run: the custom ops stay opaque calls inside it."""
    torch._dynamo.reset()
    _eager_and_compiled(_through_ops, "inductor")


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(True)

    cos, sin = rotary_tables(5, 6, device=DEVICE)
    cases = {
        "rms_norm": (rms_norm_op, (r(3, 7), r(7), 1e-6, "reference")),
        "rotary": (rotary_op, (r(1, 2, 5, 6), r(1, 1, 5, 6), cos, sin, "reference")),
        "attention": (attention_op, (r(1, 2, 5, 6), r(1, 1, 5, 6), r(1, 1, 5, 6), True, None, "reference")),
        "swiglu": (swiglu_op, (r(4, 5), r(4, 5), "reference")),
        "linear_cross_entropy": (
            linear_cross_entropy_op,
            (r(6, 4), r(9, 4), torch.tensor([0, 3, -100, 8, 1, 2], device=DEVICE), -100, "mean", 4, "torch_chunked"),
        ),
    }
    fn, args = cases[op]
    torch.library.opcheck(fn, args)
