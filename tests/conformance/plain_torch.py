"""The reference of the conformance suite: the loop a user writes in plain PyTorch, without anychip.

It builds its torch optimizer and schedule by hand (never through ``spec.to_torch``, which is
the code under test) and records, per step, the loss and the gradient norm before clipping.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Run:
    losses: list[float]
    grad_norms: list[float]
    model: torch.nn.Module


def torch_optimizer(spec, params) -> torch.optim.Optimizer:
    """``spec`` is an ``ac.AdamW`` or ``ac.SGD``: only its hyperparameters are read."""
    if hasattr(spec, "betas"):
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay)


def train(model, loss_fn, batches, spec, *, max_grad_norm=None) -> Run:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch_optimizer(spec, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, spec.schedule.value)
    losses, norms = [], []
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        if max_grad_norm is None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(norm.item())
    return Run(losses, norms, model)
