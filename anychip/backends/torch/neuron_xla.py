"""`neuron-xla`: the legacy Trainium stack, torch-neuronx 2.9 on torch_xla lazy tensors (trn1,
inf2), and through it any PJRT device; CI runs it with ``PJRT_DEVICE=CPU``.

How a training step maps onto lazy tensors (every point measured in docs/torch_xla_on_cpu.md):

* Nothing runs while the step is traced. ``mark_step`` is ``torch_xla.sync()`` at the very end
  of the step (after the optimizer update), so a step is one graph, compiled once per input
  signature and cached by hash. Step 1 has its own graph (the optimizer creates its state
  there); steps 2..N reuse one, and each later new shape adds one. No ``torch.compile``: the
  lazy tensor is the compiler. ``graph_stats()`` reads the compile/execution counters.
* AdamW gets its lr as a 0-d *device* tensor with ``capturable=True``. A Python float lr is
  uploaded as graph data too, but torch_xla inlines 0 and 1 as constants and merges equal
  scalars into one graph input, so a schedule that passes through such a value (e.g. ``1 -
  lr*wd == beta2``) recompiles at unpredictable steps; a device lr never changes the graph.
  SGD keeps a float lr: torch's SGD turns a tensor lr back into a Python number
  (``_to_scalar`` / ``alpha=-lr``), a device read that would execute an extra graph every
  step, and SGD's float lr only changes the graph when it is exactly 0 or 1 or equal to
  another scalar of the graph, such as its momentum (bounded: once per such value).
* The non-finite check cannot read the flag before the sync (that executes the graph traced
  so far: a second graph per step). ``lazy_tensors = True`` makes :class:`TorchEngine` mask
  the update on the device instead (old parameters and optimizer state where the step is
  not finite) and read the flag after the sync: ``on_nonfinite="raise"`` raises at the next
  step (or at ``state_dict()``), ``"skip"`` waits for the step and reports ``skipped=True``.
  Either way the non-finite update was *not* applied.
* bf16 is ``torch.autocast("xla", dtype=torch.bfloat16)``. Not ``torch_xla.amp.autocast``: it
  only enables itself on TPU/Neuron hardware and then fails on a CPU device. torch_xla's op list
  lacks SDPA and the RNN cells; ``xla_autocast`` adds torch's rule for them.
* ``torch_xla.device()`` is called in :func:`create`: the autograd engine sizes its device
  queues at the first backward of the process, so a CPU backward that ran before it breaks
  every later XLA backward; create() checks for that and says so.
* ``place`` re-ties shared parameters, which ``model.to(xla)`` would split in two.
* On Trainium, create() selects the NEURON PJRT client and sets ``--auto-cast=none`` for
  neuronx-cc (unless ``NEURON_CC_FLAGS`` already has an ``--auto-cast``): the compiler would
  otherwise run fp32 matmuls in bf16 behind the precision policy's back. Not yet run on
  hardware: see examples/trainium.md.

Probing is stdlib-only (package metadata, ``PJRT_DEVICE``, the Neuron host probe shared with
``neuron``). ``PJRT_DEVICE`` set to anything but NEURON makes the backend available on that
PJRT client, and auto-detect then prefers it to ``cpu``: setting it is torch_xla's own explicit
device choice.
"""

from __future__ import annotations

import contextlib
import os

from anychip.backends.contract import MemoryStats, seed_from_torch
from anychip.backends.facts import host, nvidia, peaks, tpu
from anychip.backends.facts import neuron
from anychip.backends.registry import Availability
from anychip.backends.torch import xla_autocast, xla_batch_norm
from anychip.backends.torch.base import NativeTorchBackend, Traits
from anychip.errors import BackendError

INSTALL = (
    "pip install torch-neuronx==2.9.* --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "(on a trn1 instance; Neuron SDK <= 2.29, the last with PyTorch/XLA training; brings torch 2.9 and torch-xla 2.9)"
)
TEST_HINT = "set PJRT_DEVICE=CPU to run it on the CPU for testing"


