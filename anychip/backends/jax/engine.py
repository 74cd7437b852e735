"""``JaxEngine``: a training step as one jitted JAX function per update.

The user's torch model and loss are run under torchax inside ``jax.value_and_grad``;
accumulation is a ``lax.scan`` over micro-batches; clipping, the non-finite check (parameters,
optimizer state and counter kept where the step is not finite) and the optax update are in the
same jit, with the state buffers donated. Process 0's initial weights are broadcast, as DDP and
FSDP do; reading values back works on every process, and gathering sharded (FSDP) arrays is a
collective every process must join.
"""

from __future__ import annotations

import contextlib
import logging

from anychip import distributed
from anychip.backends.jax import autocast as jax_autocast
from anychip.backends.jax import prng, step_optimizer
from anychip.backends.jax.convert import DATA_AXIS, global_array, host_array, matmul_precision, to_torch
from anychip.backends.jax.diagnose import translate
from anychip.batch import call_loss, check_loss, no_gradient_path
from anychip.engine import PendingCheck, StepOutput
from anychip.errors import DistributedError
from anychip.kernels.scope import kernel_scope
from anychip.kernels.torchax import batch_norms, cumulative_batch_norm, environment as torchax_environment

log = logging.getLogger("anychip")


def _fsdp_spec(shape, n: int):
    """Split the largest dimension divisible by ``n`` over the data axis; replicate otherwise."""
    from jax.sharding import PartitionSpec as P

    dims = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
    if n == 1 or not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], -i))
    return P(*([None] * best), DATA_AXIS)


