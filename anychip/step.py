"""`TrainStep`: one optimizer update of a PyTorch model, on whichever backend was chosen.

The user writes ``loss_fn(model, batch) -> scalar tensor`` once. ``TrainStep`` validates every
argument up front (bad input fails before any work), then hands a :class:`StepSpec` to the
backend, which builds an *engine*: :class:`TorchEngine` below for the torch backends, a
jitted JAX step for ``jax:*``. One call ``step(batch)`` is one optimizer update:

* the batch is moved to the device and split into ``accumulate`` equal micro-batches along
  dim 0 (so ``accumulate=4`` on a batch of 32 equals one update on those 32 samples while
  holding only 8 in activation memory);
* forward + loss under the precision policy, backward, global gradient norm, optional
  clipping to ``max_grad_norm``, a non-finite check, optimizer update, schedule update.

The returned :class:`StepOutput` keeps the loss on the device; it is copied to the host only
when read, so a loop that does not print every step never waits for the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Any, Callable

from anychip.optim import AdamW, OptimizerSpec
from anychip.precision import Policy, policy
from anychip.recompile import ShapeWatch

log = logging.getLogger("anychip")

NONFINITE_POLICIES = ("raise", "skip", "ignore")
PARALLEL_MODES = (None, "ddp", "fsdp")


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was NaN/inf; the parameters were left as they were."""


class LossFunctionError(RuntimeError):
    """``loss_fn`` raised, or returned something that is not a scalar floating-point tensor."""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything a backend needs to build a training step; validated by :class:`TrainStep`."""

    model: Any
    loss_fn: Callable
    optimizer: OptimizerSpec
    policy: Policy
    max_grad_norm: float | None = None
    accumulate: int = 1
    compile: bool | None = None
    on_nonfinite: str = "raise"
    parallel: str | None = None
    strict_shapes: bool = False
    kernels: str = "auto"
    split_batches: bool = True


class StepOutput:
    """Result of one update. ``loss`` and ``grad_norm`` are device values read lazily."""

    __slots__ = ("step", "lr", "tokens", "skipped", "_loss", "_grad_norm", "_read")

    def __init__(self, step: int, loss, grad_norm, lr: float, tokens: int, skipped: bool = False):
        self.step, self.lr, self.tokens, self.skipped = step, lr, tokens, skipped
        self._loss, self._grad_norm, self._read = loss, grad_norm, {}

    def _host(self, key: str, value) -> float:
        if key not in self._read:
            self._read[key] = float(value)  # the one device->host sync, on first read
        return self._read[key]

    @property
    def loss(self) -> float:
        return self._host("loss", self._loss)

    @property
    def grad_norm(self) -> float:
        return self._host("grad_norm", self._grad_norm)

    @property
    def loss_tensor(self):
        """The loss as the backend produced it (no synchronisation)."""
        return self._loss

    def __repr__(self) -> str:
        return (
            f"StepOutput(step={self.step}, loss={self.loss:.6g}, grad_norm={self.grad_norm:.4g}, "
            f"lr={self.lr:.4g}, tokens={self.tokens}{', skipped=True' if self.skipped else ''})"
        )


# -- batch handling (shared by every engine) -----------------------------------------------------


def batch_leaves(batch, path: str = "batch") -> list[tuple[str, Any]]:
    """Every leaf of a batch with its path; raises TypeError on anything but tensors/containers."""
    import torch

    if isinstance(batch, torch.Tensor):
        return [(path, batch)]
    if isinstance(batch, dict):
        return [leaf for k, v in batch.items() for leaf in batch_leaves(v, f"{path}[{k!r}]")]
    if isinstance(batch, (tuple, list)):
        return [leaf for i, v in enumerate(batch) for leaf in batch_leaves(v, f"{path}[{i}]")]
    hint = " (convert it with torch.from_numpy)" if type(batch).__module__ == "numpy" else ""
    raise TypeError(
        f"{path} is a {type(batch).__module__}.{type(batch).__name__}; a batch must be a tensor or a "
        f"tuple/list/dict of tensors{hint}"
    )


def check_batch(batch, accumulate: int, processes: int = 1) -> list[tuple[str, Any]]:
    """The batch's leaves, once every leaf splits into ``processes`` x ``accumulate`` equal parts
    (``processes`` > 1: a global batch that each rank takes its slice of)."""
    leaves = batch_leaves(batch)
    if not leaves:
        raise TypeError("the batch holds no tensor; pass a tensor or a tuple/list/dict of tensors")
    parts = accumulate * processes
    if parts > 1:
        for path, t in leaves:
            if t.ndim == 0 or t.shape[0] % parts:
                size = tuple(t.shape)[:1] or "()"
                if processes > 1:
                    raise ValueError(
                        f"{path} has leading size {size}, which {processes} processes x accumulate={accumulate} cannot "
                        f"split into equal parts; use a global batch size divisible by {parts} (world size x accumulate)"
                    )
                raise ValueError(
                    f"{path} has leading size {size}, which accumulate={accumulate} "
                    f"cannot split into equal micro-batches; use a batch size divisible by {accumulate}"
                )
    return leaves


def split_batch(batch, parts: int) -> list:
    """``parts`` micro-batches, each leaf chunked along dim 0."""
    import torch

    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        pieces = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: pieces[k][i] for k in batch} for i in range(parts)]
    pieces = [split_batch(v, parts) for v in batch]
    return [type(batch)(p[i] for p in pieces) for i in range(parts)]


def count_tokens(leaves: list[tuple[str, Any]]) -> int:
    """Tokens in a batch: the elements of the first integer tensor (token ids), else the
    leading size of the first tensor (samples)."""
    import torch

    for _, t in leaves:
        if t.ndim and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            return t.numel()
    return int(leaves[0][1].shape[0]) if leaves[0][1].ndim else 1


def call_loss(loss_fn, model, batch):
    """Run the user's loss function; its failures become one clear LossFunctionError."""
    try:
        loss = loss_fn(model, batch)
    except (LossFunctionError, NonFiniteLossError):
        raise
    except Exception as exc:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LossFunctionError(f"loss_fn {name!r} raised {type(exc).__name__}: {first}") from exc
    return loss


