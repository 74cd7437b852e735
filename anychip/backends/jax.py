"""`jax:tpu`, `jax:gpu`, `jax:cpu`: the user's unchanged torch model, traced into one jitted JAX step.

How a step runs (DESIGN, "Backends"; issue 3):

* torchax turns the model's parameters and buffers into JAX arrays and lowers every torch op
  the model calls to ``jax.numpy``; the forward + ``loss_fn`` become a pure JAX function of
  the parameters, differentiated by ``jax.value_and_grad`` (not ``torch.func`` under
  ``jax_jit``: LayerNorm's backward breaks there on torch 2.13);
* the optimizer spec is materialised as optax (:meth:`anychip.optim.AdamW.to_optax`), with
  the torch math operation for operation, and the schedule evaluated inside the step;
* gradient accumulation, global-norm clipping (``torch.nn.utils.clip_grad_norm_``'s formula),
  the non-finite check and the update are all one ``jax.jit`` with donated state buffers.

Parallelism: a ``jax.sharding.Mesh`` with one axis, ``data``, over every device JAX sees.
The batch is split along it and the parameters replicated (data parallel; XLA inserts the
gradient all-reduce), or with ``parallel="fsdp"`` parameters and optimizer state are split
along their largest dimension divisible by the device count (XLA all-gathers them for the
forward and sums the gradients into shards: a reduce-scatter on GPU/TPU, all-reduce + slice on
XLA:CPU). Either way ``loss_fn`` sees the global batch, so losses equal a single-device run.

Several processes (hosts): ``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` is
set, before JAX first looks at its devices; the mesh then spans every process's devices. As
under torchrun, ``step(batch)`` gets the global batch on every process and each process places
only the rows its devices own (``split_batches=True``), or each process passes its own part and
the global batch is their union (``split_batches=False``). Process 0's initial weights are
broadcast, as DDP and FSDP do; reading values back (losses, ``model``, ``state_dict()``) works
on every process, and gathering sharded (FSDP) arrays is a collective every process must join.

Op overrides live in this backend's own torchax environment (no global mutation):
``F.scaled_dot_product_attention``, which torchax lowers to a materialised reference, goes to
``jax.nn.dot_product_attention``: cuDNN flash attention on GPUs for bf16/fp16 inputs (1.62x
faster GPT-2-small step on an H100, DESIGN), XLA's fused form elsewhere. ``F.batch_norm``
gets torch's running-statistics update, which torchax 0.0.14 drops.

The probe reads package metadata, ``/dev/nvidia*`` and PCI ids only; jax, torchax and optax
are imported when the backend is first used.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import socket
import time

from anychip.backends import Availability
from anychip.backends import probe as facts
from anychip.backends.base import Backend, MemoryStats, map_tensors, process_rss_stats

log = logging.getLogger("anychip")

INSTALL = "pip install 'anychip[jax]'"
INSTALL_TPU = "pip install 'jax[tpu]'"
INSTALL_GPU = "pip install 'jax[cuda12]'"
REQUIRED = ("jax", "jaxlib", "torchax", "optax")
CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
DATA_AXIS = "data"

# Google's PCI vendor id is shared by TPUs and other devices (the gVNIC network card of every
# GCE VM), so the device id must say "TPU". Table from jax/_src/hardware_utils.py.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {
    "0x0027": "TPU v3",
    "0x005e": "TPU v4",
    "0x0062": "TPU v5p",
    "0x0063": "TPU v5 lite",
    "0x006f": "TPU v6 lite",
    "0x0076": "TPU7x",
}


# -- probe (stdlib only) -----------------------------------------------------------------------


PCI_ROOT = "/sys/bus/pci/devices"


def tpu_chips(root: str | None = None) -> tuple[int, str, bool]:
    """(TPU chips, their kind, whether any Google PCI device was seen at all)."""
    chips, kind, google = 0, "", False
    for vendor_path in glob.glob(os.path.join(root or PCI_ROOT, "*", "vendor")):
        try:
            with open(vendor_path) as fh:
                if fh.read().strip().lower() != GOOGLE_PCI_VENDOR:
                    continue
            google = True
            with open(os.path.join(os.path.dirname(vendor_path), "device")) as fh:
                device = fh.read().strip().lower()
        except OSError:
            continue
        if device in TPU_PCI_DEVICES:
            chips, kind = chips + 1, TPU_PCI_DEVICES[device]
    return chips, kind, google


def _forced_host_devices() -> int:
    """CPU 'devices' requested through XLA_FLAGS (--xla_force_host_platform_device_count=N)."""
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else 1


def probe(name: str = "jax:cpu") -> Availability:
    platform = name.partition(":")[2] or "cpu"
    versions = facts.versions(*REQUIRED, "libtpu", "libtpu-nightly", *CUDA_PLUGINS)
    missing = [m for m in REQUIRED if not facts.importable(m)]
    if missing:
        return Availability(name, False, f"{', '.join(missing)} not installed", versions=versions, install=INSTALL)
    if platform == "tpu":
        chips, kind, google = tpu_chips()
        if not chips:
            why = "Google PCI devices found, none of them a TPU" if google else "no TPU found (no PCI device from Google, vendor 0x1ae0)"
            return Availability(name, False, why, versions=versions)
        if not (facts.importable("libtpu") or "libtpu" in versions or "libtpu-nightly" in versions):
            return Availability(
                name, False, "a TPU seems present but libtpu is not installed", devices=chips,
                device_kind=kind, versions=versions, install=INSTALL_TPU,
            )
        return Availability(name, True, f"{chips} TPU chip(s)", devices=chips, device_kind=kind, versions=versions)
    if platform == "gpu":
        if not any(p in versions for p in CUDA_PLUGINS):
            return Availability(name, False, "no CUDA plugin for jax installed", versions=versions, install=INSTALL_GPU)
        gpus = facts.device_files("/dev/nvidia")
        if not gpus:
            return Availability(name, False, "no NVIDIA GPU found (no /dev/nvidia0)", versions=versions)
        kind = ""
        if (smi := facts.run_tool(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])) and smi[0] == 0:
            kind = smi[1].strip().splitlines()[0].strip()
        return Availability(name, True, f"{len(gpus)} NVIDIA GPU(s)", devices=len(gpus), device_kind=kind, versions=versions)
    if platform == "cpu":
        n = _forced_host_devices()
        return Availability(name, True, f"XLA on the host CPU ({n} device{'s' * (n > 1)})", devices=n, device_kind="cpu", versions=versions)
    return Availability(name, False, f"unknown JAX platform {platform!r}; use jax:tpu, jax:gpu or jax:cpu")


# -- errors ------------------------------------------------------------------------------------


class UnsupportedOpError(NotImplementedError):
    """The model calls a torch op that torchax cannot lower to JAX."""


def _is_library_frame(filename: str) -> bool:
    """Frames of torch, torchax, jax, the stdlib and anychip's own step machinery."""
    import jax
    import torch
    import torchax

    import anychip

    path = os.path.realpath(filename)
    here = os.path.dirname(os.path.realpath(anychip.__file__))
    packages = [os.path.dirname(os.path.realpath(m.__file__)) for m in (jax, torch, torchax)]
    packages += [os.path.join(here, "backends"), os.path.join(here, "step.py")]
    if path.startswith(tuple(packages)) or "/jaxlib/" in path or path.startswith("<"):
        return True
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    return path.startswith(stdlib) and "-packages" not in path  # site-/dist-packages hold user libraries


