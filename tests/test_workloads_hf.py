"""Hugging Face architectures as workloads: built offline from their configs, deterministic,
and training the same on ``cpu``, ``jax:cpu`` and a plain PyTorch loop.

Measured on the development machine (torch 2.13 CPU, transformers 5.24, jax 0.10, 3 AdamW
steps, accumulate=2): loss relative difference cpu vs jax:cpu <= 1.4e-7 for every model type,
weights within 0.043 lr (elements whose gradient is float32 noise, explained below); the cpu
step against a hand-written torch.optim.AdamW loop is bit-identical, accumulate=2 against 1
within 1.4e-7. The loss tolerance is tests/test_jax_parity.py's, 10x over the measurements.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import anychip as ac
from anychip.errors import InvalidArgumentError
from anychip.workloads import hf
from support import requires

# No test here may reach the Hugging Face Hub: everything is built from config classes.
os.environ["HF_HUB_OFFLINE"] = "1"

HF = requires("transformers")
JAX = requires("transformers", "jax", "torchax", "optax")
STEPS = 3
LOSS_RTOL = 2e-6
ADAMW_ATOL_IN_LRS = 1 / 30
SPEC = ac.AdamW(lr=1e-3, weight_decay=0.1)


BATCH, SEQ = 2, 48  # longer than mistral's 32-token window


def hf_vocab(model_type):
    return hf.ARCHITECTURES[model_type].sizes["tiny"].vocab


def _data(w, seed=0):
    return [w.batch(i, BATCH, SEQ, seed=seed) for i in range(STEPS)]


@HF
@pytest.mark.parametrize("model_type", hf.MODEL_TYPES)
def test_tiny_builds_offline_deterministically_and_gives_a_finite_loss(model_type, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a Hugging Face workload tried to open a network connection")

    monkeypatch.setattr("socket.socket.connect", no_network)
    w = hf.hf_workload(model_type, "tiny")
    a, b, other = w.build(seed=3), w.build(seed=3), w.build(seed=4)
    assert sum(p.numel() for p in a.parameters()) < 2_000_000
    assert a.config._attn_implementation == "sdpa" and not a.config.use_cache
    dropouts = {k: v for k, v in a.config.to_dict().items() if ("drop" in k) and v is not None}
    assert dropouts and all(v == 0 for v in dropouts.values()), dropouts
    assert all(m.p == 0 for m in a.modules() if isinstance(m, torch.nn.Dropout))
    sa, sb, so = a.state_dict(), b.state_dict(), other.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], so[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    loss = w.loss_fn(a, w.batch(0, w.default_batch, w.default_seq))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # an untrained model predicts about uniformly: the loss is near ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(a.config.vocab_size)))) < 0.5


@HF
@pytest.mark.parametrize("model_type", hf.MODEL_TYPES)
def test_batches_are_a_pure_function_of_step_and_seed(model_type):
    w = hf.hf_workload(model_type)
    b1, b2 = w.batch(5, 4, 32, seed=1), w.batch(5, 4, 32, seed=1)
    assert b1.keys() == {"input_ids", "labels"} and all(torch.equal(b1[k], b2[k]) for k in b1)
    assert not torch.equal(w.batch(6, 4, 32, seed=1)["input_ids"], b1["input_ids"])
    assert not torch.equal(w.batch(5, 4, 32, seed=2)["input_ids"], b1["input_ids"])
    ids = b1["input_ids"]
    assert ids.shape == (4, 32) and ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < hf_vocab(model_type)


@HF
def test_decoder_labels_are_the_inputs():
    b = hf.hf_workload("llama").batch(0, 2, 16)
    assert torch.equal(b["labels"], b["input_ids"]) and b["labels"] is not b["input_ids"]


@HF
def test_bert_masks_15_percent_of_every_row():
    vocab, seq = hf_vocab("bert"), 40
    b = hf.hf_workload("bert").batch(2, 8, seq, seed=1)
    ids, labels = b["input_ids"], b["labels"]
    predicted = labels != -100
    assert (predicted.sum(dim=1) == round(0.15 * seq)).all()  # the same count per row: micro-batch means agree
    assert int(labels[predicted].max()) < vocab - 1  # targets are real tokens, never the mask id
    assert (ids[~predicted] != vocab - 1).all()  # the mask id appears only where a token is predicted
    shown_masked = (ids == vocab - 1) & predicted
    assert 0.6 < shown_masked.sum() / predicted.sum() < 0.95  # about 80 % show the mask token
    assert not torch.equal(hf.hf_workload("bert").batch(3, 8, seq, seed=1)["labels"] != -100, predicted)


@HF
def test_mistral_sliding_window_is_in_effect():
    import transformers

    from anychip.workloads.data import seeded

    w = hf.hf_workload("mistral")
    windowed = w.build(seed=0).eval()
    config = hf.hf_config("mistral")
    window, config.sliding_window = config.sliding_window, None
    full = seeded(lambda: transformers.MistralForCausalLM(config), 0).eval()
    ids = w.batch(0, 2, w.default_seq)["input_ids"]
    with torch.no_grad():
        diff = (windowed(input_ids=ids).logits - full(input_ids=ids).logits).abs().amax(dim=(0, 2))
    assert window < w.default_seq
    assert float(diff[:window].max()) == 0.0 and float(diff[window + 1:].min()) > 0.0


@HF
@pytest.mark.parametrize("model_type", hf.MODEL_TYPES)
def test_flops_per_token_are_6n_without_embedding_tables_plus_12ldt(model_type):
    model = hf.build(model_type)
    s = hf.ARCHITECTURES[model_type].sizes["tiny"]
    total = sum(p.numel() for p in model.parameters())
    lookups = {  # tables that are only looked up; a tied token table is still the LM head's matmul
        "llama": s.vocab * s.hidden, "qwen2": s.vocab * s.hidden, "mistral": s.vocab * s.hidden,
        "gpt2": s.ctx * s.hidden, "bert": s.ctx * s.hidden + 2 * s.hidden,
    }[model_type]
    assert hf.flops_per_token(model, 64) == 6 * (total - lookups) + 12 * s.layers * s.hidden * 64


@HF
def test_small_is_the_gpt2_small_and_bert_base_scale():
    import transformers

    counts = {}
    for model_type in hf.MODEL_TYPES:
        config = hf.hf_config(model_type, "small")
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = getattr(transformers, hf.ARCHITECTURES[model_type].model)(config)
        counts[model_type] = sum(p.numel() for p in model.parameters())
    d, layers = 768, 12
    assert counts["gpt2"] == 50304 * d + 1024 * d + layers * (12 * d * d + 13 * d) + 2 * d  # anychip's gpt-small
    assert 109e6 < counts["bert"] < 110e6  # BERT-base with its MLM head, no pooler
    assert all(120e6 < counts[t] < 140e6 for t in ("llama", "qwen2", "mistral"))


def _plain_torch_losses(w):
    model = w.build(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=SPEC.lr, betas=SPEC.betas, eps=SPEC.eps, weight_decay=SPEC.weight_decay)
    losses = []
    for batch in _data(w):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


@HF
@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_cpu_step_matches_a_plain_torch_loop_and_splits_dict_batches(model_type):
    w = hf.hf_workload(model_type)
    ref, ref_model = _plain_torch_losses(w)
    step = ac.TrainStep(w.build(seed=1), w.loss_fn, SPEC, backend="cpu")
    got = [step(b) for b in _data(w)]
    assert [o.tokens for o in got] == [BATCH * SEQ] * STEPS
    assert [o.loss for o in got] == pytest.approx(ref, rel=1e-6, abs=0)
    ref_params = dict(ref_model.named_parameters())
    for n, p in step.model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[n].detach(), rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # two micro-batches of a dict batch: the same mean loss (bert: the same number of masked tokens per row)
    split = ac.TrainStep(w.build(seed=1), w.loss_fn, SPEC, backend="cpu", accumulate=2)
    assert [split(b).loss for b in _data(w)] == pytest.approx(ref, rel=LOSS_RTOL, abs=0)


@JAX
@pytest.mark.parametrize(
    "model_type", ["llama", "bert", "mistral", pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("qwen2", marks=pytest.mark.slow)]
)
def test_jax_cpu_trains_like_torch_cpu(model_type):
    w = hf.hf_workload(model_type)
    model = w.build(seed=1)
    steps = {be: ac.TrainStep(copy.deepcopy(model), w.loss_fn, SPEC, backend=be, accumulate=2) for be in ("cpu", "jax:cpu")}
    out = {be: [s(b) for b in _data(w)] for be, s in steps.items()}
    for r, g in zip(out["cpu"], out["jax:cpu"]):
        assert abs(g.loss - r.loss) <= LOSS_RTOL * abs(r.loss), (g.step, g.loss, r.loss)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(steps["cpu"].model.parameters(), model.parameters()))
    assert moved > SPEC.lr  # the steps changed the weights: the comparison below means something
    # AdamW moves an element whose gradient is float32 noise by about lr in the noise's direction
    # (bert: cls.predictions.transform.dense.weight[62, 13], first gradient -2.9e-8 against a median
    # of 1e-2): so every element within 2 lr, and all but one in a thousand within lr / 30.
    ref_params = dict(steps["cpu"].model.named_parameters())
    for n, p in steps["jax:cpu"].model.named_parameters():
        diff = (p.detach() - ref_params[n].detach()).abs()
        assert float(diff.max()) <= 2 * SPEC.lr, n
        assert int((diff > ADAMW_ATOL_IN_LRS * SPEC.lr).sum()) <= diff.numel() // 1000, (n, float(diff.max()))


def test_unknown_model_type_or_size_is_refused_in_one_line():
    with pytest.raises(InvalidArgumentError, match=r"unknown Hugging Face model type 'llamma'; supported: llama, gpt2, qwen2") as e:
        hf.hf_workload("llamma")
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidArgumentError, match=r"unknown size 'medium' for hf:bert; supported: tiny, small") as e:
        hf.hf_workload("bert", "medium")
    assert "\n" not in str(e.value)


@HF
def test_a_sequence_longer_than_the_context_is_refused():
    w = hf.hf_workload("gpt2")
    assert w.max_seq == w.build().config.n_positions == 512
    with pytest.raises(InvalidArgumentError, match=r"hf:gpt2-tiny: sequence length 513 exceeds the model's 512 positions"):
        w.batch(0, 2, 513)


def test_missing_transformers_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ImportError, match=r"need transformers: pip install 'anychip\[hf\]'$"):
        hf.hf_workload("llama")


def test_train_takes_an_hf_workload_and_its_size():
    """``anychip train --workload hf:<type> --size tiny`` trains it; a size for a built-in is refused."""
    import contextlib
    import io

    from anychip.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
        code = main(["train", "--workload", "hf:gpt2", "--size", "tiny", "--steps", "2", "--backend", "cpu"])
    assert code == 0, err.getvalue()
    assert "hf:gpt2-tiny on cpu" in out.getvalue()
    with contextlib.redirect_stderr(err):
        assert main(["train", "--workload", "gpt-tiny", "--size", "small"]) == 2
    assert "--size applies to hf:" in err.getvalue()
