"""The user's own ``torch.optim`` optimizer and LR scheduler, as a plain training script builds
them: ``TrainStep(model, loss_fn, optimizer=torch.optim.AdamW(groups), lr_scheduler=sched)``.

What every engine shares about them, written once:

* :func:`resolve`: the checks at the API boundary (the optimizer holds the model's parameters,
  the scheduler is built on it, no spec schedule next to ``lr_scheduler=``), and a plain
  ``callable(update) -> lr factor`` turned into what it means for each kind of optimizer;
* :func:`rebind`: the optimizer's groups pointed at the parameters the step trains when placing
  the model made new ones (torch_xla's ``.to()``, FSDP's DTensors), matched by parameter name;
* :func:`advance`: the scheduler stepped once per *applied* update;
* :func:`optimizer_state` / :func:`load_optimizer_state` and :func:`scheduler_state` /
  :func:`load_scheduler_state`: the state in the backend-neutral layout checkpoints store
  (tensors by slot then parameter name, everything else plain JSON; never pickle), which the
  JAX engine produces too, so a run moves between torch and JAX.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from anychip import validate
from anychip.errors import InvalidArgumentError

# Group entries that say how torch computes, not what: each backend keeps its own choice.
IMPLEMENTATION_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})
# Group entries an LR scheduler rewrites as it goes (OneCycleLR: momentum / betas too).
SCHEDULED_KEYS = frozenset({"lr", "initial_lr", "max_lr", "min_lr", "momentum", "betas", "base_momentum", "max_momentum"})


def is_torch_optimizer(obj) -> bool:
    import torch

    return isinstance(obj, torch.optim.Optimizer)


def qualified_name(optimizer) -> str:
    """``torch.optim.AdamW``: the name a checkpoint records (a spec is plain ``AdamW``)."""
    cls = type(optimizer)
    module = cls.__module__
    if module.startswith("torch.optim."):
        module = "torch.optim"
    return f"{module}.{cls.__qualname__}"


def resolve(optimizer, lr_scheduler, model):
    """``(optimizer, lr_scheduler)`` as the engines take them, or a one-line error.

    A callable ``lr_scheduler`` becomes ``LambdaLR(optimizer, fn)`` on a torch optimizer (its
    meaning in torch) and the spec's schedule on a spec (``lr * fn(update)``, evaluated on the
    host)."""
    import torch

    from anychip.optim import Constant, HostSchedule, OptimizerSpec

    is_scheduler = isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise InvalidArgumentError("lr_scheduler=ReduceLROnPlateau needs a validation metric per step; TrainStep steps schedulers "
                                   "without one: call its step(metric) yourself after each evaluation, and pass lr_scheduler=None")
    if lr_scheduler is not None and not is_scheduler and not callable(lr_scheduler):
        raise validate.fail("lr_scheduler", lr_scheduler, "a torch.optim.lr_scheduler.LRScheduler built on the optimizer, "
                            "callable(update) -> lr factor, or None", "e.g. lr_scheduler=lambda update: 0.5 ** update",
                            owner="TrainStep")
    if isinstance(optimizer, OptimizerSpec):
        if lr_scheduler is None:
            return optimizer, None
        if is_scheduler:
            raise InvalidArgumentError(f"lr_scheduler={type(lr_scheduler).__name__} is built on a torch optimizer: pass that optimizer "
                                       "as optimizer=, or give the spec a callable(update) -> lr factor instead")
        if not isinstance(optimizer.schedule, Constant):
            raise InvalidArgumentError(f"optimizer={type(optimizer).__name__}(schedule={optimizer.schedule!r}) and lr_scheduler= both "
                                       "set the learning rate schedule; pass only one of them")
        return dataclasses.replace(optimizer, schedule=HostSchedule(lr_scheduler)), None
    if not is_torch_optimizer(optimizer):
        raise validate.fail("optimizer", optimizer, "a torch.optim optimizer built over model.parameters(), or a spec such as "
                            "ac.AdamW(lr=3e-4) / ac.SGD(...)", "e.g. optimizer=ac.AdamW(lr=3e-4)", owner="TrainStep")
    owned = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in owned:
                raise InvalidArgumentError(f"optimizer param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)}) is not a parameter of "
                                           "model; build the optimizer over the model TrainStep is given (model.parameters())")
    if is_scheduler:
        if lr_scheduler.optimizer is not optimizer:
            raise InvalidArgumentError(f"lr_scheduler={type(lr_scheduler).__name__} was built on another optimizer than optimizer=; "
                                       "build it on the optimizer you pass")
        return optimizer, lr_scheduler
    if lr_scheduler is not None:
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scheduler)
    return optimizer, None


def names_by_id(model) -> dict[int, str]:
    """``{id(parameter): its first name}`` (a tied parameter has several)."""
    return {id(p): n for n, p in reversed(list(model.named_parameters()))}


def rebind(optimizer, old_names: dict[int, str], model) -> None:
    """Point ``optimizer``'s groups (and any state it already has) at ``model``'s parameters of
    the same names: the user built it over the parameters before the step placed the model,
    and torch_xla's ``.to()`` and FSDP's ``fully_shard`` make new Parameter objects (cpu/cuda
    ``.to()`` keeps them, and then nothing changes). Groups and hyperparameters stay as built."""
    current = dict(model.named_parameters())
    for group in optimizer.param_groups:
        new = [current[old_names[id(p)]] for p in group["params"]]
        for old, p in zip(group["params"], new):
            if old is not p and old in optimizer.state:
                if hasattr(p, "device_mesh"):
                    raise InvalidArgumentError("the optimizer already holds state for parameters that parallel='fsdp' shards; "
                                               "build TrainStep before stepping the optimizer, and resume through ac.load")
                optimizer.state[p] = {k: v.to(p.device) if getattr(v, "ndim", 0) else v for k, v in optimizer.state.pop(old).items()}
        group["params"] = new


def group_lrs(optimizer) -> tuple[float, ...]:
    return tuple(float(g["lr"]) for g in optimizer.param_groups)


def advance(scheduler) -> None:
    """One scheduler step after an applied update. Where the torch optimizer object only holds
    the hyperparameters (the JAX step does the math), torch would warn that the scheduler
    stepped before ``optimizer.step()``: that warning is wrong here."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def _json(value):
    """A group / scheduler value as JSON (tensors as numbers, tuples as lists); None for what
    JSON cannot hold (a function: a LambdaLR's lambda comes back from the user's code)."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # "inf": ReduceLROnPlateau-style bests
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    return None


def _from_json(value, like):
    """A JSON value back in the type the live object holds (tuples, tensors filled in place)."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(like, tuple) and isinstance(value, list):
        return tuple(_from_json(v, w) for v, w in zip(value, like)) if len(like) == len(value) else tuple(value)
    return value


