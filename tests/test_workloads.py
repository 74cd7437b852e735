"""Workloads: deterministic models and data, FLOPs per token by the documented formula."""

from __future__ import annotations

import pytest
import torch

from anychip import workloads
from anychip.workloads import gpt, llama


# The small presets share their code with the tiny ones (only the config differs).
@pytest.mark.parametrize("name", ["mlp", "gpt-tiny", "llama-tiny"])
def test_same_seed_same_model_and_data(name):
    w = workloads.get(name)
    a, b = w.build(seed=3), w.build(seed=3)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert not torch.equal(next(w.build(seed=4).parameters()), next(a.parameters()))
    x1, y1 = w.batch(5, 4, 16, seed=1)
    x2, y2 = w.batch(5, 4, 16, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(w.batch(6, 4, 16, seed=1)[0], x1)


def test_language_model_targets_are_shifted_inputs():
    x, y = workloads.get("gpt-tiny").batch(0, 2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.dtype == torch.long and int(x.max()) < gpt.PRESETS["tiny"].vocab


def test_batches_iterator_resumes_at_a_position():
    w = workloads.get("mlp")
    it = w.batches(8, seed=2, start=3)
    assert torch.equal(next(it)[0], w.batch(3, 8, 1, 2)[0])


def test_gpt_small_is_gpt2_124m_and_flops_follow_6n_plus_12ldt():
    model = gpt.build("small")
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    assert 124.0e6 < total < 124.6e6  # GPT-2 124M (vocabulary padded to 50304)
    n = total - c.ctx * c.dim
    assert gpt.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_llama_small_size_and_flops():
    model = llama.build("small")
    total = sum(p.numel() for p in model.parameters())
    assert 120e6 < total < 140e6
    n = total - 32000 * 768
    assert llama.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_mlp_flops_are_6n():
    w = workloads.get("mlp")
    model = w.build()
    assert w.flops_per_token(model, 1) == 6 * sum(p.numel() for p in model.parameters())


def test_unknown_workload_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown workload 'gpt-tiyn'. Did you mean 'gpt-tiny'"):
        workloads.get("gpt-tiyn")


def test_user_workload_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_workload.py").write_text(
        "from anychip import workloads\n"
        "def make():\n"
        "    w = workloads.get('mlp')\n"
        "    return workloads.Workload('mine', w.build, w.batch, w.loss_fn, w.flops_per_token, 4, 1)\n"
        "def wrong():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert workloads.get("my_workload:make").name == "mine"
    with pytest.raises(TypeError, match="must return anychip.workloads.Workload"):
        workloads.get("my_workload:wrong")
    with pytest.raises(ValueError, match="cannot load workload"):
        workloads.get("my_workload:missing")


def test_context_overflow_is_a_clear_error():
    model = gpt.build("tiny")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, gpt.PRESETS["tiny"].ctx + 1, dtype=torch.long))
