"""BatchNorm's running statistics on torch_xla, as torch defines them.

torch_xla 2.9 updates ``running_var`` with the *biased* batch variance (sum of squares / n)
where torch uses the unbiased one (/ (n - 1)): ResNet-18's statistics end 2.7 % off after one
step. Its normalization (output and gradients) is right, so only the update is redone: a
forward pre-hook keeps the running variance the layer started from, and a forward hook writes
torch's ``(1 - f) * old + f * var_unbiased(x)`` over torch_xla's value.

``momentum=None`` (the cumulative average, ``f = 1 / num_batches_tracked``): torch's module
reads the counter on the host (``float(num_batches_tracked)``), which on lazy tensors executes
the graph traced so far, once per layer, and hands the op a new constant every step, a new
graph every step. For the duration of the forward the layer carries a momentum of 0.0 instead
(the op then leaves both statistics as they were) and the forward hook applies the update to
both, with ``f`` computed on the device: one graph per step, compiled once.
"""

from __future__ import annotations

_INSTALLED = "_anychip_torch_running_stats"
_START = "_anychip_running_var_before"


class _Cumulative(float):
    """``momentum=None`` while the layer runs: 0.0 to torch's module, recognised by the hook."""


def install(model) -> None:
    """Hook every BatchNorm of ``model`` (once: a model placed twice is not hooked twice)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not getattr(module, _INSTALLED, False):
            module.register_forward_pre_hook(_keep_start)
            module.register_forward_hook(_update, always_call=True)  # also restores momentum=None
            object.__setattr__(module, _INSTALLED, True)


def _keep_start(module, args) -> None:
    updates = module.training and module.track_running_stats and module.running_var is not None
    if updates and args and getattr(args[0], "device", None) is not None and args[0].device.type == "xla":
        if module.momentum is None and module.num_batches_tracked is not None:
            module.momentum = _Cumulative(0.0)
        # A plain attribute, not a buffer: it must not appear in state_dict().
        object.__setattr__(module, _START, module.running_var.detach().clone())


def _update(module, args, output) -> None:
    import torch

    cumulative = isinstance(module.momentum, _Cumulative)
    if cumulative:
        module.momentum = None
    start = module.__dict__.pop(_START, None)
    if start is None or output is None:  # not a training forward on XLA, or it raised
        return
    # Counted already: the module adds this batch to num_batches_tracked before the op.
    factor = 1.0 / module.num_batches_tracked.float() if cumulative else module.momentum
    x = args[0].detach().float()
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        # Through .data: the batch norm op saved the statistics for its backward, and an
        # in-place write to the tensors themselves would fail that backward's version check
        # (torch's own update happens inside the op).
        var = x.var(dim=dims, correction=1)
        module.running_var.data.copy_((factor * var + (1 - factor) * start.float()).to(module.running_var.dtype))
        if cumulative:
            mean, old = x.mean(dim=dims), module.running_mean
            old.data.copy_((factor * mean + (1 - factor) * old.float()).to(old.dtype))
