"""The JAX backend object: one platform's devices, the mesh over them, batch placement, and
``jax.distributed`` for several processes.

Parallelism: a ``jax.sharding.Mesh`` with one axis, ``data``, over every device JAX sees.
The batch is split along it and the parameters replicated (data parallel; XLA inserts the
gradient all-reduce), or with ``parallel="fsdp"`` parameters and optimizer state are split
along their largest dimension divisible by the device count. Either way ``loss_fn`` sees the
global batch, so losses equal a single-device run.

Several processes (hosts): ``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` is
set, before JAX first looks at its devices; the mesh then spans every process's devices. As
under torchrun, ``step(batch)`` gets the global batch on every process and each process places
only the rows its devices own (``split_batches=True``), or each process passes its own part and
the global batch is their union (``split_batches=False``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time

from anychip import distributed
from anychip.backends.contract import Backend, MemoryStats, process_rss_stats
from anychip.backends.jax.convert import DATA_AXIS, global_array, host_array
from anychip.backends.registry import Availability
from anychip.batch import map_tensors
from anychip.errors import DistributedError

log = logging.getLogger("anychip")


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
        return {k: global_array(host_array(v), self.sharding()) for k, v in state.items()}

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
            a = host_array(t)
            if accumulate > 1:
                a = a.reshape(accumulate, a.shape[0] // accumulate, *a.shape[1:])
            if a.ndim <= dim:
                return global_array(a, self.sharding())
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
            return global_array(a, sharding)

        return map_tensors(put, batch)

    # -- step ----------------------------------------------------------------------------------
    def make_engine(self, spec):
        from anychip.backends.jax.engine import JaxEngine

        return JaxEngine(self, spec)

    # -- device facts --------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every computation on this process's arrays (engines wait for their own
        step through ``engine.synchronize()``, which is cheaper)."""
        import jax

        for array in jax.live_arrays():
            array.block_until_ready()

    def memory_stats(self) -> MemoryStats:
        stats = self.local_devices[0].memory_stats()
        if not stats:  # XLA:CPU keeps no allocator statistics
            return process_rss_stats()
        return MemoryStats(stats.get("bytes_in_use"), stats.get("peak_bytes_in_use"), "device allocator")

    def reset_peak_memory(self) -> None:
        """JAX exposes no reset of the allocator's peak: the peak covers the whole process."""

    def init_distributed(self) -> None:
        """``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` is set (plus
        ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` where no cluster manager provides them),
        waiting at most ``ANYCHIP_DIST_TIMEOUT`` seconds for the other processes."""
        import jax

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
                    raise DistributedError(f"{var}={value!r} must be a non-negative integer; fix the launcher")
                kwargs[arg] = int(value)
        if kwargs.get("process_id", 0) > 0:  # process 0 starts the coordinator itself
            _wait_for_coordinator(address, deadline)
        kwargs["initialization_timeout"] = max(1, math.ceil(deadline - time.monotonic()))
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as exc:  # noqa: BLE001 - connection failures come as several types
            given = ", ".join(f"{var}={os.environ.get(var, '(unset)')}" for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
            raise DistributedError(
                f"jax.distributed.initialize() could not join the run at JAX_COORDINATOR_ADDRESS={address} ({given}) "
                f"within {seconds:g} s ({distributed.TIMEOUT_ENV}): {distributed.first_line(exc)}"
            ) from exc


def _wait_for_coordinator(address: str, deadline: float) -> None:
    """Wait until the coordinator (``host:port``) accepts connections. XLA's client aborts the
    whole process (LOG(FATAL), which Python cannot catch) when the coordinator stays out of
    reach past the timeout; an unreachable one is reported here instead."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port")
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(1.0, left))):
                return
        except OSError as exc:
            if time.monotonic() + 0.2 >= deadline:
                raise DistributedError(
                    f"no JAX coordinator reachable at JAX_COORDINATOR_ADDRESS={address} within {distributed.timeout_s():g} s "
                    f"({distributed.TIMEOUT_ENV}): {distributed.first_line(exc)}; is process 0 (JAX_PROCESS_ID=0) running?"
                ) from exc
            time.sleep(0.2)