def _major_minor(version: str) -> tuple[int, ...]:
    return neuron.version_tuple(version)[:2]


def _pjrt_device_count(kind: str) -> int:
    """Devices of a PJRT client, where knowable without starting it (0: known once it runs)."""
    if kind == "CPU":
        count = os.environ.get("CPU_NUM_DEVICES", "").strip()
        return int(count) if count.isdigit() and int(count) > 0 else 1
    if kind == "TPU":
        return tpu.tpu_chips()[0]
    if kind in ("CUDA", "GPU"):
        return nvidia.nvidia_host().gpus
    return 0


def probe(name: str = "neuron-xla") -> Availability:
    versions = host.versions("torch", "torch-xla", "torch-neuronx", "neuronx-cc")
    torch_v, txla, tnx = versions.get("torch"), versions.get("torch-xla"), versions.get("torch-neuronx")
    kind = neuron.lineage(tnx)
    installed = (
        f"torch-neuronx {tnx} is the {'native' if kind == 'native' else 'XLA'} lineage, which serves {neuron.SERVES[kind]}"
        if kind
        else "torch-neuronx is not installed"
    )

    def unavailable(reason: str, install: str = "") -> Availability:
        return Availability(name, False, reason, versions=versions, install=install)

    if kind == "native":
        if txla is None:
            return unavailable(
                f"{installed}: use backend 'neuron'; neuron-xla is the torch_xla lineage, which serves "
                f"{neuron.SERVES['xla']}, and needs torch-neuronx 2.9 in its own virtualenv", INSTALL,
            )
        return unavailable(
            f"both Neuron lineages are installed: {installed} and torch-xla {txla} is the legacy one; "
            "they register conflicting devices and need different torch versions: uninstall torch-xla to use "
            "'neuron', or use a separate virtualenv with torch-neuronx 2.9 for 'neuron-xla'"
        )
    if txla is None:
        return unavailable(
            f"torch-xla is not installed ({installed}); neuron-xla is the torch_xla lineage of torch-neuronx, which "
            f"serves {neuron.SERVES['xla']}; without Trainium, pip install torch==2.9.0 torch_xla==2.9.0 and {TEST_HINT}",
            INSTALL,
        )
    if torch_v is None:
        wanted = ".".join(map(str, _major_minor(txla)))
        return unavailable(f"torch-xla {txla} is installed but torch is not", f"pip install 'torch=={wanted}.*'")
    if _major_minor(torch_v) != _major_minor(txla):
        want = ".".join(map(str, _major_minor(txla)))
        return unavailable(
            f"ABI mismatch: torch {torch_v} with torch-xla {txla}; torch_xla's C++ extension loads only with the "
            f"torch major.minor it was built for: pip install 'torch=={want}.*' (or a torch-xla built for torch "
            f"{'.'.join(map(str, _major_minor(torch_v)))}), best in its own virtualenv",
            f"pip install 'torch=={want}.*'",
        )
    pjrt = os.environ.get("PJRT_DEVICE", "").strip().upper()
    if pjrt and pjrt != "NEURON":
        count = _pjrt_device_count(pjrt)
        return Availability(
            name, True, f"PJRT_DEVICE={pjrt}: torch_xla {txla} on the PJRT {pjrt} client "
            f"({'device count known once it starts' if count == 0 else f'{count} device(s)'}); {installed}",
            devices=count, device_kind=f"PJRT {pjrt}", versions=versions,
        )
    if kind is None:
        told = "PJRT_DEVICE=NEURON is set but" if pjrt else "PJRT_DEVICE is not set and"
        return unavailable(
            f"torch-xla {txla} is installed but {told} torch-neuronx (the XLA lineage, serves {neuron.SERVES['xla']}) "
            f"is not installed: {TEST_HINT}, or install torch-neuronx 2.9 on a trn1 instance", INSTALL,
        )
    found = neuron.neuron_host()
    if found.devices == 0:
        return unavailable(f"no Neuron devices on this machine ({found.note}); {installed}; {TEST_HINT}")
    older = "" if _major_minor(tnx) == neuron.XLA_LAST else f"; torch-neuronx {tnx} predates 2.9, the release followed here"
    return Availability(
        name, True, f"{installed}; {found.note}; {neuron.XLA_FROZEN}{older}", devices=found.cores,
        device_kind=f"{found.chip or 'trainium'} NeuronCore", versions=versions,
    )