def check_loss(loss) -> None:
    """A loss must be a 0-dim floating tensor (shape and dtype only: no device sync)."""
    shape = tuple(getattr(loss, "shape", ())) if hasattr(loss, "shape") else None
    if shape is None or not hasattr(loss, "dtype"):
        raise LossFunctionError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if shape != ():
        raise LossFunctionError(
            f"loss_fn must return a scalar tensor (shape ()), got shape {shape}; reduce it, e.g. loss.mean()"
        )
    if "float" not in str(loss.dtype):
        raise LossFunctionError(f"loss_fn must return a floating-point scalar, got dtype {loss.dtype}")


# -- the torch engine (cpu, cuda, neuron, neuron-xla) --------------------------------------------


class TorchEngine:
    """A training step in eager PyTorch, with the forward+loss optionally ``torch.compile``-d.

    This is the same loop a careful user writes by hand (compile the model call, autocast,
    fused AdamW); the benchmark in ``benchmarks/`` holds it to within a few percent of that.
    """

    def __init__(self, backend, spec: StepSpec):
        import torch

        self.backend, self.spec = backend, spec
        self.world, self.rank = 1, 0
        if spec.parallel is not None:
            self._join(backend, spec.parallel)
        model = spec.model
        if spec.policy.param_dtype != "fp32":
            model = model.to(spec.policy.torch_dtype("param"))
        self.model = backend.place(model)
        self._net = self._wrap(self.model) if spec.parallel is not None else self.model  # what loss_fn gets
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = backend.make_optimizer(spec.optimizer, self.params)
        fused = bool(self.optimizer.defaults.get("fused"))
        # With a fused optimizer the non-finite check needs no device sync: the kernels skip
        # the update on the device (the GradScaler mechanism, optimizer.found_inf) and the
        # flag is read one step later, when it has long been computed. A sync per step here
        # cost 4% of a GPT-2-small step on an H100 (benchmarks/RESULTS.md). Not under FSDP:
        # its parameters are DTensors, which a plain found_inf tensor cannot be mixed with.
        self._deferred = fused and spec.on_nonfinite == "raise" and spec.parallel != "fsdp"
        self._pending = None  # (host flag, event, step, loss, norm) of the last deferred check
        compile_ = backend.compile_by_default if spec.compile is None else spec.compile
        self._forward = backend.compile(self._loss) if compile_ else self._loss
        self._autocast = (
            (lambda: torch.autocast(backend.device_type, dtype=spec.policy.torch_dtype("compute")))
            if spec.policy.autocast
            else contextlib.nullcontext
        )
        self.updates = 0
        from anychip.kernels import BACKENDS as KERNEL_BACKENDS
        from anychip.kernels import defaults as kernel_defaults

        # A plug-in or test backend the kernel table does not know picks kernels by the
        # tensors' device instead (None), as a model used outside TrainStep does.
        kernel_backend = backend.name if backend.name in KERNEL_BACKENDS else None
        # Ops without an explicit backend resolve it from the tensors' device, which names the
        # backend already on cpu and cuda; the scope is only needed otherwise (per-step cost).
        if spec.kernels == "auto" and kernel_backend in (None, backend.device_type):
            self._kernel_scope = contextlib.nullcontext
        else:
            self._kernel_scope = functools.partial(kernel_defaults, backend=kernel_backend, kernels=spec.kernels)

    # -- several processes (torchrun) -------------------------------------------------------------
    def _join(self, backend, parallel: str) -> None:
        """Check the launch and join the process group, before the model is touched."""
        import torch.distributed as dist

        from anychip import distributed

        distributed.require_launch(parallel)
        if parallel == "fsdp" and backend.lazy_tensors:
            raise distributed.DistributedError(
                f"parallel='fsdp' is not supported on {backend.name!r} (lazy tensors: FSDP2 needs eager DTensors); use parallel='ddp'"
            )
        backend.init_distributed()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        launched = distributed.launched_world_size()
        if launched is not None and launched != self.world:
            # torch_xla's "xla://" takes rank and world size from the PJRT runtime, which on
            # some devices (PJRT_DEVICE=CPU) ignores torchrun: every process would train alone.
            raise distributed.DistributedError(
                f"torchrun started {launched} processes but the {backend.name!r} process group has world size "
                f"{self.world}; the {backend.name} runtime here cannot join processes (on torch_xla: a PJRT device "
                "with multi-process support is needed, not PJRT_DEVICE=CPU)"
            )
        self.step = self._parallel_step  # the single-process path keeps its plain method

    def _wrap(self, model):
        """DDP around the model, or FSDP2 (``fully_shard``) applied to it in place.

        FSDP shards every element of every ``nn.ModuleList`` (the transformer blocks: one
        all-gather per block, so only one block is unsharded at a time), then the root. It is
        first given rank 0's weights, as DDP's constructor does: ranks that built the model from
        different seeds still train one model."""
        import torch
        import torch.distributed as dist

        if self.spec.parallel == "ddp":
            # One device per rank (cuda, neuron); CPU and lazy XLA tensors take no device_ids.
            eager_device = self.backend.device_type != "cpu" and not self.backend.lazy_tensors
            device = [torch.accelerator.current_device_index()] if eager_device else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        mesh = init_device_mesh(self.backend.device_type, (self.world,))
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def _grad_sync(self, last: bool):
        """Gradient accumulation: reduce across ranks after the last micro-batch only (nothing
        to do in a single process)."""
        if self.spec.parallel == "ddp" and not last:
            return self._net.no_sync()
        if self.spec.parallel == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _parallel_step(self, batch, tokens: int) -> StepOutput:
        """``step`` under torchrun: this rank's slice of the global batch (``split_batches``), and
        a collective that fails (a peer died or hung past the timeout) as one clear error."""
        from anychip import distributed

        if self.spec.split_batches:
            batch = split_batch(batch, self.world)[self.rank]
        else:
            tokens *= self.world  # every rank passed its own part: the global batch is their union
        try:
            return TorchEngine.step(self, batch, tokens)
        except Exception as exc:
            if distributed.is_collective_failure(exc):
                raise distributed.peer_failure(exc, f"step {self.updates + 1}") from exc
            raise

    def _loss(self, batch):
        return call_loss(self.spec.loss_fn, self._net, batch)

    def step(self, batch, tokens: int) -> StepOutput:
        import torch

        spec = self.spec
        micro = split_batch(self.backend.place_batch(batch), spec.accumulate)
        total = None
        # anychip.nn layers pick their kernels for this backend (not a process-wide setting:
        # two steps on two backends in one process must not see each other's choice).
        with self._kernel_scope():
            for i, mb in enumerate(micro):
                with self._grad_sync(i == len(micro) - 1):
                    with self._autocast():
                        loss = self._forward(mb)
                    check_loss(loss)
                    (loss / spec.accumulate if spec.accumulate > 1 else loss).backward()
                total = loss.detach() if total is None else total + loss.detach()
        loss = (total / spec.accumulate if spec.accumulate > 1 else total).float()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        if spec.parallel is not None:
            import torch.distributed as dist

            # The loss of the global batch: the mean of the ranks' (equal-sized) slices. Gloo
            # has no AVG, hence SUM / world. Every rank then takes the same non-finite decision.
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss = loss / self.world
            if hasattr(norm, "full_tensor"):  # FSDP: per-shard norms, combined across ranks
                norm = norm.full_tensor()
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, spec.max_grad_norm, norm)
        self.raise_pending_nonfinite()
        lr = self._set_lr(self.updates)
        eager_check = not self._deferred and not self.backend.lazy_tensors and spec.on_nonfinite != "ignore"
        # The eager check reads two host floats: cheaper than three tensor ops on a CPU, and
        # the same one sync elsewhere (benchmarks/bench_step_overhead.py).
        finite = None if eager_check else torch.isfinite(loss) & torch.isfinite(norm)
        if self._deferred:
            self.optimizer.found_inf = (~finite).float()
            self._defer_check(finite, loss, norm)
        elif self.backend.lazy_tensors and spec.on_nonfinite != "ignore":
            # Lazy tensors (neuron-xla): bool(finite) now would execute the graph traced so far,
            # a second graph per step. So the update is masked on the device instead (old
            # parameters and optimizer state where the step is not finite; a state tensor this
            # step created is masked to zeros, what torch's AdamW and SGD start from) and the
            # flag is read after the sync, where it is a copy and not a graph: one step later
            # for "raise" (raise_pending_nonfinite; the device is not waited for meanwhile),
            # right away for "skip", which must return skipped=True.
            with torch.no_grad():
                before = [
                    (p, p.clone(), {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
                    for p in self.params
                ]
                self.optimizer.step()
                for p, old, old_state in before:
                    p.copy_(torch.where(finite, p, old))
                    for k, v in self.optimizer.state.get(p, {}).items():
                        if torch.is_tensor(v):
                            v.copy_(torch.where(finite, v, old_state[k] if k in old_state else torch.zeros_like(v)))
            del before  # not a graph output: the old values stay graph inputs, never copied out
            self.optimizer.zero_grad(set_to_none=True)
            self.backend.mark_step()
            self.updates += 1
            if spec.on_nonfinite == "raise":
                self._pending = (finite, None, self.updates, loss, norm)
            elif not bool(finite):
                self.updates -= 1
                log.warning("anychip: step %d: loss %s, grad norm %s is not finite; update skipped (masked on the device)",
                            self.updates + 1, float(loss), float(norm))
                return StepOutput(self.updates, loss, norm, lr, tokens, skipped=True)
            return StepOutput(self.updates, loss, norm, lr, tokens)
        elif eager_check and not (math.isfinite(loss.item()) and math.isfinite(norm.item())):
            self.optimizer.zero_grad(set_to_none=True)
            self.backend.mark_step()
            what = f"step {self.updates + 1}: loss {float(loss)}, grad norm {float(norm)}"
            if spec.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"{what} is not finite; parameters were not updated "
                    "(TrainStep(on_nonfinite='skip') skips such updates instead)"
                )
            log.warning("anychip: %s is not finite; update skipped", what)
            return StepOutput(self.updates, loss, norm, lr, tokens, skipped=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backend.mark_step()
        self.updates += 1
        return StepOutput(self.updates, loss, norm, lr, tokens)

    def _defer_check(self, finite, loss, norm) -> None:
        import torch

        host = torch.empty((), dtype=torch.bool, pin_memory=finite.device.type == "cuda")
        host.copy_(finite, non_blocking=True)
        event = None
        if finite.device.type != "cpu":
            event = torch.Event(device=finite.device)
            event.record()
        self._pending = (host, event, self.updates + 1, loss, norm)

    def raise_pending_nonfinite(self) -> None:
        """Raise for a deferred non-finite step (its update was already skipped on the device)."""
        if self._pending is None:
            return
        host, event, step, loss, norm = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # waits for that step only, not for work queued after it
        if bool(host):
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.updates = step - 1
        raise NonFiniteLossError(
            f"step {step}: loss {float(loss)}, grad norm {float(norm)} is not finite; parameters were not "
            "updated (TrainStep(on_nonfinite='skip') skips such updates instead)"
        )

    def _set_lr(self, update: int) -> float:
        """Learning rate of update number ``update`` (0-based), written into the optimizer.
        Computed as ``lr * schedule(update)``, the product LambdaLR forms, so a hand-written
        loop with LambdaLR gets bit-identical values. A tensor lr (lazy-tensor backends keep
        it on the device so that its value is graph data, not a constant) is copied into."""
        import torch

        value = self.spec.optimizer.lr * self.spec.optimizer.schedule.value(update)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(torch.tensor(value, dtype=group["lr"].dtype))
            else:
                group["lr"] = value
        return value

    # Backend-neutral state: parameters by name, optimizer slots by slot name then parameter
    # name; the same layout the JAX engine and checkpoints use.
    # FSDP's sharded tensors (DTensors) are gathered whole on every rank (a collective: every
    # rank calls state_dict()), so a sharded run saves the same portable layout.
    def state_dict(self) -> dict:
        self.raise_pending_nonfinite()
        opt_state = self.optimizer.state
        slots = {
            slot: {n: _whole(opt_state[p][slot]) for n, p in zip(self.param_names, self.params) if slot in opt_state.get(p, {})}
            for slot in self.spec.optimizer.slots
        }
        return {
            "step": self.updates,
            "model": {k: _whole(v) for k, v in self.model.state_dict().items()},
            "optimizer": {"slots": slots},
        }

    def load_state_dict(self, state: dict) -> None:
        import torch

        current = self.model.state_dict()
        self.model.load_state_dict({k: _shaped_like(v, current.get(k)) for k, v in state["model"].items()})
        n = int(state["step"])
        per_param = {}
        for i, name in enumerate(self.param_names):
            entry = {
                slot: _shaped_like(state["optimizer"]["slots"][slot][name], self.params[i])
                for slot in self.spec.optimizer.slots
                if name in state["optimizer"]["slots"].get(slot, {})
            }
            if entry:
                if "exp_avg" in entry:  # Adam-style state counts its own steps
                    entry["step"] = torch.tensor(float(n))
                per_param[i] = entry
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})
        self.updates = n
        self._pending = None


