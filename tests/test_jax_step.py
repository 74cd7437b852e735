"""TrainStep on `jax:cpu`, what is particular to the JAX engine: precision in the lowered program,
jax.jit's program cache, state moving between jax and torch, errors for what JAX cannot trace,
and the attention override. The semantics every backend shares are tests/conformance."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anychip as ac
from anychip import workloads
from anychip.recompile import RecompileError
from support import requires

pytestmark = requires("jax", "torchax", "optax")

LOSS_RTOL = 2e-6  # jax:cpu vs cpu in fp32, see test_jax_parity.py


def data(w, n, batch=8, seq=16, start=0):
    return [w.batch(start + i, batch, seq) for i in range(n)]


# -- precision -----------------------------------------------------------------------------------


def test_bf16_keeps_fp32_master_weights_and_computes_in_bf16():
    import jax.numpy as jnp

    w = workloads.get("mlp")
    batches = data(w, 3)
    fp32 = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend="jax:cpu")
    bf16 = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend="jax:cpu", precision="bf16")
    ref = [fp32(b).loss for b in batches]
    got = [bf16(b).loss for b in batches]
    assert all(math.isfinite(x) for x in got)
    assert got == pytest.approx(ref, rel=2e-2) and got != ref  # close, but really computed in bf16
    engine = bf16.engine
    assert {v.dtype for v in engine.params.values()} == {jnp.dtype("float32")}
    assert {v.dtype for v in engine.opt_state.exp_avg.values()} == {jnp.dtype("float32")}
    hlo = engine.lower(batches[0]).as_text()
    assert "bf16" in hlo and "dot_general" in hlo
    # every matmul of the forward and backward takes bf16 operands
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert dots and all("xbf16>" in line.split("->")[0] for line in dots), dots
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_bf16_pure_stores_everything_in_bf16_like_the_torch_engine():
    w = workloads.get("mlp")
    batches = data(w, 4)
    spec = ac.AdamW(lr=1e-3)
    t = ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend="cpu", precision="bf16-pure")
    j = ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend="jax:cpu", precision="bf16-pure")
    lt = [t(b).loss for b in batches]  # both engines feed float inputs in bf16
    lj = [j(b).loss for b in batches]
    assert lj == pytest.approx(lt, rel=2e-2)
    sd = j.state_dict()
    assert {v.dtype for v in sd["model"].values()} == {torch.bfloat16}
    assert {v.dtype for s in sd["optimizer"]["slots"].values() for v in s.values()} == {torch.bfloat16}
    assert sd["model"].keys() == t.state_dict()["model"].keys()


# -- recompilation -------------------------------------------------------------------------------


def test_one_program_per_signature_and_strict_shapes_compiles_nothing():
    """jax.jit's own cache: the warning and the refusal themselves are tests/conformance."""
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend="jax:cpu")
    step(w.batch(0, 4, 16))
    step(w.batch(1, 4, 16))
    assert step.engine.compiles == 1
    step(w.batch(2, 4, 8))
    assert step.engine.compiles == 2
    step(w.batch(3, 4, 16))  # both programs are cached
    assert step.engine.compiles == 2
    strict = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend="jax:cpu", strict_shapes=True)
    strict(w.batch(0, 4, 16))
    with pytest.raises(RecompileError, match="strict_shapes=True"):
        strict(w.batch(1, 4, 8))
    assert strict.engine.compiles == 1


# -- state moves between backends ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, spec",
    [
        ("gpt-tiny", ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=2, total=6))),
        ("mlp", ac.SGD(lr=5e-2, momentum=0.9, nesterov=True, schedule=ac.WarmupCosine(warmup=2, total=6))),
    ],
)
def test_state_dict_round_trip_between_jax_and_torch(name, spec):
    """Train 3 steps on one backend, load its state into the other (built from another seed,
    so everything must come from the state) and continue: same losses as not stopping."""
    w = workloads.get(name)
    batches = data(w, 6)
    kw = dict(max_grad_norm=0.5)
    expected, halfway = {}, {}
    for b in ("cpu", "jax:cpu"):
        straight = ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend=b, **kw)
        expected[b] = [straight(x).loss for x in batches[:3]]
        halfway[b] = copy.deepcopy(straight.state_dict())
        expected[b] += [straight(x).loss for x in batches[3:]]
    for first, second in (("jax:cpu", "cpu"), ("cpu", "jax:cpu")):
        resumed = ac.TrainStep(w.build(seed=7), w.loss_fn, spec, backend=second, **kw)
        resumed.load_state_dict(halfway[first])
        assert resumed.step_count == 3
        tail = [resumed(x) for x in batches[3:]]
        assert [o.step for o in tail] == [4, 5, 6]
        assert [o.lr for o in tail] == pytest.approx([spec.lr_at(s) for s in (3, 4, 5)], rel=1e-12)
        for o, want in zip(tail, expected[first][3:]):
            assert abs(o.loss - want) <= LOSS_RTOL * want, (first, second, o.step, o.loss, want)


