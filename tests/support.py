"""Test support: the one skip helper, and reference loops written in plain PyTorch."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

_CHECKS = {
    "jax": lambda: importlib.util.find_spec("jax") is not None,
    "torchax": lambda: importlib.util.find_spec("torchax") is not None,
    "optax": lambda: importlib.util.find_spec("optax") is not None,
    "triton": lambda: importlib.util.find_spec("triton") is not None,
    "matplotlib": lambda: importlib.util.find_spec("matplotlib") is not None,
    "safetensors": lambda: importlib.util.find_spec("safetensors") is not None,
    "transformers": lambda: importlib.util.find_spec("transformers") is not None,
    "torch_xla": lambda: importlib.util.find_spec("torch_xla") is not None,
    "cuda": lambda: bool(shutil.which("nvidia-smi")) and _torch_cuda(),
    "c-compiler": lambda: bool(shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")),
}


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def requires(*needs: str):
    """Skip marker naming *every* missing requirement in one reason."""
    unknown = [n for n in needs if n not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown requirement(s) {unknown}; known: {sorted(_CHECKS)}")
    missing = [n for n in needs if not _CHECKS[n]()]
    return pytest.mark.skipif(bool(missing), reason="missing: " + ", ".join(missing))


def hand_written_loop(model, loss_fn, batches, *, lr, weight_decay, schedule, max_grad_norm=None, sgd=None):
    """The loop a user writes without anychip; the reference TrainStep must reproduce."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if sgd is None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **sgd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.value(s))
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
