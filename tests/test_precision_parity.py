"""bf16 is torch autocast on every backend: `jax:cpu` applies torch's CPU autocast policy to the
traced ops (anychip/backends/jax/autocast.py) and tracks `cpu` bf16, the plain torch.autocast
loop, as closely as two correct autocast implementations track each other.

Measured (torch 2.13 CPU, jax 0.10.2, the one-layer models below, 10 AdamW steps; both columns
the largest per-step relative loss difference; the bound is max(2 x the second, 5e-4)):

    model           jax:cpu vs cpu bf16   cpu bf16 vs fp32   first step (same weights)
    gpt-tiny        4.2e-5                2.3e-5             3.6e-6
    llama-tiny      2.1e-5                1.3e-5             3.4e-6
    plain torch.nn  9.3e-5                1.1e-4             6.5e-6
    HF Llama        1.7e-5                1.3e-5             4.5e-6
    HF BERT         5.3e-5                8.0e-5             1.5e-5

(before, with every input cast to bf16: 2.3e-3 on the plain torch.nn model). Later steps add
bf16 gradient rounding amplified by AdamW. Linear(32, 1000) + cross-entropy: 6.6e-8 (before:
6.4e-5). XLA's excess precision: left on; off, these move both ways (gpt-tiny 4.2e-5 -> 2.8e-5,
plain torch.nn 9.3e-5 -> 1.1e-4, BERT 5.3e-5 -> 5.2e-5) and the Linear example not at all.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import anychip as ac
from anychip.workloads import gpt, llama
from support import requires

pytestmark = requires("jax", "torchax", "optax")

STEPS = 10
VOCAB = 96


def _tokens(step, b=4, t=16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (b, t + 1), generator=g)


class PlainLayers(nn.Module):
    """Only torch.nn layers: TransformerEncoderLayer (MHA inside), LayerNorm, an untied head."""

    def __init__(self, d=32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.block = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.norm(self.block(self.emb(x), src_mask=mask, is_causal=True)))


def _lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def _hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ))


def _hf_bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def _bert_batch(step):
    ids = _tokens(step)[:, :16]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padded rows: the attention mask reaches SDPA as an additive float mask
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def _lm_batch(step):  # (inputs, targets), as the anychip workloads' models take them
    t = _tokens(step)
    return t[:, :-1], t[:, 1:]


CASES = {
    # name: (build, loss_fn, batch(step), needs)
    "gpt-tiny": (lambda: gpt.GPT(gpt.Config(vocab=VOCAB, ctx=32, layers=1, heads=4, dim=32)), gpt.loss_fn, _lm_batch, ()),
    "llama-tiny": (
        lambda: llama.Llama(llama.Config(vocab=VOCAB, ctx=32, layers=1, heads=4, dim=32, hidden=64)),
        llama.loss_fn, _lm_batch, (),
    ),
    "plain-torch-nn": (PlainLayers, _lm_loss, _tokens, ()),
    "hf-llama": (_hf_llama, lambda m, b: m(input_ids=b, labels=b).loss, lambda s: _tokens(s)[:, :16], ("transformers",)),
    "hf-bert": (_hf_bert, lambda m, b: m(**b).loss, _bert_batch, ("transformers",)),
}


def _record_dtypes(model) -> dict:
    """Floating dtypes of every module's inputs and outputs, at the first forward (the trace on
    jax). Integer dtypes differ by design (JAX runs int64 as int32) and are left out."""
    seen: dict = {}

    def floats(xs):
        xs = xs if isinstance(xs, (tuple, list)) else (xs,)
        return tuple(str(x.dtype) for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point())

    def hook(name):
        def record(module, inputs, output):
            seen.setdefault(name or "<root>", (floats(inputs), floats(output)))

        return record

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name))
    return seen


def _run(case, backend, precision, dtypes=False):
    build, loss_fn, batch, _ = CASES[case]
    torch.manual_seed(0)
    model = build()
    seen = _record_dtypes(model) if dtypes else None
    step = ac.TrainStep(model, loss_fn, optimizer=ac.AdamW(lr=1e-3), backend=backend, precision=precision)
    return [float(step(batch(i)).loss) for i in range(STEPS)], seen


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", [pytest.param(c, marks=requires(*CASES[c][3])) for c in CASES])
def test_jax_bf16_tracks_cpu_autocast(case):
    fp32, _ = _run(case, "cpu", "fp32")
    cpu, cpu_dtypes = _run(case, "cpu", "bf16", dtypes=True)
    jax, jax_dtypes = _run(case, "jax:cpu", "bf16", dtypes=True)
    assert all(math.isfinite(x) for x in jax)
    # the same op policy: every module sees and returns the same floating dtypes
    assert jax_dtypes == cpu_dtypes
    reference = _rel(cpu, fp32)
    assert reference > 0  # cpu really computed in bf16
    assert _rel(jax, cpu) <= max(2 * reference, 5e-4), (jax, cpu, fp32)


def _linear_ce_loss(backend, precision):
    torch.manual_seed(0)
    model = nn.Linear(32, 1000)
    x, y = torch.randn(8, 32), torch.randint(0, 1000, (8,))
    step = ac.TrainStep(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), optimizer=ac.SGD(lr=0.0),
                        backend=backend, precision=precision)
    return float(step((x, y)).loss)


def test_linear_cross_entropy_matches_cpu_autocast():
    """The reported example: fp32 7.187291, cpu bf16 7.187038; jax:cpu gave 7.1875 (a bf16 loss)."""
    fp32, cpu, jax = (_linear_ce_loss(*a) for a in (("cpu", "fp32"), ("cpu", "bf16"), ("jax:cpu", "bf16")))
    assert abs(cpu - fp32) / fp32 > 1e-5  # bf16 logits really
    assert abs(jax - cpu) / cpu < 3e-5


def _env_ops(platform, fn, *tensors):
    """``fn(*tensors)`` traced by torchax under anychip's autocast for ``platform``; its result."""
    import jax.numpy as jnp

    from anychip.backends.jax import autocast
    from anychip.kernels.torchax import environment

    env = environment(platform, "reference")
    autocast.install(env, platform)
    with env.override_property(autocast_dtype=torch.bfloat16):
        args = env.j2t_iso(tuple(jnp.asarray(t.float().numpy()).astype(str(t.dtype).split(".")[1]) for t in tensors))
        with env:
            return fn(*args)


