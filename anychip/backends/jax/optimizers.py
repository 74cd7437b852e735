"""A user's ``torch.optim`` optimizer, parameter groups included, as a JAX update.

``translate(optimizer, param_names, params_by_id)`` reads ``optimizer.param_groups`` (each
parameter matched to its name by identity) and returns a :class:`Translated` whose ``update``
runs torch's own per-parameter math (:mod:`anychip.backends.jax.optimizer_math`) group by
group. What a group fixes structurally (nesterov, amsgrad, centered, momentum on or off, Muon's
Newton-Schulz settings) is compiled into the step; every number a scheduler or the user may
change between steps (lr, momentum, betas, weight decay, eps, ...) is a row of ``hyper``, one
float32 array of shape ``(groups, fields)`` that is an *input* of the jitted step, re-read from
``param_groups`` by ``hyper_from`` before each step: a new value never recompiles.

State layout, ``{slot: {parameter name: array}}``, slots named as torch names them:

=========  ==============================================================  ==============
optimizer  slots (torch's per-parameter ``optimizer.state[p]`` keys)         ``step``
=========  ==============================================================  ==============
SGD        ``momentum_buffer`` (groups with momentum != 0)                   internal
Adam(W)    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad groups)   torch's
RMSprop    ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg``   torch's
           (centered)
Adagrad    ``sum``                                                           torch's
Muon       ``momentum_buffer``                                               internal
=========  ==============================================================  ==============

``step`` (a float32 scalar per parameter) counts the updates applied. Where torch keeps it
(Adam, AdamW, RMSprop, Adagrad) it maps to torch's ``step``; SGD and Muon have none in torch,
so ``state_to_torch`` leaves it out and ``state_from_torch`` sets 1 where torch has a
momentum buffer (for SGD only "0 = no buffer yet" matters). As torch's state is created lazily
at the first step, ``state_to_torch`` gives no entry for a parameter not yet updated (Adagrad,
whose state torch creates with the optimizer, always has one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from anychip.backends.jax import optimizer_math as om
from anychip.errors import UnsupportedOptimizerError

SUPPORTED = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Muon")
"""``torch.optim`` classes translated (by exact class; Muon where the installed torch has it)."""


def _supported_list() -> str:
    import torch

    return ", ".join(f"torch.optim.{n}" for n in SUPPORTED if hasattr(torch.optim, n))


def _refuse(what: str) -> UnsupportedOptimizerError:
    return UnsupportedOptimizerError(
        f"{what} cannot be translated for the jax backends (supported: {_supported_list()}); "
        "use one of those, or a torch backend, which runs any torch.optim optimizer"
    )


def _num(v) -> float:
    return float(v)  # a Python number or a 1-element tensor (torch allows a Tensor lr / betas)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one torch class translates: ``static(group)`` the options compiled into the step,
    ``fields`` / ``hyper(group)`` the per-group numbers fed in each step (float64 on the host),
    ``slots(static)`` the per-parameter state, ``apply`` the math."""

    fields: tuple[str, ...]
    hyper: Callable[[dict], tuple]
    static: Callable[[dict], dict]
    slots: Callable[[dict], tuple[str, ...]]
    apply: Callable[..., Any]
    torch_step: bool = True
    eager_state: bool = False  # torch creates the state with the optimizer (Adagrad)
    init: Callable[[str, dict], float] = lambda slot, defaults: 0.0  # a slot's first value


def _sgd_static(g: dict) -> dict:
    return {"momentum": _num(g["momentum"]) != 0, "nesterov": bool(g["nesterov"]), "maximize": bool(g.get("maximize", False))}


def _adam_static(decoupled_default: bool):
    def static(g: dict) -> dict:
        decoupled = bool(g.get("decoupled_weight_decay", decoupled_default))
        return {"decoupled": decoupled, "amsgrad": bool(g["amsgrad"]), "maximize": bool(g.get("maximize", False))}

    return static