def groups_json(optimizer, names: dict[int, str]) -> list[dict]:
    out = []
    for group in optimizer.param_groups:
        entry = {k: _json(v) for k, v in group.items() if k != "params" and k not in IMPLEMENTATION_KEYS}
        entry["params"] = [names[id(p)] for p in group["params"]]
        out.append(entry)
    return out


def describe(optimizer, names: dict[int, str]) -> dict:
    """What a checkpoint records to refuse resuming into a different optimizer: its class, its
    constructor defaults and which parameters each group holds with its fixed hyperparameters
    (not the values a scheduler moves)."""
    defaults = {k: _json(v) for k, v in optimizer.defaults.items() if k not in IMPLEMENTATION_KEYS}
    groups = [{k: v for k, v in g.items() if k not in SCHEDULED_KEYS} for g in groups_json(optimizer, names)]
    return {"type": qualified_name(optimizer), "fields": {"defaults": defaults, "groups": groups}}


def optimizer_state(optimizer, names: dict[int, str], whole) -> dict:
    """``{"slots": {key: {name: tensor}}, "scalars": {key: {name: number}}, "groups": [...]}``;
    ``whole(t)`` makes a CPU copy (gathering a sharded tensor)."""
    slots: dict[str, dict] = {}
    scalars: dict[str, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if hasattr(value, "detach"):
                    slots.setdefault(key, {})[names[id(p)]] = whole(value)
                else:
                    scalars.setdefault(key, {})[names[id(p)]] = _json(value)
    return {"slots": slots, "scalars": scalars, "groups": groups_json(optimizer, names)}


def load_groups(optimizer, groups: list, names: dict[int, str]) -> None:
    """Each group's saved hyperparameters into ``optimizer`` (its parameters checked by name);
    how torch computes (foreach, fused, capturable) stays this backend's choice."""
    import torch

    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this one {len(optimizer.param_groups)}")
    for g, (group, entry) in enumerate(zip(optimizer.param_groups, groups)):
        mine = [names[id(p)] for p in group["params"]]
        if list(entry.get("params", [])) != mine:
            raise ValueError(f"parameter group {g} holds {entry.get('params')} in the checkpoint, {mine} here")
    for group, entry in zip(optimizer.param_groups, groups):
        for key, value in entry.items():
            if key == "params" or key in IMPLEMENTATION_KEYS:
                continue
            if isinstance(group.get(key), torch.Tensor):
                group[key].fill_(value)  # a device lr stays the same tensor (no new graph)
            else:
                group[key] = _from_json(value, group.get(key))


def load_optimizer_state(optimizer, saved: dict, names: dict[int, str], place=None) -> None:
    """Restore groups (hyperparameters by group, parameters checked by name) and per-parameter
    state. ``place(value, param)`` lays a whole tensor out like its parameter (FSDP shards);
    torch's ``load_state_dict`` then casts and moves as for its own checkpoints."""
    load_groups(optimizer, saved.get("groups") or [], names)
    per_param, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name, entry = names[id(p)], {}
            for key, by_name in saved.get("slots", {}).items():
                if name in by_name:
                    value = by_name[name]
                    entry[key] = place(value, p) if place is not None and value.shape == p.shape else value
            for key, by_name in saved.get("scalars", {}).items():
                if name in by_name:
                    entry[key] = by_name[name]
            if entry:
                per_param[index] = entry
            index += 1
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})


def scheduler_state(scheduler) -> dict | None:
    """The scheduler's ``state_dict()`` as JSON (a lambda is dropped: LambdaLR resumes by its
    step count and the user's own lambda)."""
    return None if scheduler is None else {"type": type(scheduler).__name__, "state": _json(scheduler.state_dict())}


def load_scheduler_state(scheduler, saved: dict | None) -> None:
    if scheduler is None or saved is None:
        return
    if saved.get("type") != type(scheduler).__name__:
        raise ValueError(f"the checkpoint's lr_scheduler is {saved.get('type')}, this step's {type(scheduler).__name__}")
    live = scheduler.state_dict()
    state = {k: _from_json(v, live.get(k)) for k, v in saved["state"].items()}
    scheduler.load_state_dict(state)