class NeuronXlaBackend(NativeTorchBackend):
    name = "neuron-xla"
    # device_type "xla" is also the autocast device type: torch.autocast("xla", dtype=torch.bfloat16);
    # no compile backend: lazy tensors, torch_xla.sync() compiles the step.
    traits = Traits(device_type="xla", dist_backend="xla", compile_backend=None, lazy_tensors=True)

    def __init__(self, availability: Availability, device):
        super().__init__(availability)
        self._device = device

    @property
    def device(self):
        return self._device

    @property
    def devices_in_use(self) -> int:
        """NeuronCores this process drives on Trainium (as for `neuron`); one PJRT device elsewhere."""
        return neuron.cores_in_use() if self.device_kind.endswith("NeuronCore") else 1

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        """As for `neuron`: chip peak / cores per chip x cores in use; "PJRT CPU" and other
        non-Neuron kinds have no datasheet peak and give None."""
        return peaks.neuron_core_flops(self.device_kind, dtype, self.devices_in_use)

    def rng_state(self) -> dict:
        """torch_xla's running seed: after a ``torch_xla.sync()`` (every step ends with one) it is
        the whole generator state, so setting it back continues the stream exactly."""
        import torch_xla.core.xla_model as xm

        return {"xla": int(xm.get_rng_state(self.device))}

    def set_rng_state(self, state: dict) -> None:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(int(state["xla"]) if "xla" in state else seed_from_torch(), self.device)

    def make_engine(self, spec):
        """The torch engine, with the XLA generator seeded from torch's first: torch.manual_seed
        does not reach torch_xla's generator, which would otherwise run on from wherever the
        process left it (one seed, two different runs; two seeds, the same dropout masks)."""
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed_from_torch(), self.device)
        return super().make_engine(spec)

    def place(self, model):
        """``model.to(device)``, keeping tied parameters tied. Moving to XLA gives every module a
        new Parameter (a CPU tensor's storage cannot be swapped for an XLA one in place), so a
        weight shared by two modules, like GPT's token embedding and LM head, would silently
        become two that train apart (measured: 28 parameters on CPU, 29 after .to(xla))."""
        owners: dict[int, list] = {}
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    owners.setdefault(id(param), []).append((module, name))
        model = model.to(self.device)
        for (first, first_name), *others in owners.values():
            for module, name in others:
                module._parameters[name] = first._parameters[first_name]
        xla_batch_norm.install(model)  # torch_xla's running_var update is the biased one
        return model

    def compile(self, fn):
        raise ValueError(
            "neuron-xla does not use torch.compile: torch_xla's lazy tensors already compile the whole step "
            "into one graph at torch_xla.sync(); leave TrainStep(compile=...) unset or pass compile=False"
        )

    def make_optimizer(self, spec, params):
        import torch

        if params is None:  # the user's own optimizer (its parameters already on the device)
            if "capturable" in spec.defaults:
                # Step counts and bias corrections on the device: masked on a non-finite step
                # like the slots, and no host value baked into the graph. The scheduled floats
                # (lr, momentum, betas) are scalars torch_xla passes as device data: no new graph.
                spec.defaults["capturable"] = True
                for group in spec.param_groups:
                    group["capturable"] = True
            return spec
        optimizer = spec.to_torch(params)
        if isinstance(optimizer, torch.optim.Adam):  # AdamW is one
            # The lr becomes graph data (the engine copies each scheduled value into it) and
            # capturable=True keeps AdamW's step count and bias corrections on the device.
            # Set after construction: AdamW.__init__ checks `0 <= lr`, which on a device
            # tensor would compile and run a graph of its own.
            optimizer.defaults["capturable"] = True
            for group in optimizer.param_groups:
                group["capturable"] = True
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        return optimizer

    def mark_step(self) -> None:
        import torch_xla

        torch_xla.sync()  # asynchronous: the host goes on tracing while the device runs

    def graph_stats(self) -> dict[str, int]:
        """Graphs compiled (``compiles``) and run (``executions``) in this process so far, from
        ``torch_xla.debug.metrics``. Executions are asynchronous: ``synchronize()`` first."""
        import torch_xla.debug.metrics as met

        return {
            "compiles": met.counter_value("UncachedCompile") or 0,
            "cache_hits": met.counter_value("CachedCompile") or 0,
            "executions": met.counter_value("ExecuteComputation") or 0,
        }

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()

    def memory_stats(self) -> MemoryStats:
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        try:
            info = xm.get_memory_info(self.device)
        except RuntimeError as exc:  # the CPU client: "UNIMPLEMENTED: GetAllocatorStats is not supported"
            if "UNIMPLEMENTED" not in str(exc) and "not supported" not in str(exc):
                raise
            return MemoryStats(None, None, f"not reported by the PJRT {xr.device_type()} client")
        return MemoryStats(info.get("bytes_used"), info.get("peak_bytes_used"), "PJRT device allocator")

    def reset_peak_memory(self) -> None:
        """PJRT has no call to reset the allocator's peak; the figure covers the whole process."""

    def init_distributed(self) -> None:
        """``init_process_group("xla", init_method="xla://")``: rank and world size come from the
        PJRT runtime (torchrun, or torch_xla.launch). A single process gets a free port for the
        TCPStore that ``xla://`` opens even then, unless MASTER_PORT is set: the default 12355
        makes a second concurrent single-process run fail with EADDRINUSE."""
        import torch.distributed as dist
        import torch_xla.runtime as xr

        if dist.is_initialized():
            return
        alone = xr.world_size() == 1 and "MASTER_PORT" not in os.environ
        with _environ({"MASTER_PORT": "0"} if alone else {}):
            dist.init_process_group("xla", init_method="xla://")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_autograd_sees(device) -> None:
    """A backward on the device, traced and dropped (no graph runs), to fail here rather than in
    the first training step when a CPU backward ran before torch_xla.device() (docs/torch_xla_on_cpu.md)."""
    import torch

    probe_tensor = torch.zeros((), device=device, requires_grad=True)
    try:
        (probe_tensor * 2.0).backward()
    except RuntimeError as exc:
        if "device_ready_queues_" not in str(exc):
            raise
        raise BackendError(
            "backend 'neuron-xla' cannot train in this process: a CPU backward ran before torch_xla.device(), "
            "and torch's autograd engine then knows no XLA device; select neuron-xla (ac.backend('neuron-xla')) "
            "before any backward, or run it in its own process"
        ) from None


def create(availability: Availability) -> NeuronXlaBackend:
    if availability.device_kind.endswith("NeuronCore"):
        os.environ.setdefault("PJRT_DEVICE", "NEURON")
        # neuronx-cc casts fp32 matmuls to bf16 unless told otherwise; here the precision policy
        # decides (bf16 = autocast), so "fp32" stays fp32 unless the user chose an --auto-cast.
        flags = os.environ.get("NEURON_CC_FLAGS", "")
        if "--auto-cast" not in flags:
            os.environ["NEURON_CC_FLAGS"] = f"{flags} --auto-cast=none".strip()
        import torch_neuronx  # noqa: F401 - registers the Neuron PJRT plugin
    import torch_xla

    device = torch_xla.device()
    _check_autograd_sees(device)
    xla_autocast.install()  # SDPA and RNN cells in bf16 under autocast, as on cpu and cuda
    return NeuronXlaBackend(availability, device)
