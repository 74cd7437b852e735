"""The baselines anychip is measured against: the training step a careful user writes by hand,
in plain PyTorch or in plain JAX + optax, without anychip.

Benchmarks import these instead of keeping their own copies, so every ratio
"anychip / hand-written" in ``benchmarks/`` divides by the same loop. Each baseline does the
work a :class:`~anychip.step.TrainStep` with the same settings does (forward + loss, backward,
gradient clipping, AdamW, the learning-rate schedule) and nothing more; what varies between
benchmarks (device, precision, compilation) is chosen once, when the step is built, so the
per-step body stays the few lines a user would write.
"""

from __future__ import annotations

import functools
from typing import Callable

from anychip.optim import AdamW, Constant

PRECISIONS = ("fp32", "bf16")


def plain_torch_step(
    model,
    loss_fn: Callable,
    optimizer: AdamW,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    max_grad_norm: float | None = 1.0,
    fused: bool = False,
    pin_memory: bool = False,
    reference_kernels: bool = False,
) -> Callable:
    """``step(batch) -> loss``: one update of ``model`` written in plain PyTorch.

    optimizer:         the anychip spec whose numbers (lr, betas, eps, weight decay, schedule)
                       become a ``torch.optim.AdamW`` and, for a non-constant schedule, a
                       ``LambdaLR`` stepped after every update.
    device:            the model moves there; a batch on another device is copied with
                       ``non_blocking=True`` (page-locked first with ``pin_memory``).
    precision:         "fp32", or "bf16" autocast with fp32 master weights.
    compile:           ``torch.compile`` forward + loss together (the backward follows).
    fused:             the single-kernel AdamW of an accelerator.
    reference_kernels: run anychip.nn layers on their plain-PyTorch reference path, so the
                       baseline is plain PyTorch even where anychip has custom kernels.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"the hand-written baseline runs {' or '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(optimizer, AdamW):
        raise TypeError(f"optimizer must be an anychip AdamW spec, got {type(optimizer).__name__}")
    device = torch.device(device)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                            weight_decay=optimizer.weight_decay, fused=fused or None)
    schedule = None if isinstance(optimizer.schedule, Constant) else optimizer.schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.value) if schedule is not None else None

    forward = functools.partial(loss_fn, model)
    if compile:
        forward = torch.compile(forward)
    if reference_kernels:
        from anychip.kernels import defaults

        compiled = forward

        def forward(batch):
            with defaults(kernels="reference"):
                return compiled(batch)

    if precision == "bf16":
        full = forward

        def forward(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return full(batch)

    if device.type != "cpu":
        on_device = forward

        def forward(batch):
            batch = tuple((t.pin_memory() if pin_memory else t).to(device, non_blocking=True) for t in batch)
            return on_device(batch)

    def step(batch):
        loss = forward(batch)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def plain_jax_mlp_step(model, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                       check_finite: bool = True) -> Callable:
    """``step(batch) -> loss`` for an MLP of ``torch.nn.Linear`` layers with exact GELU between
    them (the built-in ``mlp`` workload), written directly in JAX: the torch weights copied
    into jax arrays, a jitted ``value_and_grad`` + ``optax.adamw`` with donated buffers.
    ``check_finite`` reads back whether the loss is finite after every step, as anychip's
    default ``on_nonfinite="raise"`` does (and a careful hand-written loop does too)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    params = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy())) for m in model if hasattr(m, "weight")]
    tx = optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w.T + b
            if i < len(params) - 1:
                h = jax.nn.gelu(h, approximate=False)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    def update(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    update = jax.jit(update, donate_argnums=(0, 1))
    state = {"params": params, "opt": opt_state}

    def step(batch):
        x, y = batch
        x, y = jnp.asarray(x.numpy()), jnp.asarray(y.numpy().astype(np.int32))
        state["params"], state["opt"], loss = update(state["params"], state["opt"], x, y)
        if check_finite and not bool(jnp.isfinite(loss)):
            raise FloatingPointError("loss is not finite")
        return loss

    return step