def _user_frame(exc: BaseException) -> str:
    """'file.py:12 in forward: `y = pool(x)`' for the innermost frame outside the libraries."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_library_frame(f.filename)]
    if not frames:
        return "an unknown line"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def _translate(exc: BaseException, backend_name: str) -> BaseException | None:
    """A clearer error for what JAX tracing cannot do, or None to re-raise ``exc`` as is."""
    import jax
    from torchax.tensor import OperatorNotFound

    from anychip.step import LossFunctionError

    chain, cur = [], exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, OperatorNotFound):
            found = re.search(r"name (\S+) has no lowering", str(e))
            op = found.group(1) if found else str(e)
            return UnsupportedOpError(
                f"{backend_name} cannot run {op}: torchax has no JAX lowering for it (called at {_user_frame(e)}). "
                f"Run this model on a torch backend (backend='cpu' or 'cuda'), or give the op a JAX "
                f"implementation through a kernel override (anychip.kernels)."
            )
        if isinstance(e, jax.errors.ConcretizationTypeError | jax.errors.TracerBoolConversionError | jax.errors.TracerIntegerConversionError):
            return LossFunctionError(
                f"{backend_name} traces the model into a jitted step, and it reads a tensor value on the host "
                f"at {_user_frame(e)} (.item(), float(t), bool(t) or an `if` on a tensor); keep such logic "
                "out of the model and loss_fn, or use a torch backend"
            )
    return None


# -- conversions -------------------------------------------------------------------------------


def _host_array(t):
    """A torch tensor as a numpy array JAX accepts without x64: int64 -> int32, float64 -> float32."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    a = t.numpy()
    if a.dtype == np.int64:
        return a.astype(np.int32)
    if a.dtype == np.float64:
        return a.astype(np.float32)
    return a