def test_state_dict_layout_matches_the_torch_engine_before_any_step():
    w = workloads.get("gpt-tiny")  # tied embedding / LM head: both names appear, as in torch
    spec = ac.AdamW()
    t = ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend="cpu").state_dict()
    j = ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend="jax:cpu").state_dict()
    assert j["step"] == t["step"] == 0
    assert j["model"].keys() == t["model"].keys() and "lm_head.weight" in j["model"]
    assert j["optimizer"] == t["optimizer"] == {"slots": {"exp_avg": {}, "exp_avg_sq": {}}}
    assert all(torch.equal(j["model"][k], t["model"][k]) for k in t["model"])


def test_model_property_returns_the_trained_torch_module():
    w = workloads.get("mlp")
    model = w.build(seed=0)
    step = ac.TrainStep(model, w.loss_fn, ac.SGD(lr=0.1), backend="jax:cpu")
    before = copy.deepcopy(model)
    step(w.batch(0, 8, 1))
    trained = step.model
    assert trained is model and isinstance(trained, torch.nn.Sequential)
    assert not torch.equal(trained[0].weight, before[0].weight)
    assert torch.equal(trained[0].weight, torch.from_numpy(np.array(step.engine.params["0.weight"])))


def test_batchnorm_running_statistics_are_updated_like_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    batches = [(torch.randn(32, 8) + i, torch.randint(0, 2, (32,))) for i in range(3)]
    t = ac.TrainStep(copy.deepcopy(model), loss_fn, ac.SGD(lr=0.1), backend="cpu")
    j = ac.TrainStep(copy.deepcopy(model), loss_fn, ac.SGD(lr=0.1), backend="jax:cpu")
    lt = [t(b).loss for b in batches]
    lj = [j(b).loss for b in batches]
    assert lj == pytest.approx(lt, rel=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        want, got = getattr(t.model[1], name), getattr(j.model[1], name)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert int(j.model[1].num_batches_tracked) == 3 and not torch.equal(j.model[1].running_mean, torch.zeros(16))
    # and eval mode uses them: same predictions as torch
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(j.model.eval()(x), t.model.eval()(x), rtol=1e-4, atol=1e-5)


class KernelBlock(torch.nn.Module):
    """anychip.nn layers: on jax:* their ops run the JAX implementations of the kernel table."""

    def __init__(self):
        from anychip import nn as acnn

        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.norm = acnn.RMSNorm(16)
        self.mlp = acnn.SwiGLU(16, 32)

    def forward(self, x):
        return self.mlp(self.norm(self.proj(x)))


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_anychip_kernel_layers_run_on_jax(kernels):
    torch.manual_seed(0)
    model = KernelBlock()
    loss_fn = lambda m, b: m(b).square().mean()  # noqa: E731
    x = torch.randn(4, 16)
    t = ac.TrainStep(copy.deepcopy(model), loss_fn, ac.SGD(lr=0.1), backend="cpu", kernels=kernels)
    j = ac.TrainStep(copy.deepcopy(model), loss_fn, ac.SGD(lr=0.1), backend="jax:cpu", kernels=kernels)
    for _ in range(2):
        assert j(x).loss == pytest.approx(t(x).loss, rel=1e-5)


# -- what JAX cannot trace -----------------------------------------------------------------------


class PoolNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return F.adaptive_max_pool1d(h[:, None, :], 2).flatten(1)  # no torchax lowering


def test_unsupported_op_names_the_op_and_the_model_line():
    from anychip.errors import UnsupportedOpError

    step = ac.TrainStep(PoolNet(), lambda m, b: m(b).pow(2).mean(), backend="jax:cpu")
    with pytest.raises(UnsupportedOpError) as err:
        step(torch.randn(4, 8))
    msg = str(err.value)
    assert "adaptive_max_pool2d" in msg and "backend='cpu'" in msg and "kernel override" in msg
    assert "test_jax_step.py" in msg and "F.adaptive_max_pool1d(h[:, None, :], 2)" in msg


class HostBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # data-dependent Python control flow: cannot be traced
            h = h * 2
        return h


def test_host_read_of_a_tensor_value_is_explained():
    step = ac.TrainStep(HostBranch(), lambda m, b: m(b).pow(2).mean(), backend="jax:cpu")
    with pytest.raises(ac.LossFunctionError, match=r"reads a tensor value on the host.*if h.sum\(\) > 0"):
        step(torch.randn(4, 8))


def test_a_loss_that_is_not_a_scalar_is_refused():
    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=0), lambda m, b: m(b[0]), backend="jax:cpu")
    with pytest.raises(ac.LossFunctionError, match="scalar"):
        step(w.batch(0, 8, 1))


