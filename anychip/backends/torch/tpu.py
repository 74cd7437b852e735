"""`tpu`: TorchTPU, native PyTorch on Google TPUs (``torch-tpu`` 0.2.0, beta; torch 2.11 to 2.15).

What the package does, read from the torch-tpu 0.2.0 wheel:

* It registers a ``torch.backends`` entry point (``torch_tpu._loader:load``), so ``import torch``
  loads it unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; :func:`create` calls the same ``load()``,
  which works either way. ``load()`` renames PyTorch's PrivateUse1 device to ``tpu`` when it
  finds a TPU, and registers the ``tpu`` (and ``tpu_dist``) process-group backends.
* ``torch.compile(backend="tpu")`` compiles for the device; static shapes are its default, and
  stated here as ``dynamic=False`` so the step does not depend on its patched ``torch.compile``.
* bf16 is ``torch.autocast("tpu", dtype=torch.bfloat16)``, the engine's generic autocast.
* AdamW is ``torch_tpu._internal.optim.AdamW``: torch's AdamW update with its state allocated on
  the device up front, so compiled steps neither graph-break nor create state on the host.
* Synchronisation and memory go through ``torch.accelerator`` (TorchTPU's allocator reports its
  statistics there); from torch 2.13 on, ``torch.tpu.get_rng_state`` and several other
  ``torch.tpu`` functions refuse callers outside torch, so the RNG state is read from the
  device's default generator instead.
* Importing it also warns about tcmalloc on stderr and sets ``torch._dynamo.config.allow_rnn``.

PrivateUse1 holds one device type per process, and torchax (the ``jax:*`` backends) registers
``jax`` there: ``tpu`` and ``jax:*`` cannot run in the same process (``anychip parity`` and
``anychip bench`` run each backend in a process of its own). A torch-tpu that loads at
``import torch`` on a TPU takes the slot first; ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` leaves it
to whichever backend starts.

The probe is stdlib-only: package metadata and the TPU facts shared with ``jax:tpu``
(:mod:`anychip.backends.facts.tpu`). torch-tpu opens TPUs bound to vfio only. Not yet run on a
TPU: see examples/tpu.md.
"""

from __future__ import annotations

import inspect
import os
import re

from anychip.backends.contract import seed_from_torch
from anychip.backends.facts import host, tpu
from anychip.backends.registry import Availability
from anychip.backends.torch.base import NativeTorchBackend, Traits
from anychip.errors import BackendError, DistributedError

# torch-tpu 0.2.0's own requirements (its wheel's metadata): torch>=2.11.0,<=2.15.0, libtpu>=0.0.50.
TORCH_RANGE = ((2, 11, 0), (2, 15, 0))
INSTALL = "pip install torch-tpu==0.2.0 'libtpu>=0.0.50' (on a Cloud TPU VM, with torch 2.11 to 2.15)"
AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"
# What torch-tpu's launch helper (`python -m torch.tpu.distributed`) decides before workers start.
LAUNCH_ENV = "TORCH_TPU_SLICEBUILDER_ADDRESSES"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of '2.13.0+cpu' or '2.14.0.dev20260711'."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(p or 0) for p in found.groups()) if found else (0, 0, 0)