def _adam_hyper(g: dict) -> tuple:
    lr, (b1, b2), wd = _num(g["lr"]), (_num(b) for b in g["betas"]), _num(g["weight_decay"])
    return (lr, 1.0 - b1, _log(b1), b2, 1.0 - b2, _log(b2), _num(g["eps"]), wd, 1.0 - lr * wd)


def _adam_slots(s: dict) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if s["amsgrad"] else ())


_ADAM_FIELDS = ("lr", "one_minus_beta1", "log_beta1", "beta2", "one_minus_beta2", "log_beta2", "eps", "weight_decay", "decay")

_RULES: dict[str, _Rule] = {
    "SGD": _Rule(
        fields=("lr", "momentum", "one_minus_dampening", "weight_decay"),
        hyper=lambda g: (_num(g["lr"]), _num(g["momentum"]), 1.0 - _num(g["dampening"]), _num(g["weight_decay"])),
        static=_sgd_static,
        slots=lambda s: ("momentum_buffer",) if s["momentum"] else (),
        apply=lambda g, p, sl, h, t, s: om.sgd(g, p, sl, h, **s),
        torch_step=False,
    ),
    "Adam": _Rule(_ADAM_FIELDS, _adam_hyper, _adam_static(False), _adam_slots, lambda g, p, sl, h, t, s: om.adam(g, p, sl, h, t, **s)),
    "AdamW": _Rule(_ADAM_FIELDS, _adam_hyper, _adam_static(True), _adam_slots, lambda g, p, sl, h, t, s: om.adam(g, p, sl, h, t, **s)),
    "RMSprop": _Rule(
        fields=("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum"),
        hyper=lambda g: (
            _num(g["lr"]), _num(g["alpha"]), 1.0 - _num(g["alpha"]), _num(g["eps"]), _num(g["weight_decay"]), _num(g["momentum"])
        ),
        static=lambda g: {"momentum": _num(g["momentum"]) > 0, "centered": bool(g["centered"]), "maximize": bool(g.get("maximize", False))},
        slots=lambda s: ("square_avg",) + (("momentum_buffer",) if s["momentum"] else ()) + (("grad_avg",) if s["centered"] else ()),
        apply=lambda g, p, sl, h, t, s: om.rmsprop(g, p, sl, h, **s),
    ),
    "Adagrad": _Rule(
        fields=("lr", "lr_decay", "weight_decay", "eps"),
        hyper=lambda g: (_num(g["lr"]), _num(g["lr_decay"]), _num(g["weight_decay"]), _num(g["eps"])),
        static=lambda g: {"maximize": bool(g.get("maximize", False))},
        slots=lambda s: ("sum",),
        apply=lambda g, p, sl, h, t, s: om.adagrad(g, p, sl, h, t, **s),
        eager_state=True,
        # torch fills ``sum`` in the constructor from its argument: a group's own value is unused.
        init=lambda slot, defaults: _num(defaults["initial_accumulator_value"]),
    ),
    "Muon": _Rule(
        fields=("lr", "momentum", "one_minus_momentum", "decay"),
        hyper=lambda g: (_num(g["lr"]), _num(g["momentum"]), 1.0 - _num(g["momentum"]), 1.0 - _num(g["lr"]) * _num(g["weight_decay"])),
        static=lambda g: {
            "nesterov": bool(g["nesterov"]),
            "coefficients": tuple(float(c) for c in g["ns_coefficients"]),
            "ns_steps": int(g["ns_steps"]),
            "eps": float(g["eps"]),
            "adjust_lr_fn": g["adjust_lr_fn"],
        },
        slots=lambda s: ("momentum_buffer",),
        apply=lambda g, p, sl, h, t, s: om.muon(g, p, sl, h, **s),
        torch_step=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class _Group:
    names: tuple[str, ...]
    static: dict
    slots: tuple[str, ...]
    init: dict  # slot -> initial fill value


class Translated:
    """One torch optimizer as a JAX update; built by :func:`translate`. ``names`` are the
    parameters the optimizer updates (the others get zero updates, as torch leaves them)."""

    def __init__(self, cls_name: str, rule: _Rule, groups: list[_Group], param_names: list[str]):
        self.cls_name, self._rule, self.groups = cls_name, rule, tuple(groups)
        self.param_names = tuple(param_names)
        self.names = tuple(n for g in self.groups for n in g.names)
        self.fields = rule.fields
        self.slots = tuple(dict.fromkeys(s for g in self.groups for s in g.slots)) + ("step",)

    # -- the jitted part -----------------------------------------------------------------------
    def init(self, params: dict) -> dict:
        """Fresh state ``{slot: {name: array}}`` for ``params`` (by name), as torch creates it."""
        import jax.numpy as jnp

        state: dict = {slot: {} for slot in self.slots}
        for group in self.groups:
            for n in group.names:
                for slot in group.slots:
                    state[slot][n] = jnp.full_like(params[n], group.init[slot])
                state["step"][n] = jnp.zeros((), jnp.float32)
        return state

    def apply(self, grads: dict, state: dict, params: dict, hyper) -> tuple[dict, dict]:
        """``(new params, new state)``: one torch ``optimizer.step()``. ``hyper`` is the
        ``(groups, fields)`` array of :meth:`hyper_from`, traced or concrete."""
        import jax.numpy as jnp

        hyper = jnp.asarray(hyper, jnp.float32)
        if hyper.shape != (len(self.groups), len(self.fields)):
            raise ValueError(
                f"hyper has shape {hyper.shape}; {self.cls_name} expects {(len(self.groups), len(self.fields))}: use hyper_from(optimizer)"
            )
        new_params = dict(params)
        new_state = {slot: dict(by_name) for slot, by_name in state.items()}
        for gi, group in enumerate(self.groups):
            h = {f: hyper[gi, k] for k, f in enumerate(self.fields)}
            for n in group.names:
                t = state["step"][n] + 1.0
                slots = {slot: state[slot][n] for slot in group.slots}
                slots["step"] = state["step"][n]
                new_params[n], out = self._rule.apply(grads[n], params[n], slots, h, t, group.static)
                for slot, value in out.items():
                    new_state[slot][n] = value
                new_state["step"][n] = t
        return new_params, new_state

    def update(self, grads: dict, state: dict, params: dict, hyper) -> tuple[dict, dict]:
        """optax's convention: ``(updates, new state)`` with ``params + updates`` the new
        parameters (in float32 the difference of two nearby floats is exact, so adding it back
        gives torch's value; :meth:`apply` avoids the round trip)."""
        import jax.numpy as jnp

        new_params, new_state = self.apply(grads, state, params, hyper)
        updates = {n: new_params[n].astype(jnp.float32) - params[n].astype(jnp.float32) for n in grads}
        return updates, new_state

    # -- the host part -------------------------------------------------------------------------
    def hyper_from(self, optimizer):
        """The current per-group numbers of ``optimizer.param_groups`` (floats or 1-element
        tensors, as a scheduler left them) as a float32 numpy array ``(groups, fields)``;
        derived values (``1 - beta1``, ``1 - lr * weight_decay``, ...) are computed in float64
        first, as torch does on the host. Raises if the groups or an option compiled into the
        step changed since :func:`translate`."""
        import numpy as np

        groups = optimizer.param_groups
        if len(groups) != len(self.groups):
            raise ValueError(
                f"{self.cls_name} has {len(groups)} param groups, the step was built with {len(self.groups)}: "
                "build a new TrainStep after add_param_group"
            )
        rows = []
        for i, (group, plan) in enumerate(zip(groups, self.groups)):
            static = self._rule.static(group)
            if len(group["params"]) != len(plan.names) or static != plan.static:
                changed = sorted(k for k in static if static[k] != plan.static[k]) or ["its parameters"]
                raise ValueError(
                    f"{self.cls_name} param group {i} changed {', '.join(changed)} after the step was built; "
                    "those are compiled into it: build a new TrainStep"
                )
            rows.append(self._rule.hyper(group))
        return np.asarray(rows, np.float64).reshape(len(rows), len(self.fields)).astype(np.float32)

    def state_to_torch(self, state: dict, names=None) -> dict:
        """``{name: {slot: torch.Tensor}}`` in torch's per-parameter layout (CPU tensors; the
        ``step`` a float32 0-d tensor where torch keeps one), for ``names`` (default: all)."""
        import numpy as np
        import torch

        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        plan = {n: g for g in self.groups for n in g.names}
        out = {}
        for n in self.names if names is None else names:
            step = float(np.asarray(state["step"][n]))
            if step == 0 and not self._rule.eager_state:
                continue
            entry = {slot: torch.from_numpy(np.array(state[slot][n])) for slot in plan[n].slots}
            if self._rule.torch_step:
                entry["step"] = torch.tensor(step, dtype=scalar)
            if entry:  # SGD without momentum keeps no state
                out[n] = entry
        return out

    def state_from_torch(self, per_param: dict, params: dict) -> dict:
        """The state for torch's per-parameter state ``{name: {slot: tensor or array}}``;
        parameters without an entry start fresh. Host numpy leaves, in :meth:`init`'s
        structure (place them like it). ``params`` gives each parameter's shape and dtype."""
        import numpy as np

        plan = {n: g for g in self.groups for n in g.names}
        unknown = sorted(set(per_param) - set(plan))
        if unknown:
            raise ValueError(f"optimizer state names {unknown}, which {self.cls_name} does not update")
        state: dict = {slot: {} for slot in self.slots}
        for n, group in plan.items():
            p = np.asarray(params[n])
            given = {k: v for k, v in per_param.get(n, {}).items()}
            extra = sorted(set(given) - set(group.slots) - {"step"})
            if extra:
                raise ValueError(f"state of {n!r} has slots {extra}; {self.cls_name} keeps {list(group.slots)} for it")
            for slot in group.slots:
                value = _host(given[slot]) if slot in given else np.full(p.shape, group.init[slot], p.dtype)
                if value.shape != p.shape:
                    raise ValueError(f"state {slot!r} of {n!r} has shape {value.shape}, the parameter {p.shape}")
                state[slot][n] = value.astype(p.dtype)
            if self._rule.torch_step:
                step = float(_host(given["step"])) if "step" in given else 0.0
            else:
                step = 1.0 if any(s in given for s in group.slots) else 0.0
            state["step"][n] = np.asarray(step, np.float32)
        return state


def _host(value):
    import numpy as np

    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def translate(optimizer, param_names, params_by_id: dict) -> Translated:
    """``optimizer`` (a ``torch.optim`` optimizer over the model's parameters) as a
    :class:`Translated`. ``param_names``: the trainable parameter names, in the step's order;
    ``params_by_id``: ``{id(parameter tensor): name}``. Refuses, before any work, a class or
    an option it cannot reproduce (:class:`UnsupportedOptimizerError`), and a parameter the
    model does not have (ValueError)."""
    import torch

    cls = type(optimizer)
    name = cls.__name__
    if name not in _RULES or getattr(torch.optim, name, None) is not cls:
        if getattr(torch.optim, name, None) is cls:
            raise _refuse(f"torch.optim.{name}")
        base = next((b for b in cls.__mro__[1:] if getattr(torch.optim, b.__name__, None) is b and b.__name__ in _RULES), None)
        hint = f" (a subclass of torch.optim.{base.__name__}: its step() may differ)" if base else ""
        raise _refuse(f"{cls.__module__}.{cls.__qualname__}{hint}")
    rule, known = _RULES[name], set(param_names)
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            n = params_by_id.get(id(p))
            if n is None or n not in known:
                raise ValueError(
                    f"{name} param group {i} holds a tensor of shape {tuple(p.shape)} that is not a trainable parameter "
                    "of the model: build the optimizer over model.parameters() (or named_parameters())"
                )
            if p.is_complex():
                raise _refuse(f"torch.optim.{name} over complex parameter {n!r}")
            names.append(n)
        static = rule.static(group)
        rule.hyper(group)  # every number readable now, not at the first step
        slots = rule.slots(static)
        groups.append(_Group(tuple(names), static, slots, {s: rule.init(s, optimizer.defaults) for s in slots}))
    return Translated(name, rule, groups, list(param_names))