def _to_torch(arr):
    """A (possibly sharded, possibly multi-host) JAX array as a CPU torch tensor."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    if not arr.is_fully_addressable:
        if arr.sharding.is_fully_replicated:
            arr = arr.addressable_data(0)  # every process holds it whole: no collective
        else:
            from jax.experimental import multihost_utils

            arr = multihost_utils.process_allgather(arr, tiled=True)
    a = np.asarray(arr)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _global_array(a, sharding):
    """Host data ``a``, the same on every process, placed on ``sharding``. Across processes each
    copies only the pieces its own devices hold: ``jax.device_put`` would first all-gather ``a``
    to check that it is equal everywhere, a collective and a compile per shape."""
    import jax

    if sharding.is_fully_addressable:
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def _matmul_precision() -> str:
    """JAX's float32 matmul precision from torch's global setting, so one knob governs both
    stacks (JAX defaults to TF32 on GPUs, torch to full float32)."""
    import torch

    return {"highest": "highest", "high": "tensorfloat32", "medium": "bfloat16"}.get(
        torch.get_float32_matmul_precision(), "highest"
    )


# -- attention ---------------------------------------------------------------------------------


def _attention(env, platform: str, used: set):
    """``F.scaled_dot_product_attention`` for torchax tensors via ``jax.nn.dot_product_attention``;
    the implementations it picked are added to ``used`` (at trace time)."""
    import jax
    import jax.numpy as jnp

    def reference(q, k, v, bias, mask, dropout_p, is_causal, scale):
        # Only for dropout, which jax.nn.dot_product_attention does not do.
        if k.shape[-3] != q.shape[-3]:
            k, v = (jnp.repeat(x, q.shape[-3] // x.shape[-3], axis=-3) for x in (k, v))
        scores = jnp.einsum("...le,...se->...ls", q, k, preferred_element_type=jnp.float32) * scale
        if is_causal:
            mask = jnp.tril(jnp.ones(scores.shape[-2:], bool))
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        if bias is not None:
            scores = scores + bias
        w = jax.nn.softmax(scores, axis=-1)
        keep = jax.random.bernoulli(env.get_and_rotate_prng_key(), 1.0 - dropout_p, w.shape)
        w = jnp.where(keep, w / (1.0 - dropout_p), 0.0).astype(q.dtype)
        return jnp.einsum("...ls,...se->...le", w, v)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v, m = env.t2j_iso((query, key, value, attn_mask))
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        bias = mask = None
        if m is not None:
            mask, bias = (m, None) if m.dtype == jnp.bool_ else (None, m.astype(q.dtype))
        if dropout_p > 0 or q.ndim != 4:
            used.add("attention:reference")
            return env.j2t_iso(reference(q, k, v, bias, mask, dropout_p, is_causal, scale))
        # torch (B, H, L, E) <-> jax (B, T, N, H); masks keep torch's (B, H, L, S) order.
        qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        impls = ["cudnn", "xla"] if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else ["xla"]
        for impl in impls:
            try:
                out = jax.nn.dot_product_attention(qt, kt, vt, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation=impl)
                used.add(f"attention:{impl}")
                break
            except (ValueError, NotImplementedError, TypeError) as exc:
                if impl == impls[-1]:
                    raise
                log.info("anychip: cuDNN attention unavailable for %s (%s); using XLA's", tuple(q.shape), exc)
        return env.j2t_iso(jnp.swapaxes(out, 1, 2))

    return sdpa


def _batch_norm(env):
    """``F.batch_norm`` with torch's running-statistics update. torchax 0.0.14 computes the new
    running mean/var and drops them, so a BatchNorm model would silently keep its initial
    statistics; here they are written into the buffer tensors, which the step carries out."""
    import jax
    import jax.numpy as jnp

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        x, rm, rv, w, b = env.t2j_iso((input, running_mean, running_var, weight, bias))
        axes, shape = (0, *range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if training or rm is None:
            mean, var = xf.mean(axes), xf.var(axes)
            if training and rm is not None:
                n = x.size // x.shape[1]
                stat = lambda old, new: jax.lax.stop_gradient(momentum * new + (1 - momentum) * old).astype(old.dtype)  # noqa: E731
                running_mean.apply_jax_(lambda old: stat(old, mean))
                running_var.apply_jax_(lambda old: stat(old, var * n / max(n - 1, 1)))  # unbiased, as torch
        else:
            mean, var = rm, rv
        y = (xf - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + eps)
        if w is not None:
            y = y * w.reshape(shape)
        if b is not None:
            y = y + b.reshape(shape)
        return env.j2t_iso(y.astype(x.dtype))

    return batch_norm


def _promote_types(a, b):
    """``torch.promote_types`` works on dtypes, not tensors; torchax 0.0.14 has no lowering for
    it (anychip's reference kernels call it), so it runs natively, outside torchax's modes."""
    import torch
    from torch.utils._mode_utils import no_dispatch

    with no_dispatch(), torch._C.DisableTorchFunction():
        return torch.promote_types(a, b)


def _environment(platform: str, kernels: str, used: set | None = None):
    """A torchax environment of our own: op overrides here never leak into other code."""
    import torch
    from torchax import tensor

    env = tensor.Environment()
    env.override_op_definition(torch.nn.functional.batch_norm, _batch_norm(env))
    env.override_op_definition(torch.promote_types, _promote_types)
    if kernels != "reference" and os.environ.get("ANYCHIP_KERNELS") != "reference":
        # anychip's own kernel ops (anychip.nn layers) -> their JAX/Pallas implementations,
        # from the kernel table; torch's SDPA -> jax.nn.dot_product_attention, below.
        from anychip.kernels import install_jax_overrides

        install_jax_overrides(env, platform, include_sdpa=False)
        sdpa = _attention(env, platform, used if used is not None else set())
        env.override_op_definition(torch.nn.functional.scaled_dot_product_attention, sdpa)
        env.override_op_definition(torch.ops.aten.scaled_dot_product_attention, sdpa)
    return env


# -- the backend -------------------------------------------------------------------------------


class JaxBackend(Backend):
    """One JAX platform; the mesh spans every device of that platform (all hosts), or only
    ``devices`` when given (e.g. ``devices=jax.devices("cpu")[:1]`` for a single-device run)."""

    def __init__(self, availability: Availability, devices=None):
        super().__init__(availability)
        self.name = availability.name
        self.platform = self.name.partition(":")[2] or "cpu"
        self._devices = list(devices) if devices is not None else None
        self._mesh = None
        self._shardings = {}
        self._pending = None  # the last step's outputs, for synchronize()
        self._warned_replicated = False
        self._processes = None

    @property
    def devices(self) -> list:
        if self._devices is None:
            self.init_distributed()  # must come before JAX's first look at the devices
            import jax

            self._devices = jax.devices(self.platform)
        return self._devices

    @property
    def local_devices(self) -> list:
        import jax

        return [d for d in self.devices if d.process_index == jax.process_index()]

    @property
    def processes(self) -> int:
        """How many processes own devices of the mesh (more than 1 under ``jax.distributed``)."""
        if self._processes is None:
            self._processes = len({d.process_index for d in self.devices})
        return self._processes

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def devices_in_use(self) -> int:
        """Every local device: one process drives them all (and peak_flops() covers them all)."""
        return len(self.local_devices)

    @property
    def mesh(self):
        import jax
        import numpy as np

        if self._mesh is None:
            self._mesh = jax.sharding.Mesh(np.array(self.devices), (DATA_AXIS,))
        return self._mesh

    def sharding(self, spec=None):
        """A NamedSharding on the mesh; ``spec`` None means replicated. Cached: placing a batch
        happens every step."""
        import jax
        from jax.sharding import PartitionSpec

        spec = spec if spec is not None else PartitionSpec()
        if spec not in self._shardings:
            self._shardings[spec] = jax.sharding.NamedSharding(self.mesh, spec)
        return self._shardings[spec]

    # -- placement -----------------------------------------------------------------------------
    def place(self, model):
        """The model's parameters and buffers, by name, as JAX arrays replicated on the mesh."""
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {k: _global_array(_host_array(v), self.sharding()) for k, v in state.items()}

    def place_batch(self, batch, accumulate: int = 1, *, strict: bool = False, split_batches: bool = True):
        """The batch as JAX arrays split along dim 0 over the mesh (data parallel).

        With ``accumulate > 1`` every leaf becomes ``[accumulate, B / accumulate, ...]`` (micro-batch
        ``i`` is torch's ``chunk(accumulate)[i]``) split along dim 1, so each micro-batch is spread
        over all devices. A batch that does not split evenly is replicated with a warning, or
        refused when ``strict`` (``parallel="ddp"``/``"fsdp"`` asked for explicitly) or when the
        mesh spans several processes.

        Several processes: with ``split_batches`` every process passes the same global batch and
        places only the rows its devices own; without it each passes its own part, and global
        micro-batch ``i`` is the union of the processes' micro-batches ``i`` (as under torchrun).
        """
        import jax
        from jax.sharding import PartitionSpec as P

        parts = self.processes > 1 and not split_batches
        devices = len(self.local_devices) if parts else self.device_count
        dim = 1 if accumulate > 1 else 0

        def put(t):
            a = _host_array(t)
            if accumulate > 1:
                a = a.reshape(accumulate, a.shape[0] // accumulate, *a.shape[1:])
            if a.ndim <= dim:
                return _global_array(a, self.sharding())
            if a.shape[dim] % devices:
                if parts:
                    raise ValueError(
                        f"this process's (micro-)batch of {a.shape[dim]} samples does not split over its {devices} devices; "
                        f"with split_batches=False use a per-process batch size divisible by {devices * accumulate} "
                        "(local devices x accumulate)"
                    )
                if strict or self.processes > 1:
                    where = f" of {self.processes} processes" if self.processes > 1 else ""
                    raise ValueError(
                        f"a (micro-)batch of {a.shape[dim]} samples does not split over {devices} devices{where}; use a "
                        f"{'global ' * (self.processes > 1)}batch size divisible by {devices * accumulate} (devices x accumulate)"
                    )
                if not self._warned_replicated:
                    log.warning(
                        "anychip: %s: a (micro-)batch of %d does not split over %d devices; every device computes the "
                        "whole batch (use a multiple of %d for data parallelism)", self.name, a.shape[dim], devices, devices,
                    )
                    self._warned_replicated = True
                return jax.device_put(a, self.sharding())
            sharding = self.sharding(P(*([None] * dim), DATA_AXIS))
            if parts:
                return jax.make_array_from_process_local_data(sharding, a)
            return _global_array(a, sharding)

        return map_tensors(put, batch)

    # -- step ----------------------------------------------------------------------------------
    def make_engine(self, spec):
        return JaxEngine(self, spec)

    # -- device facts --------------------------------------------------------------------------
    def synchronize(self) -> None:
        import jax

        if self._pending is not None:
            jax.block_until_ready(self._pending)

    def memory_stats(self) -> MemoryStats:
        stats = self.local_devices[0].memory_stats()
        if not stats:  # XLA:CPU keeps no allocator statistics
            return process_rss_stats()
        return MemoryStats(stats.get("bytes_in_use"), stats.get("peak_bytes_in_use"), "device allocator")

    def reset_peak_memory(self) -> None:
        """JAX exposes no reset of the allocator's peak: the peak covers the whole process."""

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        """Peak of all local devices: this process drives every one of them."""
        from anychip.bench.peaks import peak_flops

        per_device = peak_flops(self.device_kind, dtype)
        return per_device * self.devices_in_use if per_device else None

    def init_distributed(self) -> None:
        """``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` is set (plus
        ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` where no cluster manager provides them),
        waiting at most ``ANYCHIP_DIST_TIMEOUT`` seconds for the other processes."""
        import jax

        from anychip import distributed

        address = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
        if not address or jax.distributed.is_initialized():
            return
        seconds = distributed.timeout_s()
        deadline = time.monotonic() + seconds
        kwargs = {"coordinator_address": address}
        for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            value = os.environ.get(var, "").strip()
            if value:
                if not value.isdigit():
                    raise distributed.DistributedError(f"{var}={value!r} must be a non-negative integer; fix the launcher")
                kwargs[arg] = int(value)
        if kwargs.get("process_id", 0) > 0:  # process 0 starts the coordinator itself
            _wait_for_coordinator(address, deadline)
        kwargs["initialization_timeout"] = max(1, math.ceil(deadline - time.monotonic()))
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as exc:  # noqa: BLE001 - connection failures come as several types
            given = ", ".join(f"{var}={os.environ.get(var, '(unset)')}" for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
            raise distributed.DistributedError(
                f"jax.distributed.initialize() could not join the run at JAX_COORDINATOR_ADDRESS={address} ({given}) "
                f"within {seconds:g} s ({distributed.TIMEOUT_ENV}): {distributed.first_line(exc)}"
            ) from exc


def _wait_for_coordinator(address: str, deadline: float) -> None:
    """Wait until the coordinator (``host:port``) accepts connections. XLA's client aborts the
    whole process (LOG(FATAL), which Python cannot catch) when the coordinator stays out of
    reach past the timeout; an unreachable one is reported here instead."""
    from anychip import distributed

    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        raise distributed.DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port")
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(1.0, left))):
                return
        except OSError as exc:
            if time.monotonic() + 0.2 >= deadline:
                raise distributed.DistributedError(
                    f"no JAX coordinator reachable at JAX_COORDINATOR_ADDRESS={address} within {distributed.timeout_s():g} s "
                    f"({distributed.TIMEOUT_ENV}): {distributed.first_line(exc)}; is process 0 (JAX_PROCESS_ID=0) running?"
                ) from exc
            time.sleep(0.2)


# -- the engine --------------------------------------------------------------------------------


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

    def __init__(self, backend: JaxBackend, spec):
        import jax
        import numpy as np
        import torch

        from anychip import distributed
        from anychip.step import call_loss

        self.backend, self.spec = backend, spec
        # Joins jax.distributed if launched so: before anything below (torchax's environment
        # makes a PRNG key) starts JAX, after which initialize() is refused.
        n = len(backend.devices)
        launched = distributed.launched_world_size()
        if launched is not None and launched > 1 and backend.processes != launched:
            # torchrun's variables mean nothing to JAX: each process would train alone on its mesh.
            raise distributed.DistributedError(
                f"torchrun started {launched} processes but {backend.name} sees {backend.processes}; jax backends join "
                "through jax.distributed: start one process per host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
                "and JAX_PROCESS_ID set instead of torchrun"
            )
        model = spec.model
        if spec.policy.param_dtype != "fp32":
            model = model.to(spec.policy.torch_dtype("param"))  # as TorchEngine: stored in bf16
        self._template = model  # the torch module engine.model returns, refreshed lazily
        self._trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.param_names = list(self._trainable)
        # Frozen parameters travel with the buffers: inputs of the step, never updated.
        self._frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self._constants = {**{n: p for n, p in model.named_parameters() if n in self._frozen}, **dict(model.named_buffers())}

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
        self.env = _environment(backend.platform, spec.kernels, self.kernels_used)
        self.optimizer = spec.optimizer.to_optax()
        self._param_sharding = {
            name: backend.sharding(_fsdp_spec(p.shape, n) if spec.parallel == "fsdp" else None)
            for name, p in self._trainable.items()
        }
        replicated = backend.sharding()
        params, buffers = self._host_state()
        key = np.asarray(jax.random.key_data(jax.random.key(torch.initial_seed() % (1 << 63))))
        if backend.processes > 1:
            # Process 0's weights and PRNG key everywhere, as DDP and FSDP do under torchrun:
            # processes that built the model differently still train one model.
            from jax.experimental import multihost_utils

            params, buffers, key = multihost_utils.broadcast_one_to_all((params, buffers, key))
        self._place_state(params, buffers)
        self._key = jax.jit(jax.random.wrap_key_data, out_shardings=replicated)(_global_array(key, replicated))
        self.opt_state = self._init_optimizer()
        out_shardings = (self._param_sharding, replicated, self._opt_sharding, replicated, replicated, replicated, replicated)
        # CPU supports donation too; the old state buffers are reused for the new state.
        self._jitted = jax.jit(self._step, donate_argnums=(0, 1, 2, 3), out_shardings=out_shardings)
        self._run = self._jitted if spec.compile is not False else self._step  # compile=False: eager, for debugging
        self._true = _global_array(np.asarray(True), replicated)
        self._pending = None  # (flag, step, loss, grad norm) of a step whose check is deferred
        self.updates = 0
        self.compiles = 0  # traced-and-compiled step programs (one per input signature)
        # The torch module lags behind the JAX parameters; across processes it may hold this
        # process's initial weights instead of process 0's.
        self._stale = backend.processes > 1

    # -- state ---------------------------------------------------------------------------------
    def _host_state(self) -> tuple[dict, dict]:
        """The torch module's trainable parameters and constants as host arrays, by name."""
        params = {n: _host_array(p) for n, p in self._trainable.items()}
        return params, {n: _host_array(b) for n, b in self._constants.items()}

    def _place_state(self, params: dict, buffers: dict) -> None:
        self.params = {n: _global_array(a, self._param_sharding[n]) for n, a in params.items()}
        self.buffers = {n: _global_array(a, self.backend.sharding()) for n, a in buffers.items()}

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

        from anychip.step import check_loss

        env, acc, policy = self.env, self.spec.accumulate, self.spec.policy
        stored = buffers
        if policy.compute_dtype == "bf16":
            # "bf16": float32 master weights cast for the forward (their gradients come back in
            # float32 through the cast); both bf16 policies feed float inputs in bf16. Buffers
            # keep their dtype, as under torch autocast.
            cast = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            params = {k: cast(v) for k, v in params.items()}
            buffers = {k: cast(v) if k in self._frozen else v for k, v in buffers.items()}
            micro = jax.tree.map(cast, micro)
        with env.override_property(prng=key):
            tparams, tbuffers, tbatch = env.j2t_iso((params, buffers, micro))
            state = {f"model.{k}": v for k, v in {**tparams, **tbuffers}.items()}
            with env:
                loss = torch.func.functional_call(self._loss_module, state, (tbatch,), tie_weights=True, strict=False)
                check_loss(loss)
            new_key = env.prng_key
        loss = env.t2j_iso(loss).astype(jnp.float32)
        # In-place buffer updates (e.g. BatchNorm statistics) land in the tensors we passed.
        new_buffers = {k: env.t2j_iso(tbuffers[k]).astype(stored[k].dtype) for k in stored}
        return (loss / acc if acc > 1 else loss), (loss, new_buffers, new_key)

    def _global_norm(self, grads):
        """torch.nn.utils.get_total_norm: the 2-norm of the per-parameter 2-norms, in parameter order."""
        import jax.numpy as jnp

        norms = [jnp.linalg.norm(grads[n].astype(jnp.float32).ravel()) for n in self.param_names]
        return jnp.linalg.norm(jnp.stack(norms)) if norms else jnp.zeros((), jnp.float32)

    def _step(self, params, buffers, opt_state, key, batch, previous_ok):
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
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
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

        from anychip import kernels

        with jax.default_matmul_precision(_matmul_precision()), kernels.defaults(self.backend.name, self.spec.kernels):
            yield

    def _call(self, placed, previous_ok):
        try:
            with self._tracing():
                return self._run(self.params, self.buffers, self.opt_state, self._key, placed, previous_ok)
        except Exception as exc:
            better = _translate(exc, self.backend.name)
            if better is None:
                raise
            raise better from exc

    def step(self, batch, tokens: int):
        """One update. With ``on_nonfinite="raise"`` the finiteness flag is read one step late,
        as TorchEngine does with fused optimizers: step N+1 is queued before the host waits
        for step N's flag, so the device never idles on the check. Step N's bad update was
        never applied, and N+1, fed N's flag, applies nothing either; the error names step N."""
        from anychip.step import StepOutput

        spec = self.spec
        placed = self.backend.place_batch(batch, spec.accumulate, strict=spec.parallel is not None, split_batches=spec.split_batches)
        if not spec.split_batches:
            tokens *= self.backend.processes  # each process passed its own part of the global batch
        lr = spec.optimizer.lr_at(self.updates)
        pending, self._pending = self._pending, None
        out = self._call(placed, pending[0] if pending is not None else self._true)
        self.params, self.buffers, self.opt_state, self._key, loss, norm, ok = out
        self._stale = True
        self.backend._pending = (loss, self.params)
        if spec.on_nonfinite == "raise":
            self._raise_if_nonfinite(pending)
            self._pending = (ok, self.updates + 1, loss, norm)
        elif spec.on_nonfinite == "skip" and not bool(ok):  # the one sync per step, as TorchEngine
            log.warning("anychip: step %d: loss %s, grad norm %s is not finite; update skipped", self.updates + 1, float(loss), float(norm))
            return StepOutput(self.updates, loss, norm, lr, tokens, skipped=True)
        self.updates += 1
        return StepOutput(self.updates, loss, norm, lr, tokens)

    def _raise_if_nonfinite(self, pending) -> None:
        """Read a deferred flag (waiting for that step only) and raise if it was not finite."""
        from anychip.step import NonFiniteLossError

        if pending is None or bool(pending[0]):
            return
        _, step, loss, norm = pending
        self.updates = step - 1
        raise NonFiniteLossError(
            f"step {step}: loss {float(loss)}, grad norm {float(norm)} is not finite; parameters were not "
            "updated (TrainStep(on_nonfinite='skip') skips such updates instead)"
        )

    def raise_pending_nonfinite(self) -> None:
        """Settle the last step's deferred check now (state_dict() and model do this too)."""
        pending, self._pending = self._pending, None
        self._raise_if_nonfinite(pending)

    def lower(self, batch):
        """The jitted step lowered for ``batch`` (``.compile().as_text()`` is the HLO)."""
        spec = self.spec
        placed = self.backend.place_batch(batch, spec.accumulate, strict=spec.parallel is not None, split_batches=spec.split_batches)
        compiles = self.compiles
        try:
            with self._tracing():
                return self._jitted.lower(self.params, self.buffers, self.opt_state, self._key, placed, self._true)
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
                    p.copy_(_to_torch(self.params[name]))
                for name, b in self._constants.items():
                    b.copy_(_to_torch(self.buffers[name]))
            self._stale = False
        return self._template

    def state_dict(self) -> dict:
        """The layout of :meth:`anychip.step.TorchEngine.state_dict`: CPU tensors by name.
        Multi-host: every process must call it (sharded arrays are gathered collectively)."""
        model = self.model
        slots = {
            slot: {} if self.updates == 0 else {n: _to_torch(getattr(self.opt_state, slot)[n]) for n in self.param_names}
            for slot in self.spec.optimizer.slots
        }
        return {
            "step": self.updates,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": {"slots": slots},
        }

    def load_state_dict(self, state: dict) -> None:
        """Every process passes the same whole state (as read from a checkpoint); each places the
        pieces its devices hold, so loading communicates nothing."""
        import numpy as np

        self._pending = None  # whatever the last step did is replaced
        self._template.load_state_dict(state["model"])  # torch checks names and shapes
        self._stale = False
        self._place_state(*self._host_state())
        n = int(state["step"])
        fresh = self._init_optimizer()
        given = state["optimizer"]["slots"]
        fields = {}
        for slot in self.spec.optimizer.slots:
            tree = dict(getattr(fresh, slot))
            for name, value in given.get(slot, {}).items():
                if name not in tree:
                    raise KeyError(f"optimizer slot {slot!r} names {name!r}, which is not a trainable parameter of this model")
                tree[name] = _global_array(_host_array(value).astype(tree[name].dtype), self._param_sharding[name])
            fields[slot] = tree
        count = _global_array(np.asarray(n, np.int32), self.backend.sharding())
        self.opt_state = fresh._replace(count=count, **fields)
        self.updates = n


def create(availability: Availability) -> JaxBackend:
    return JaxBackend(availability)