class JaxEngine:
    """A :class:`anychip.step.TrainStep` engine: one jitted JAX function per update."""

    def __init__(self, backend, spec):
        import jax
        import numpy as np
        import torch

        self.backend, self.spec = backend, spec
        # Joins jax.distributed if launched so: before anything below (torchax's environment
        # makes a PRNG key) starts JAX, after which initialize() is refused.
        n = len(backend.devices)
        launched = distributed.launched_world_size()
        if launched is not None and launched > 1 and backend.processes != launched:
            # torchrun's variables mean nothing to JAX: each process would train alone on its mesh.
            raise DistributedError(
                f"torchrun started {launched} processes but {backend.name} sees {backend.processes}; jax backends join "
                "through jax.distributed: start one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
                "and JAX_PROCESS_ID set instead of torchrun"
            )
        model = spec.model
        if spec.policy.param_dtype != "fp32":
            model = model.to(spec.policy.torch_dtype("param"))  # as TorchEngine: stored in bf16
        self._template = model  # the torch module engine.model returns, refreshed lazily
        self._batch_norms = batch_norms(model)
        self._trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.param_names = list(self._trainable)
        # Frozen parameters travel with the buffers: inputs of the step, never updated.
        self._frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self._constants = {**{n: p for n, p in model.named_parameters() if n in self._frozen}, **dict(model.named_buffers())}
        # A spec as optax, or the user's torch.optim optimizer translated (refused here, before
        # any work, if it cannot be); its scheduled hyperparameters are inputs of the step.
        self.optimizer = step_optimizer.make(spec, model, self.param_names)
        self.names = getattr(self.optimizer, "names", None)  # {id(torch parameter): name}, for checkpoints

        class _Loss(torch.nn.Module):
            # loss_fn(model, batch) as a module call, so torch.func.functional_call can run it
            # with JAX-backed parameters (tied weights stay tied).
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, batch):
                return call_loss(spec.loss_fn, self.model, batch)

        self._loss_module = _Loss()
        self.kernels_used: set[str] = set()  # e.g. {"attention:cudnn"}, filled when the step is traced
        self.env = torchax_environment(backend.platform, spec.kernels, self.kernels_used)
        if spec.policy.autocast:
            jax_autocast.install(self.env, backend.platform)  # torch's op policy, on while tracing
        self._param_sharding = {
            name: backend.sharding(_fsdp_spec(p.shape, n) if spec.parallel == "fsdp" else None)
            for name, p in self._trainable.items()
        }
        replicated = backend.sharding()
        params, buffers = self._host_state()
        key = prng.initial_key_data()  # from torch's generator: torch.manual_seed governs dropout here too
        if backend.processes > 1:
            # Process 0's weights and PRNG key everywhere, as DDP and FSDP do under torchrun:
            # processes that built the model differently still train one model.
            from jax.experimental import multihost_utils

            params, buffers, key = multihost_utils.broadcast_one_to_all((params, buffers, key))
        self._place_state(params, buffers)
        self._key = prng.place(key, replicated)
        self.opt_state = self._init_optimizer()
        out_shardings = (self._param_sharding, replicated, self._opt_sharding, replicated, replicated, replicated, replicated)
        # CPU supports donation too; the old state buffers are reused for the new state.
        self._jitted = jax.jit(
            self._step, donate_argnums=(0, 1, 2, 3), out_shardings=out_shardings,
            compiler_options=jax_autocast.compiler_options(backend.platform, spec.policy),
        )
        self._run = self._jitted if spec.compile is not False else self._step  # compile=False: eager, for debugging
        self._true = global_array(np.asarray(True), replicated)
        self.pending = None  # a PendingCheck of the last step, read one step late
        self._last = None  # the last step's outputs, for synchronize()
        self.updates = 0
        self.world = backend.processes
        self.batch_parts = 1  # place_batch checks that the batch splits over the mesh
        self.compiles = 0  # traced-and-compiled step programs (one per input signature)
        # The torch module lags behind the JAX parameters; across processes it may hold this
        # process's initial weights instead of process 0's.
        self._stale = backend.processes > 1

    # -- state ---------------------------------------------------------------------------------
    def _host_state(self) -> tuple[dict, dict]:
        """The torch module's trainable parameters and constants as host arrays, by name."""
        params = {n: host_array(p) for n, p in self._trainable.items()}
        return params, {n: host_array(b) for n, b in self._constants.items()}

    def _place_state(self, params: dict, buffers: dict) -> None:
        self.params = {n: global_array(a, self._param_sharding[n]) for n, a in params.items()}
        self.buffers = {n: global_array(a, self.backend.sharding()) for n, a in buffers.items()}

    def _init_optimizer(self):
        import jax

        shapes = jax.eval_shape(self.optimizer.init, self.params)
        replicated = self.backend.sharding()

        def sharding_of(path, leaf):
            # Per-parameter slots ({name: array} dicts) follow their parameter's sharding.
            key = getattr(path[-1], "key", None) if path else None
            if key in self._param_sharding and tuple(leaf.shape) == tuple(self.params[key].shape):
                return self._param_sharding[key]
            return replicated

        self._opt_sharding = jax.tree_util.tree_map_with_path(sharding_of, shapes)
        return jax.jit(self.optimizer.init, out_shardings=self._opt_sharding)(self.params)

    # -- the traced step -----------------------------------------------------------------------
    def _loss(self, params, buffers, micro, key):
        """Scaled loss for the gradient, with (loss, buffers after the forward, PRNG key) as aux."""
        import jax
        import jax.numpy as jnp
        import torch

        env, acc, policy = self.env, self.spec.accumulate, self.spec.policy
        stored = buffers
        if policy.param_dtype == "bf16":
            # "bf16-pure": parameters are stored in bf16; float inputs are fed in bf16 too, as
            # TorchEngine does. "bf16" casts nothing here: autocast decides per op (below).
            micro = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, micro)
        autocast = policy.torch_dtype("compute") if policy.autocast else None
        with env.override_property(prng=key, autocast_dtype=autocast):
            tparams, tbuffers, tbatch = env.j2t_iso((params, buffers, micro))
            state = {f"model.{k}": v for k, v in {**tparams, **tbuffers}.items()}
            with env:
                loss = torch.func.functional_call(self._loss_module, state, (tbatch,), tie_weights=True, strict=False)
                check_loss(loss)
            new_key = env.prng_key
        loss = env.t2j_iso(loss)
        # Differentiated inputs are tracers of jax.value_and_grad; a loss of another kind (a
        # constant, or traced from the batch only) does not depend on them: the gradient would
        # be silently zero where a torch backend refuses the backward.
        anchor = next(iter(params.values()))
        if isinstance(anchor, jax.core.Tracer) and type(loss) is not type(anchor):
            raise no_gradient_path()
        loss = loss.astype(jnp.float32)
        # In-place buffer updates (e.g. BatchNorm statistics) land in the tensors we passed.
        new_buffers = {k: env.t2j_iso(tbuffers[k]).astype(stored[k].dtype) for k in stored}
        return (loss / acc if acc > 1 else loss), (loss, new_buffers, new_key)

    def _global_norm(self, grads):
        """torch.nn.utils.get_total_norm: the 2-norm of the per-parameter 2-norms, in parameter order."""
        import jax.numpy as jnp

        norms = [jnp.linalg.norm(grads[n].astype(jnp.float32).ravel()) for n in self.param_names]
        return jnp.linalg.norm(jnp.stack(norms)) if norms else jnp.zeros((), jnp.float32)

    def _step(self, params, buffers, opt_state, key, batch, previous_ok, hyper):
        import jax
        import jax.numpy as jnp
        import optax

        spec = self.spec
        old_buffers = buffers
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if spec.accumulate == 1:
            (_, (loss, buffers, key)), grads = grad_fn(params, buffers, batch, key)
        else:
            # One micro-batch per scan iteration: activation memory of one micro-batch; the
            # sums run in torch's order (grad of loss/acc added up, loss summed then divided).
            def micro_step(carry, micro):
                gsum, lsum, bufs, k = carry
                (_, (micro_loss, bufs, k)), g = grad_fn(params, bufs, micro, k)
                return (jax.tree.map(jnp.add, gsum, g), lsum + micro_loss, bufs, k), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            carry = (zeros, jnp.zeros((), jnp.float32), buffers, key)
            (grads, total, buffers, key), _ = jax.lax.scan(micro_step, carry, batch)
            loss = total / spec.accumulate
        if spec.parallel == "fsdp":
            # Gradients live sharded like their parameters: the cross-device sum becomes a
            # reduce-scatter, and the optimizer update runs on each device's shard only.
            grads = jax.lax.with_sharding_constraint(grads, self._param_sharding)
        norm = self._global_norm(grads)
        if spec.max_grad_norm is not None:
            # clip_grads_with_norm_: max_norm / (norm + 1e-6) (torch evaluates it as a reciprocal
            # times max_norm), clamped to 1, multiplied in unconditionally.
            coef = jnp.minimum(jnp.reciprocal(norm + 1e-6) * spec.max_grad_norm, 1.0)
            grads = {k: (g * coef).astype(g.dtype) for k, g in grads.items()}
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params, hyper)
        new_params = optax.apply_updates(params, updates)
        # ``previous_ok`` is the previous step's flag when its check is deferred (see step()):
        # a step queued behind an unnoticed non-finite one changes nothing at all.
        ok = jnp.isfinite(loss) & jnp.isfinite(norm) & previous_ok
        if spec.on_nonfinite != "ignore":
            # A non-finite update leaves parameters, optimizer state and step counter untouched.
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            new_params = jax.tree.map(keep, new_params, params)
            new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
            buffers = jax.tree.map(lambda new, old: jnp.where(previous_ok, new, old), buffers, old_buffers)
        if self.spec.compile is not False:  # Python runs here once per trace: once per compiled program
            self.compiles += 1
        return new_params, buffers, new_opt_state, key, loss, norm, ok

    # -- the public engine interface -----------------------------------------------------------
    @contextlib.contextmanager
    def _tracing(self):
        """What the trace must see: torch's float32 matmul precision, and this backend as the
        one anychip's kernel ops (anychip.nn layers) select their implementation for."""
        import jax

        with jax.default_matmul_precision(matmul_precision()), kernel_scope(self.backend.name, self.spec.kernels):
            with cumulative_batch_norm(self._batch_norms):  # momentum=None: the factor as traced data
                yield

    def _hyper(self):
        """This update's scheduled hyperparameters (None for a spec's in-jit schedule), placed
        as data: a new value is a new input, never a new program."""
        hyper = self.optimizer.hyper(self.updates)
        return None if hyper is None else global_array(hyper, self.backend.sharding())

    def _call(self, placed, previous_ok):
        try:
            with self._tracing():
                return self._run(self.params, self.buffers, self.opt_state, self._key, placed, previous_ok, self._hyper())
        except Exception as exc:
            better = translate(exc, self.backend.name)
            if better is None:
                raise
            raise better from exc

    def step(self, batch, tokens: int):
        """One update. With ``on_nonfinite="raise"`` the finiteness flag is read one step late,
        as TorchEngine does with fused optimizers: step N+1 is queued before the host waits
        for step N's flag, so the device never idles on the check. Step N's bad update was
        never applied, and N+1, fed N's flag, applies nothing either; the error names step N."""
        spec = self.spec
        placed = self.backend.place_batch(batch, spec.accumulate, strict=spec.parallel is not None, split_batches=spec.split_batches)
        if not spec.split_batches:
            tokens *= self.backend.processes  # each process passed its own part of the global batch
        lr = self.optimizer.lrs(self.updates)
        pending, self.pending = self.pending, None
        out = self._call(placed, pending.flag if pending is not None else self._true)
        self.params, self.buffers, self.opt_state, self._key, loss, norm, ok = out
        self._stale = True
        self._last = (loss, self.params)
        if spec.on_nonfinite == "raise":
            self._raise(pending)
            self.pending = PendingCheck(ok, self.updates + 1, loss, norm)
        elif spec.on_nonfinite == "skip" and not bool(ok):  # the one sync per step, as TorchEngine
            log.warning("anychip: step %d: loss %s, grad norm %s is not finite; update skipped", self.updates + 1, float(loss), float(norm))
            return StepOutput(self.updates, loss, norm, lr, tokens, skipped=True)
        self.updates += 1
        self.optimizer.advance(provisional=spec.on_nonfinite == "raise")  # once per applied update
        return StepOutput(self.updates, loss, norm, lr, tokens)

    def _raise(self, pending) -> None:
        """Read a deferred flag (waiting for that step only) and raise if it was not finite."""
        if pending is None or not pending.failed():
            return
        self.updates = pending.step - 1
        self.optimizer.rewind()  # the withheld update does not advance the scheduler
        raise pending.error()

    def raise_pending_nonfinite(self) -> None:
        """Settle the last step's deferred check now (state_dict() and model do this too)."""
        pending, self.pending = self.pending, None
        self._raise(pending)

    def synchronize(self) -> None:
        import jax

        if self._last is not None:
            jax.block_until_ready(self._last)

    def lower(self, batch):
        """The jitted step lowered for ``batch`` (``.compile().as_text()`` is the HLO)."""
        spec = self.spec
        placed = self.backend.place_batch(batch, spec.accumulate, strict=spec.parallel is not None, split_batches=spec.split_batches)
        compiles = self.compiles
        try:
            with self._tracing():
                return self._jitted.lower(self.params, self.buffers, self.opt_state, self._key, placed, self._true, self._hyper())
        finally:
            self.compiles = compiles  # lowering for inspection is not a step compile

    @property
    def model(self):
        """The torch module with the current weights, copied back from the devices on access.
        The step trains the JAX copy: edit weights through ``load_state_dict``, not the module.
        With sharded (FSDP) parameters over several processes, every process must read it
        (the shards are gathered collectively)."""
        import torch

        self.raise_pending_nonfinite()
        if self._stale:
            with torch.no_grad():
                for name, p in self._trainable.items():
                    p.copy_(to_torch(self.params[name]))
                for name, b in self._constants.items():
                    b.copy_(to_torch(self.buffers[name]))
            self._stale = False
        return self._template

    def state_dict(self, sharded: bool = False) -> dict:
        """The layout of the torch engines' state: CPU tensors by name, whole (``sharded`` too:
        one process drives all its devices, so the whole state is its to give).
        Multi-host: every process must call it (sharded arrays are gathered collectively)."""
        model = self.model
        return {
            "step": self.updates,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            **self.optimizer.state_dict(self.opt_state, self.updates, self.param_names, to_torch),
            "rng": prng.key_state(self._key),  # the engine's own generator (see anychip.backends.jax.prng)
        }

    def load_state_dict(self, state: dict) -> None:
        """Every process passes the same whole state (as read from a checkpoint); each places the
        pieces its devices hold, so loading communicates nothing."""
        import numpy as np

        # "rng" absent (ac.load(restore_rng=False)): the key runs on; checked before anything changes.
        rng = state.get("rng")
        key = None if rng is None else prng.key_data_from_state(rng, int(state["step"]), self._key)
        self.pending = None  # whatever the last step did is replaced
        self._template.load_state_dict(state["model"])  # torch checks names and shapes
        self._stale = False
        self._place_state(*self._host_state())
        n = int(state["step"])

        def place(name, value, like):  # a whole host value where ``like`` lives (its shard of it)
            a = host_array(value) if hasattr(value, "detach") else np.asarray(value)
            return global_array(a.astype(like.dtype), like.sharding)

        self.opt_state = self.optimizer.load(self._init_optimizer(), state, n, place)
        self.updates = n
        if key is not None:
            self._key = prng.place(key, self.backend.sharding())
