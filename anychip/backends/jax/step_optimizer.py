"""The optimizer of a :class:`~anychip.backends.jax.engine.JaxEngine`, whichever the user gave:

* :class:`SpecOptimizer`: an ``ac.AdamW`` / ``ac.SGD`` spec, its optax form with the schedule
  evaluated inside the jit from the update count (or, for ``lr_scheduler=callable``, the
  factor computed on the host and fed in);
* :class:`TorchOptimizer`: the user's ``torch.optim`` optimizer translated by
  :mod:`anychip.backends.jax.optimizers`. The torch object stays the source of truth for the
  hyperparameters: its LR scheduler steps it on the host after each applied update, and every
  per-group number is re-read and fed into the jitted step as an input, so a new lr, momentum
  or beta never compiles a new program.

Both give the engine the same five things: ``init``, ``update(grads, state, params, hyper)``
inside the jit; ``hyper(update)`` and ``lrs(update)`` on the host before a step,
``advance`` / ``rewind`` after one; and the state in the backend-neutral layout.
"""

from __future__ import annotations

from anychip import user_optimizer


class SpecOptimizer:
    def __init__(self, spec, named_params):
        from anychip.optim import HostSchedule

        self.spec = spec
        self.slots = spec.slots
        self._tx = spec.to_optax(spec.decays(named_params) if spec.no_decay is not None else None)
        self._host_schedule = isinstance(spec.schedule, HostSchedule)
        self._groups = len(spec.torch_groups(named_params))  # as TorchEngine: no_decay makes a second group

    def init(self, params):
        return self._tx.init(params)

    def update(self, grads, state, params, hyper):
        if self._host_schedule:
            return self._tx.update(grads, state, params, factor=hyper)
        return self._tx.update(grads, state, params)

    def hyper(self, update: int):
        import numpy as np

        return np.asarray(self.spec.schedule.value(update), np.float32) if self._host_schedule else None

    def lrs(self, update: int) -> tuple[float, ...]:
        return (self.spec.lr_at(update),) * self._groups

    def advance(self, provisional: bool) -> None:  # the schedule is a function of the update count
        pass

    def rewind(self) -> None:
        pass

    def state_dict(self, opt_state, updates: int, param_names, to_torch) -> dict:
        slots = {
            slot: {} if updates == 0 else {n: to_torch(getattr(opt_state, slot)[n]) for n in param_names}
            for slot in self.slots
        }
        return {"optimizer": {"slots": slots}}

    def load(self, fresh, saved: dict, updates: int, place) -> object:
        """``fresh`` (an initial state) with the saved slots; ``place(name, value, like)``
        puts a whole CPU tensor where that parameter's slot lives."""
        import numpy as np

        given = saved["optimizer"]["slots"]
        fields = {}
        for slot in self.slots:
            tree = dict(getattr(fresh, slot))
            for name, value in given.get(slot, {}).items():
                if name not in tree:
                    raise KeyError(f"optimizer slot {slot!r} names {name!r}, which is not a trainable parameter of this model")
                tree[name] = place(name, value, tree[name])
            fields[slot] = tree
        return fresh._replace(count=place(None, np.asarray(updates, np.int32), fresh.count), **fields)


class TorchOptimizer:
    def __init__(self, optimizer, scheduler, model, param_names):
        from anychip.backends.jax.optimizers import translate

        self.optimizer, self.scheduler = optimizer, scheduler
        self.names = user_optimizer.names_by_id(model)  # {id(torch parameter): name}
        self.translated = translate(optimizer, param_names, self.names)  # refuses what it cannot reproduce
        self.slots = self.translated.slots
        self._params = dict(model.named_parameters())
        self._rewind = None

    def init(self, params):
        return self.translated.init(params)

    def update(self, grads, state, params, hyper):
        return self.translated.update(grads, state, params, hyper)

    def hyper(self, update: int):
        return self.translated.hyper_from(self.optimizer)

    def lrs(self, update: int) -> tuple[float, ...]:
        return user_optimizer.group_lrs(self.optimizer)

    def advance(self, provisional: bool) -> None:
        """The scheduler's step after an update; ``provisional`` (its finiteness is read one
        step late) keeps what it changes, for :meth:`rewind`."""
        if self.scheduler is None:
            return
        if provisional:
            keys = user_optimizer.SCHEDULED_KEYS
            groups = [{k: v for k, v in g.items() if k in keys} for g in self.optimizer.param_groups]
            self._rewind = (self.scheduler.state_dict(), groups)
        user_optimizer.advance(self.scheduler)

    def rewind(self) -> None:
        """Undo the scheduler step of an update that turned out not finite (never applied)."""
        if self._rewind is not None:
            self.scheduler.load_state_dict(self._rewind[0])
            for group, values in zip(self.optimizer.param_groups, self._rewind[1]):
                group.update(values)
            self._rewind = None

    def state_dict(self, opt_state, updates: int, param_names, to_torch) -> dict:
        """The layout of the torch engines' (:func:`anychip.user_optimizer.optimizer_state`):
        torch's own slot names and lazily created state, gathered to CPU tensors."""
        import torch

        host = {slot: {n: to_torch(a) for n, a in by_name.items()} for slot, by_name in opt_state.items()}
        numpy = {slot: {n: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for n, t in by_name.items()}
                 for slot, by_name in host.items()}
        slots: dict = {}
        for name, entry in self.translated.state_to_torch(numpy).items():
            for slot, t in entry.items():
                slots.setdefault(slot, {})[name] = t if slot == "step" else t.to(self._params[name].dtype)
        return {
            "optimizer": {"slots": slots, "scalars": {}, "groups": user_optimizer.groups_json(self.optimizer, self.names)},
            "lr_scheduler": user_optimizer.scheduler_state(self.scheduler),
        }

    def load(self, fresh, saved: dict, updates: int, place) -> dict:
        from anychip.backends.jax.convert import host_array

        opt = saved["optimizer"]
        if opt.get("scalars"):
            raise ValueError(f"the checkpoint's optimizer state has non-tensor entries {sorted(opt['scalars'])}, "
                             f"which {self.translated.cls_name} on jax does not keep")
        user_optimizer.load_groups(self.optimizer, opt.get("groups") or [], self.names)
        user_optimizer.load_scheduler_state(self.scheduler, saved.get("lr_scheduler"))
        per_param: dict = {}
        for slot, by_name in opt["slots"].items():
            for name, value in by_name.items():
                per_param.setdefault(name, {})[slot] = value
        params = {n: host_array(p) for n, p in self._params.items() if n in self.translated.param_names}
        state = self.translated.state_from_torch(per_param, params)
        return {slot: {n: place(n, v, fresh[slot][n]) for n, v in by_name.items()} for slot, by_name in state.items()}


def make(spec, model, param_names: list[str]):
    """The optimizer of a JAX step for ``spec`` (a StepSpec) over ``model``'s trainable parameters."""
    if user_optimizer.is_torch_optimizer(spec.optimizer):
        return TorchOptimizer(spec.optimizer, spec.lr_scheduler, model, param_names)
    trainable = set(param_names)
    return SpecOptimizer(spec.optimizer, [(n, p) for n, p in model.named_parameters() if n in trainable])