def probe(name: str = "tpu") -> Availability:
    versions = host.versions("torch", "torch-tpu", "libtpu")
    ttpu, torch_v = versions.get("torch-tpu"), versions.get("torch")

    def unavailable(reason: str, install: str = "") -> Availability:
        return Availability(name, False, reason, versions=versions, install=install)

    if ttpu is None:
        return unavailable("torch-tpu is not installed (TorchTPU, native PyTorch on TPU)", INSTALL)
    low, high = TORCH_RANGE
    if torch_v is None or not low <= _release(torch_v) <= high:
        have = f"torch {torch_v} is installed" if torch_v else "torch is not installed"
        return unavailable(f"torch-tpu {ttpu} needs torch 2.11 to 2.15, and {have}", "pip install 'torch>=2.11,<=2.15'")
    found = tpu.tpu_host()
    if not found.chips:
        seen = "Google PCI devices, none of them a TPU" if found.google else "no PCI device from Google, vendor 0x1ae0"
        return unavailable(f"torch-tpu {ttpu} is installed, but no TPU was found ({seen}); TorchTPU runs on a Cloud TPU VM")
    if not found.vfio:
        return unavailable(
            f"{found.chips} {found.kind} chip(s) found, none bound to vfio ({found.accel} /dev/accel node(s)); "
            f"torch-tpu {ttpu} opens TPUs through vfio only (/dev/vfio/<IOMMU group>): use backend 'jax:tpu' on this VM"
        )
    if "libtpu" not in versions:
        return Availability(name, False, "a TPU is present but libtpu is not installed", devices=found.vfio,
                            device_kind=found.kind, versions=versions, install="pip install 'libtpu>=0.0.50'")
    reason = f"TorchTPU {ttpu} (beta) on {found.vfio} {found.kind} device(s)"
    if os.environ.get(AUTOLOAD_ENV, "1") != "0" and host.importable("torchax"):
        reason += (f"; torch-tpu loads at every `import torch` here and takes PyTorch's PrivateUse1 device, which "
                   f"torchax (jax:*) needs too: set {AUTOLOAD_ENV}=0 to run jax:* in this environment")
    return Availability(name, True, reason, devices=found.vfio, device_kind=found.kind, versions=versions)


class TpuBackend(NativeTorchBackend):
    name = "tpu"
    traits = Traits(device_type="tpu", dist_backend="tpu", compile_backend="tpu", compile_by_default=True,
                    compile_options={"dynamic": False})

    def make_optimizer(self, spec, params):
        """As for the other torch devices, with TorchTPU's AdamW in place of torch's for an AdamW
        spec, built from the same parameter groups and settings."""
        import torch

        optimizer = super().make_optimizer(spec, params)
        if params is None or type(optimizer) is not torch.optim.AdamW:
            return optimizer
        from torch_tpu._internal.optim import AdamW

        accepted = inspect.signature(torch.optim.AdamW.__init__).parameters
        return AdamW(optimizer.param_groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})

    def _generator(self):
        import torch

        return torch.get_device_module("tpu").default_generators[torch.accelerator.current_device_index()]

    def rng_state(self) -> dict:
        return {"tpu": bytes(self._generator().get_state().numpy().tobytes())}

    def set_rng_state(self, state: dict) -> None:
        import torch

        raw = state.get("tpu")
        if raw is None:  # saved where this generator does not exist
            self._generator().manual_seed(seed_from_torch())
        else:
            self._generator().set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def init_distributed(self) -> None:
        """torchrun's process group on ``tpu``; every rank must agree on the TPU slice's addresses,
        which torch-tpu's launch helper decides in the parent before torchrun starts the workers."""
        from anychip.distributed import world_size

        if world_size() > 1 and LAUNCH_ENV not in os.environ:
            raise DistributedError(
                f"backend 'tpu' under torchrun needs ${LAUNCH_ENV}, set by torch-tpu's launch helper before torchrun "
                "starts: eval \"$(python -m torch.tpu.distributed)\" in the launching shell, then torchrun"
            )
        super().init_distributed()


def create(availability: Availability) -> TpuBackend:
    import torch

    taken = torch._C._get_privateuse1_backend_name()
    if taken not in ("privateuseone", "tpu"):
        raise BackendError(
            f"backend 'tpu' cannot start in this process: PyTorch's PrivateUse1 device is already {taken!r} "
            "(torchax registers 'jax' for the jax:* backends); run 'tpu' in a process of its own"
        )
    from torch_tpu import _loader

    _loader.load()  # what `import torch` ran already unless TORCH_DEVICE_BACKEND_AUTOLOAD=0; loads once
    if torch._C._get_privateuse1_backend_name() != "tpu":
        raise BackendError(f"torch-tpu registered no 'tpu' device: it found no vfio-bound TPU ({availability.reason})")
    return TpuBackend(availability)