# -- attention -----------------------------------------------------------------------------------


def sdpa_cases():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    k2, v2 = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(2))
    q5 = torch.randn(2, 4, 5, 8, generator=g)
    bool_mask = torch.rand(7, 7, generator=g) > 0.3
    bool_mask |= torch.eye(7, dtype=torch.bool)  # no fully masked row
    float_mask = torch.randn(2, 1, 7, 7, generator=g)
    return {
        "plain": ((q, k, v), {}),
        "causal": ((q, k, v), {"is_causal": True}),
        "bool-mask": ((q, k, v), {"attn_mask": bool_mask}),
        "float-mask-scale": ((q, k, v), {"attn_mask": float_mask, "scale": 0.3}),
        "gqa-causal": ((q5, k2, v2), {"is_causal": True, "enable_gqa": True}),
    }


@pytest.mark.parametrize("case", list(sdpa_cases()))
def test_attention_override_matches_torch(case):
    import jax.numpy as jnp

    from anychip.kernels.torchax import environment

    (q, k, v), kw = sdpa_cases()[case]
    env = environment("cpu", "auto")
    args = env.j2t_iso(tuple(jnp.asarray(t.numpy()) for t in (q, k, v)))
    kw_j = {key: env.j2t_iso(jnp.asarray(val.numpy())) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
    with env:
        out = F.scaled_dot_product_attention(*args, **kw_j)
    got = torch.from_numpy(np.array(env.t2j_iso(out)))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)


def test_attention_dropout_path_runs_and_drops():
    import jax
    import jax.numpy as jnp

    from anychip.kernels.torchax import environment

    (q, k, v), _ = sdpa_cases()["plain"]
    env = environment("cpu", "auto")
    args = env.j2t_iso(tuple(jnp.asarray(t.numpy()) for t in (q, k, v)))
    with env.override_property(prng=jax.random.key(0)), env:
        full = F.scaled_dot_product_attention(*args)
        dropped = F.scaled_dot_product_attention(*args, dropout_p=0.5)
    assert dropped.shape == full.shape and not np.allclose(np.asarray(env.t2j_iso(dropped)), np.asarray(env.t2j_iso(full)))


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = (t.view(2, 5, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("kernels, routed", [("auto", True), ("reference", False)])
def test_sdpa_is_routed_to_jax_attention_only_inside_this_backend(monkeypatch, kernels, routed):
    import jax
    import torchax
    from torchax.ops import jtorch

    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k["implementation"]) or real(*a, **k))
    x = torch.randn(2, 5, 16)
    ref = ac.TrainStep(Attention(), lambda m, b: m(b).square().mean(), ac.SGD(lr=0.1), backend="cpu")
    step = ac.TrainStep(copy.deepcopy(ref.model), lambda m, b: m(b).square().mean(), ac.SGD(lr=0.1), backend="jax:cpu", kernels=kernels)
    assert step(x).loss == pytest.approx(ref(x).loss, rel=LOSS_RTOL)
    assert calls == (["xla"] if routed else [])  # traced once
    # the override lives in the engine's own torchax environment, not in the global one
    assert torchax.default_env()._ops[F.scaled_dot_product_attention].func is jtorch.scaled_dot_product_attention
