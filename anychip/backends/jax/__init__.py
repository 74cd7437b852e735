"""`jax:tpu`, `jax:gpu`, `jax:cpu`: the user's unchanged torch model, traced into one jitted JAX step.

How a step runs:

* torchax turns the model's parameters and buffers into JAX arrays and lowers every torch op
  the model calls to ``jax.numpy``; the forward + ``loss_fn`` become a pure JAX function of
  the parameters, differentiated by ``jax.value_and_grad`` (not ``torch.func`` under
  ``jax_jit``: LayerNorm's backward breaks there on torch 2.13);
* the optimizer spec is materialised as optax (:meth:`anychip.optim.AdamW.to_optax`), with
  the torch math operation for operation, and the schedule evaluated inside the step;
* gradient accumulation, global-norm clipping (``torch.nn.utils.clip_grad_norm_``'s formula),
  the non-finite check and the update are all one ``jax.jit`` with donated state buffers.

Modules: this one probes (stdlib only) and creates; ``backend`` holds the mesh, placement and
``jax.distributed``; ``engine`` the jitted step; ``convert`` moves arrays between torch and
JAX; ``diagnose`` turns tracing failures into errors that name the user's line. The torchax
op overrides come from :mod:`anychip.kernels.torchax`. jax, torchax and optax are imported
when the backend is first used.
"""

from __future__ import annotations

import os
import re

from anychip.backends.facts import host, nvidia, tpu
from anychip.backends.registry import Availability

INSTALL = "pip install 'anychip[jax]'"
INSTALL_TPU = "pip install 'jax[tpu]'"
INSTALL_GPU = "pip install 'jax[cuda12]'"
REQUIRED = ("jax", "jaxlib", "torchax", "optax")
CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")


def _forced_host_devices() -> int:
    """CPU 'devices' requested through XLA_FLAGS (--xla_force_host_platform_device_count=N)."""
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else 1


def probe(name: str = "jax:cpu") -> Availability:
    platform = name.partition(":")[2] or "cpu"
    versions = host.versions(*REQUIRED, "libtpu", "libtpu-nightly", *CUDA_PLUGINS)
    missing = [m for m in REQUIRED if not host.importable(m)]
    if missing:
        return Availability(name, False, f"{', '.join(missing)} not installed", versions=versions, install=INSTALL)
    if platform == "tpu":
        chips, kind, google = tpu.tpu_chips()
        if not chips:
            why = "Google PCI devices found, none of them a TPU" if google else "no TPU found (no PCI device from Google, vendor 0x1ae0)"
            return Availability(name, False, why, versions=versions)
        if not (host.importable("libtpu") or "libtpu" in versions or "libtpu-nightly" in versions):
            return Availability(
                name, False, "a TPU seems present but libtpu is not installed", devices=chips,
                device_kind=kind, versions=versions, install=INSTALL_TPU,
            )
        return Availability(name, True, f"{chips} TPU chip(s)", devices=chips, device_kind=kind, versions=versions)
    if platform == "gpu":
        if not any(p in versions for p in CUDA_PLUGINS):
            return Availability(name, False, "no CUDA plugin for jax installed", versions=versions, install=INSTALL_GPU)
        gpus = nvidia.nvidia_host()
        if not gpus.gpus:
            return Availability(name, False, "no NVIDIA GPU found (no /dev/nvidia0)", versions=versions)
        return Availability(name, True, f"{gpus.gpus} NVIDIA GPU(s)", devices=gpus.gpus, device_kind=gpus.kind, versions=versions)
    if platform == "cpu":
        n = _forced_host_devices()
        return Availability(name, True, f"XLA on the host CPU ({n} device{'s' * (n > 1)})", devices=n, device_kind="cpu", versions=versions)
    return Availability(name, False, f"unknown JAX platform {platform!r}; use jax:tpu, jax:gpu or jax:cpu")


def create(availability: Availability):
    from anychip.backends.jax.backend import JaxBackend

    return JaxBackend(availability)
