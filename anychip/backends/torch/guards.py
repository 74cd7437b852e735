"""What a torch step does when its loss or gradient norm is not finite, one strategy per kind
of device, chosen once when the engine is built:

* :func:`eager_check`: read two host floats, then update, skip or raise (cpu, and the default);
* :func:`deferred_check`: a fused optimizer skips the update on the device (``found_inf``, the
  GradScaler mechanism) and the flag is read one step later, when it has long been computed; a
  sync per step cost 4% of a GPT-2-small step on an H100;
* :func:`masked_check`: lazy tensors (neuron-xla) would execute the graph traced so far on any
  read, so the update is masked on the device and the flag read after the sync;
* :func:`unchecked`: ``on_nonfinite="ignore"``.

Each takes the engine and the step's (loss, norm, lr, tokens) and returns its StepOutput.
"""

from __future__ import annotations

import logging
import math

from anychip.engine import PendingCheck, StepOutput, nonfinite_error

log = logging.getLogger("anychip")


def unchecked(engine, loss, norm, lr: float, tokens: int) -> StepOutput:
    engine.apply_update()
    return StepOutput(engine.updates, loss, norm, lr, tokens)


def _skipped(engine, loss, norm, lr: float, tokens: int, how: str = "") -> StepOutput:
    log.warning("anychip: step %d: loss %s, grad norm %s is not finite; update skipped%s",
                engine.updates + 1, float(loss), float(norm), how)
    return StepOutput(engine.updates, loss, norm, lr, tokens, skipped=True)


def eager_check(engine, loss, norm, lr: float, tokens: int) -> StepOutput:
    # Two host floats: cheaper than three tensor ops on a CPU, and the same one sync elsewhere.
    if math.isfinite(loss.item()) and math.isfinite(norm.item()):
        return unchecked(engine, loss, norm, lr, tokens)
    engine.optimizer.zero_grad(set_to_none=True)
    engine.backend.mark_step()
    if engine.spec.on_nonfinite == "raise":
        raise nonfinite_error(engine.updates + 1, loss, norm)
    return _skipped(engine, loss, norm, lr, tokens)


def deferred_check(engine, loss, norm, lr: float, tokens: int) -> StepOutput:
    import torch

    finite = torch.isfinite(loss) & torch.isfinite(norm)
    engine.optimizer.found_inf = (~finite).float()
    host = torch.empty((), dtype=torch.bool, pin_memory=finite.device.type == "cuda")
    host.copy_(finite, non_blocking=True)
    wait = None
    if finite.device.type != "cpu":
        event = torch.Event(device=finite.device)
        event.record()
        wait = event.synchronize
    engine.pending = PendingCheck(host, engine.updates + 1, loss, norm, wait)
    return unchecked(engine, loss, norm, lr, tokens)


def masked_check(engine, loss, norm, lr: float, tokens: int) -> StepOutput:
    """Old parameters and optimizer state where the step is not finite; a state tensor this
    step created is masked to zeros, what torch's AdamW and SGD start from. "raise" reads the
    flag one step later (the device is not waited for meanwhile); "skip" right away, since it
    must return skipped=True."""
    import torch

    finite = torch.isfinite(loss) & torch.isfinite(norm)
    optimizer = engine.optimizer
    with torch.no_grad():
        before = [
            (p, p.clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
            for p in engine.params
        ]
        optimizer.step()
        for p, old, old_state in before:
            p.copy_(torch.where(finite, p, old))
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    v.copy_(torch.where(finite, v, old_state[k] if k in old_state else torch.zeros_like(v)))
    del before  # not a graph output: the old values stay graph inputs, never copied out
    optimizer.zero_grad(set_to_none=True)
    engine.backend.mark_step()
    if engine.spec.on_nonfinite == "raise":
        engine.pending = PendingCheck(finite, engine.updates + 1, loss, norm)
    elif not bool(finite):
        return _skipped(engine, loss, norm, lr, tokens, " (masked on the device)")
    engine.updates += 1
    engine.advance_schedule()  # a skipped update does not advance the user's scheduler
    return StepOutput(engine.updates, loss, norm, lr, tokens)


def choose(backend, spec, fused: bool):
    """The strategy for this backend and spec."""
    if spec.on_nonfinite == "ignore":
        return unchecked
    if backend.traits.lazy_tensors:
        return masked_check
    # Not under FSDP: its parameters are DTensors, which a plain found_inf cannot be mixed with.
    if fused and spec.on_nonfinite == "raise" and spec.parallel != "fsdp":
        return deferred_check
    return eager_check