def _whole(t):
    """A CPU copy of ``t``; a sharded DTensor is all-gathered first."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def _shaped_like(value, target):
    """``value`` (a whole CPU tensor) laid out as ``target``: this rank's shard of it when the
    target is a DTensor. Every rank holds the whole value, so nothing is communicated."""
    if target is None or not hasattr(target, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)


# -- the public class --------------------------------------------------------------------------


class TrainStep:
    """One portable training step: ``TrainStep(model, loss_fn, optimizer=ac.AdamW(...))(batch)``.

    Arguments are checked here, before any device work; each error says what was wrong and
    how to fix it.
    """

    def __init__(
        self,
        model,
        loss_fn: Callable,
        optimizer: OptimizerSpec | None = None,
        *,
        backend=None,
        precision: str = "fp32",
        max_grad_norm: float | None = None,
        accumulate: int = 1,
        compile: bool | None = None,
        on_nonfinite: str = "raise",
        parallel: str | None = None,
        strict_shapes: bool = False,
        kernels: str = "auto",
        split_batches: bool = True,
    ):
        import torch

        from anychip.backends import backend as select
        from anychip.backends.base import Backend

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        optimizer = AdamW() if optimizer is None else optimizer
        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be an anychip spec such as ac.AdamW(lr=3e-4), not a torch.optim object: "
                "the spec is what each backend materialises for itself"
            )
        if not isinstance(optimizer, OptimizerSpec):
            raise TypeError(f"optimizer must be ac.AdamW(...) or ac.SGD(...), got {type(optimizer).__name__}")
        pol = policy(precision)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
        if not (isinstance(accumulate, int) and not isinstance(accumulate, bool) and accumulate >= 1):
            raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
        if not isinstance(split_batches, bool):
            raise TypeError(f"split_batches must be True or False, got {split_batches!r}")
        if kernels not in ("auto", "reference"):
            raise ValueError(f"kernels must be 'auto' or 'reference', got {kernels!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.backend = backend if isinstance(backend, Backend) else select(backend)
        self.spec = StepSpec(
            model, loss_fn, optimizer, pol, max_grad_norm, accumulate, compile, on_nonfinite, parallel, strict_shapes, kernels,
            split_batches,
        )
        self.engine = self.backend.make_engine(self.spec)
        self._shapes = ShapeWatch(strict_shapes, self.backend.name)
        # Under torchrun with split_batches, each call gets the global batch: it must split
        # into world size x accumulate equal parts (the jax engine checks its own mesh).
        self._processes = getattr(self.engine, "world", 1) if split_batches else 1

    @property
    def model(self):
        """The model as trained (on the device for torch backends; synced back for JAX)."""
        return self.engine.model

    @property
    def step_count(self) -> int:
        return self.engine.updates

    def __call__(self, batch) -> StepOutput:
        leaves = check_batch(batch, self.spec.accumulate, self._processes)
        self._shapes.check(leaves)
        return self.engine.step(batch, count_tokens(leaves))

    def state_dict(self) -> dict:
        """Backend-neutral training state: CPU tensors keyed by parameter and slot names."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)