OPS = {
    "linear": lambda x, w, b: F.linear(x, w, b),
    "matmul-operator": lambda x, w, b: x @ w.T,
    "softmax": lambda x, w, b: torch.softmax(x, -1),
    "log_softmax-of-bf16": lambda x, w, b: F.log_softmax(F.linear(x, w), -1),
    "cross_entropy": lambda x, w, b: F.cross_entropy(F.linear(x, w, b), (b[:4] > 0).long()),
    "layer_norm-bf16-input": lambda x, w, b: F.layer_norm(F.linear(x, w), (6,), b, b),
    "cat-promotes": lambda x, w, b: torch.cat([F.linear(x, w), x]),
    "sum-of-bf16": lambda x, w, b: F.linear(x, w).sum(),
    "mse_loss": lambda x, w, b: F.mse_loss(F.linear(x, w), x),
}


@pytest.mark.parametrize("op", OPS)
def test_each_op_returns_the_dtype_cpu_autocast_returns(op):
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 6), torch.randn(6, 6), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = OPS[op](x, w, b)
    got = _env_ops("cpu", OPS[op], x, w, b)
    assert got.dtype == want.dtype


def test_gpu_platforms_apply_the_cuda_list():
    """jax:gpu / jax:tpu stand in for `cuda`: softmax, norms and sums in float32 there."""
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 6), torch.randn(6, 6), torch.randn(6)
    assert _env_ops("gpu", OPS["softmax"], x.bfloat16(), w, b).dtype == torch.float32
    assert _env_ops("gpu", OPS["sum-of-bf16"], x, w, b).dtype == torch.float32
    assert _env_ops("gpu", OPS["linear"], x, w, b).dtype == torch.bfloat16
    assert _env_ops("cpu", OPS["softmax"], x.bfloat16(), w, b).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["cpu", "jax:cpu"])
def test_bf16_pure_feeds_float_inputs_in_bf16(backend):
    """`anychip train --workload mlp --precision bf16-pure` crashed on cpu: float32 inputs met
    bf16 weights. Both engines now cast float inputs, and train the same."""
    from anychip import workloads

    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend=backend, precision="bf16-pure")
    x, y = w.batch(0, 8, 1)
    assert x.dtype == torch.float32
    assert math.isfinite(step((x, y)).loss)
    assert {p.dtype for p in step.model.parameters()} == {torch.bfloat16}
