"""``TorchEngine``: a training step in eager PyTorch, with the forward+loss optionally
``torch.compile``-d, for every torch backend (cpu, cuda, neuron, neuron-xla).

This is the same loop a careful user writes by hand (compile the model call, autocast, fused
AdamW); ``benchmarks/bench_step_overhead.py`` holds it to within a few percent of that.
"""

from __future__ import annotations

import contextlib
import functools

from anychip import user_optimizer
from anychip.backends.torch import guards, parallel, state
from anychip.batch import call_loss, check_loss, map_tensors, split_batch
from anychip.engine import StepOutput, StepSpec
from anychip.kernels.scope import kernel_scope


class TorchEngine:
    def __init__(self, backend, spec: StepSpec):
        import torch

        self.backend, self.spec = backend, spec
        self.parallel = parallel.parallel_for(backend, spec.parallel)
        self.world, self.rank = self.parallel.world, self.parallel.rank
        self.batch_parts = self.world if spec.split_batches else 1  # each rank takes one part
        model = spec.model
        # The user's own torch.optim optimizer is used as given, over the parameters as placed.
        user_opt = user_optimizer.is_torch_optimizer(spec.optimizer)
        names_before = user_optimizer.names_by_id(model) if user_opt else None
        if spec.policy.param_dtype != "fp32":
            model = model.to(spec.policy.torch_dtype("param"))
        self.model = backend.place(model)
        self._net = self.parallel.wrap(self.model)  # what loss_fn gets
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if user_opt:
            user_optimizer.rebind(spec.optimizer, names_before, self.model)
            self.optimizer = backend.make_optimizer(spec.optimizer, None)
        else:
            self.optimizer = backend.make_optimizer(spec.optimizer, spec.optimizer.torch_groups(named))
        self.scheduler = spec.lr_scheduler  # the user's LRScheduler on self.optimizer, or None
        self.names = user_optimizer.names_by_id(self.model)  # {id(parameter): name} for the state layout
        self._rewind = None  # scheduler state before the last deferred-checked update
        self._guard = guards.choose(backend, spec, fused=bool(self.optimizer.defaults.get("fused")))
        self.pending = None  # a PendingCheck of the last step, read one step late
        traits = backend.traits
        compile_ = traits.compile_by_default if spec.compile is None else spec.compile
        self._forward = backend.compile(self._loss) if compile_ else self._loss
        self._autocast = (
            functools.partial(torch.autocast, traits.device_type, dtype=spec.policy.torch_dtype("compute"))
            if spec.policy.autocast
            else contextlib.nullcontext
        )
        # "bf16-pure": float inputs are fed in the parameters' bf16 (as JaxEngine does); a float32
        # batch into bf16 weights would fail at the first matmul.
        stored = spec.policy.torch_dtype("param")
        self._cast_inputs = (
            functools.partial(map_tensors, lambda t: t.to(stored) if t.is_floating_point() else t)
            if spec.policy.param_dtype != "fp32"
            else None
        )
        self.updates = 0
        # anychip.nn layers pick their kernels for this backend: a scope per step, not a
        # process-wide setting (two steps on two backends must not see each other's choice).
        # Ops without a backend in scope resolve it from the tensors' device, which already names
        # this backend where its tensors' device type, its registration and its name agree
        # (cpu, cuda, neuron); the scope costs per step, so it is left out there.
        reg = backend.registration
        if spec.kernels == "auto" and reg is not None and traits.device_type == reg.device_type == backend.name:
            self._kernel_scope = contextlib.nullcontext
        else:
            self._kernel_scope = functools.partial(kernel_scope, backend=backend.name, kernels=spec.kernels)

    def _loss(self, batch):
        return call_loss(self.spec.loss_fn, self._net, batch)

    def step(self, batch, tokens: int) -> StepOutput:
        import torch

        spec = self.spec
        with self.parallel.collectives(f"step {self.updates + 1}"):
            batch, tokens = self.parallel.local_batch(batch, tokens, spec.split_batches)
            placed = self.backend.place_batch(batch)
            micro = split_batch(placed if self._cast_inputs is None else self._cast_inputs(placed), spec.accumulate)
            total = None
            try:
                with self._kernel_scope():
                    for i, mb in enumerate(micro):
                        with self.parallel.grad_sync(self._net, self.model, i == len(micro) - 1):
                            with self._autocast():
                                loss = self._forward(mb)
                            check_loss(loss, needs_grad=True)
                            (loss / spec.accumulate if spec.accumulate > 1 else loss).backward()
                        total = loss.detach() if total is None else total + loss.detach()
            except BaseException:
                # A failed micro-batch leaves no gradients of the earlier ones behind to leak
                # into the next update.
                self.optimizer.zero_grad(set_to_none=True)
                raise
            loss = (total / spec.accumulate if spec.accumulate > 1 else total).float()
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
            loss, norm = self.parallel.reduce(loss, norm)
            if spec.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, spec.max_grad_norm, norm)
            self.raise_pending_nonfinite()
            lr = self._set_lr(self.updates)
            return self._guard(self, loss, norm, lr, tokens)

    def apply_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backend.mark_step()
        self.updates += 1
        self.advance_schedule()

    def advance_schedule(self) -> None:
        """The user's scheduler steps once per applied update. Under a check read one step
        late (``self.pending``), its state is kept first, to be put back if that step failed."""
        if self.scheduler is None:
            return
        if self.pending is not None:
            keys = user_optimizer.SCHEDULED_KEYS
            groups = [{k: v for k, v in g.items() if k in keys} for g in self.optimizer.param_groups]
            self._rewind = (self.scheduler.state_dict(), groups)
        user_optimizer.advance(self.scheduler)

    def raise_pending_nonfinite(self) -> None:
        """Raise for a deferred non-finite step (its update was already withheld on the device)."""
        pending, self.pending = self.pending, None
        if pending is None or not pending.failed():
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.updates = pending.step - 1
        if self._rewind is not None:  # the withheld update does not advance the schedule
            self.scheduler.load_state_dict(self._rewind[0])
            for group, values in zip(self.optimizer.param_groups, self._rewind[1]):
                group.update(values)
            self._rewind = None
        raise pending.error()

    def synchronize(self) -> None:
        self.backend.synchronize()

    def _set_lr(self, update: int) -> tuple[float, ...]:
        """Each group's learning rate for update number ``update`` (0-based). A spec's is
        written into the optimizer, computed as ``lr * schedule(update)``, the product LambdaLR
        forms, so a hand-written loop with LambdaLR gets bit-identical values; a tensor lr
        (lazy-tensor backends keep it on the device so that its value is graph data, not a
        constant) is copied into. The user's optimizer holds its own (its scheduler set them)."""
        import torch

        if self.spec.optimizer is self.optimizer:
            return user_optimizer.group_lrs(self.optimizer)
        value = self.spec.optimizer.lr * self.spec.optimizer.schedule.value(update)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(torch.tensor(value, dtype=group["lr"].dtype))
            else:
                group["lr"] = value
        return (value,) * len(self.optimizer.param_groups)

    def state_dict(self, sharded: bool = False) -> dict:
        self.raise_pending_nonfinite()
        return state.engine_state(self, sharded)

    def load_state_dict(self, saved: dict) -> None:
        state.load_engine_state(self, saved)
        self.pending = None
