"""The torch engines' training state in the backend-neutral layout every engine and
checkpoint uses: parameters by name, optimizer slots by slot name then parameter name.

FSDP's sharded tensors (DTensors) are gathered whole on every rank (a collective: every rank
calls ``engine_state``), so a sharded run saves the same portable layout, and loading places
each rank's shard without communicating. ``sharded=True`` leaves them as DTensors instead (each
rank's own shard, nothing gathered): what a checkpoint written by every rank in parallel takes.
"""

from __future__ import annotations

from anychip import user_optimizer


def whole(t):
    """A CPU copy of ``t``; a sharded DTensor is all-gathered first."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def local(t):
    """``t`` as this rank holds it: a DTensor stays one (its shard), anything else a CPU tensor."""
    return t.detach() if hasattr(t, "device_mesh") else t.detach().cpu()


def shaped_like(value, target):
    """``value`` (a whole CPU tensor) laid out as ``target``: this rank's shard of it when the
    target is a DTensor. Every rank holds the whole value, so nothing is communicated. A value
    that is already a DTensor (read shard by shard from a checkpoint) is this rank's already."""
    if target is None or not hasattr(target, "device_mesh") or hasattr(value, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)


def engine_state(engine, sharded: bool = False) -> dict:
    copy = local if sharded else whole
    if engine.spec.optimizer is engine.optimizer:  # the user's own torch.optim optimizer
        return {
            "step": engine.updates,
            "model": {k: copy(v) for k, v in engine.model.state_dict().items()},
            "optimizer": user_optimizer.optimizer_state(engine.optimizer, engine.names, copy),
            "lr_scheduler": user_optimizer.scheduler_state(engine.scheduler),
        }
    opt_state = engine.optimizer.state
    slots = {
        slot: {n: copy(opt_state[p][slot]) for n, p in zip(engine.param_names, engine.params) if slot in opt_state.get(p, {})}
        for slot in engine.spec.optimizer.slots
    }
    return {
        "step": engine.updates,
        "model": {k: copy(v) for k, v in engine.model.state_dict().items()},
        "optimizer": {"slots": slots},
    }


def load_engine_state(engine, state: dict) -> None:
    import torch

    current = engine.model.state_dict()
    engine.model.load_state_dict({k: shaped_like(v, current.get(k)) for k, v in state["model"].items()})
    n = int(state["step"])
    if engine.spec.optimizer is engine.optimizer:
        user_optimizer.load_optimizer_state(engine.optimizer, state["optimizer"], engine.names, shaped_like)
        user_optimizer.load_scheduler_state(engine.scheduler, state.get("lr_scheduler"))
        engine.updates = n
        return
    per_param = {}
    for i, name in enumerate(engine.param_names):
        entry = {
            slot: shaped_like(state["optimizer"]["slots"][slot][name], engine.params[i])
            for slot in engine.spec.optimizer.slots
            if name in state["optimizer"]["slots"].get(slot, {})
        }
        if entry:
            if "exp_avg" in entry:  # Adam-style state counts its own steps
                entry["step"] = torch.tensor(float(n))
            per_param[i] = entry
    current = engine.optimizer.state_dict()
    engine.optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})
    engine.updates = n
