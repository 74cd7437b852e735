"""`jax:cpu` against the `cpu` torch backend: same init, same data, fp32, same losses and weights.

Measured on the development machine (torch 2.13 CPU, jax 0.10.2, 10 steps): loss relative
difference <= 2e-7 per step for mlp, gpt-tiny and llama-tiny; SGD weights within 1e-7
absolute; AdamW weights within 3e-5 absolute. AdamW normalises each gradient element by its
own running RMS, so an element whose gradient is ~0 moves by ~lr in a direction set by
float32 rounding noise: a difference of a fraction of one step size, not of the math. The
tolerances below leave a 10x margin over those measurements.
"""

from __future__ import annotations

import copy

import pytest
import torch

import anychip as ac
from anychip import workloads
from support import requires

pytestmark = requires("jax", "torchax", "optax")

STEPS = 10
LOSS_RTOL = 2e-6  # per step, relative
SGD_ATOL = 1e-6  # weights after 10 steps, absolute
ADAMW_ATOL_IN_LRS = 1 / 30  # weights after 10 steps, absolute, in units of lr (3e-3 -> 1e-4)
SCHEDULE = ac.WarmupCosine(warmup=2, total=STEPS)

CONFIGS = {
    # name: (optimizer spec, max_grad_norm, accumulate)
    "adamw-clip-acc2": (ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=SCHEDULE), 0.5, 2),
    "sgd-nesterov-clip": (ac.SGD(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=SCHEDULE), 0.5, 1),
    "sgd-momentum-acc2": (ac.SGD(lr=5e-2, momentum=0.9, schedule=SCHEDULE), None, 2),
}
CASES = [(w, c) for w in ("mlp", "gpt-tiny", "llama-tiny") for c in ("adamw-clip-acc2", "sgd-nesterov-clip")]
CASES.append(("mlp", "sgd-momentum-acc2"))


def run_both(name: str, config: str):
    w = workloads.get(name)
    spec, clip, acc = CONFIGS[config]
    model = w.build(seed=3)
    kw = dict(max_grad_norm=clip, accumulate=acc)
    torch_step = ac.TrainStep(copy.deepcopy(model), w.loss_fn, spec, backend="cpu", **kw)
    jax_step = ac.TrainStep(copy.deepcopy(model), w.loss_fn, spec, backend="jax:cpu", **kw)
    data = [w.batch(i, 8, 16, seed=0) for i in range(STEPS)]
    return w, spec, clip, [torch_step(b) for b in data], [jax_step(b) for b in data], torch_step, jax_step


@pytest.mark.parametrize("name, config", CASES)
def test_same_losses_and_weights_as_torch_cpu(name, config):
    w, spec, clip, ref, got, torch_step, jax_step = run_both(name, config)
    if clip is not None:
        assert ref[0].grad_norm > clip, "clipping must be active for this test to mean something"
    for r, g in zip(ref, got):
        assert g.step == r.step and g.lr == pytest.approx(r.lr, rel=1e-12) and g.tokens == r.tokens
        assert abs(g.loss - r.loss) <= LOSS_RTOL * abs(r.loss), (g.step, g.loss, r.loss)
        assert abs(g.grad_norm - r.grad_norm) <= 1e-5 * r.grad_norm, (g.step, g.grad_norm, r.grad_norm)
    atol = SGD_ATOL if isinstance(spec, ac.SGD) else ADAMW_ATOL_IN_LRS * spec.lr
    ref_params = dict(torch_step.model.named_parameters())
    for n, p in jax_step.model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[n].detach(), rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")
    # the optimizer state agrees too, in the same backend-neutral layout
    sd_t, sd_j = torch_step.state_dict(), jax_step.state_dict()
    assert sd_j["step"] == sd_t["step"] == STEPS
    assert sd_j["model"].keys() == sd_t["model"].keys()
    assert {s: v.keys() for s, v in sd_j["optimizer"]["slots"].items()} == {s: v.keys() for s, v in sd_t["optimizer"]["slots"].items()}
    for slot, by_name in sd_t["optimizer"]["slots"].items():
        for n, t in by_name.items():
            j = sd_j["optimizer"]["slots"][slot][n]
            assert j.dtype == t.dtype and j.shape == t.shape
            scale = float(t.abs().max()) or 1.0
            torch.testing.assert_close(j, t, rtol=0, atol=1e-3 * scale, msg=lambda m: f"{slot}/{n}: {m}")


def test_bf16_runs_the_matmuls_in_bf16_as_torch_autocast_does():
    """jax:cpu applies torch's autocast policy: each nn.Linear outputs what it outputs under
    precision="bf16" on the cpu backend (bfloat16), not float32 with a bf16-like loss."""
    w = workloads.get("mlp")
    seen = {}
    for backend in ("cpu", "jax:cpu"):
        model = w.build(seed=3)
        seen[backend] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, a, out, d=seen[backend], name=name: d.setdefault(name, set()).add(out.dtype))
        ac.TrainStep(model, w.loss_fn, ac.SGD(lr=5e-2), backend=backend, precision="bf16")(w.batch(0, 8, 1))
    assert seen["cpu"] and set().union(*seen["cpu"].values()) == {torch.bfloat16}
    assert seen["jax:cpu"] == seen["cpu"]


def test_parity_test_can_fail():
    """A learning rate 0.1% off on one side must break the tolerance above (the test has teeth)."""
    w = workloads.get("mlp")
    model = w.build(seed=3)
    a = ac.TrainStep(copy.deepcopy(model), w.loss_fn, ac.SGD(lr=5e-2), backend="cpu")
    b = ac.TrainStep(copy.deepcopy(model), w.loss_fn, ac.SGD(lr=5.005e-2), backend="jax:cpu")
    data = [w.batch(i, 8, 1) for i in range(3)]
    la, lb = [a(x).loss for x in data], [b(x).loss for x in data]
    assert la[0] == pytest.approx(lb[0], rel=LOSS_RTOL)  # same weights before the first update
    assert any(abs(x - y) > LOSS_RTOL * abs(x) for x, y in zip(la[1:], lb[1:]))
