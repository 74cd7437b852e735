"""Which backend a kernel call runs on, and the defaults a TrainStep sets for its step.

The backend of a call: its ``backend=`` argument, else the one ``kernel_scope`` set, else the
input tensor's device. Backend names, their kernel families and their device types come from
the backend registry (built-in and plug-in), never from a list kept here.

The defaults are ``contextvars.ContextVar``s: two steps on two threads (or asyncio tasks) each
see their own. ``torch.compile`` cannot read a ContextVar (Dynamo: "does not know how to trace
method `get` of class `ContextVar`"), so while it compiles (in any thread), the ops read a process-wide copy of
the latest setting instead: a module global, which Dynamo guards on, so a compiled graph
re-selects when the setting changes. Two threads that run one compiled function under different
settings therefore share its choice; compile it once per setting if they must differ.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

import torch

from anychip.backends import registry
from anychip.kernels.table import FAMILIES, MODES, REFERENCE_FAMILY

ENV_VAR = "ANYCHIP_KERNELS"

_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("anychip_kernel_backend", default=None)
_kernels: contextvars.ContextVar[str] = contextvars.ContextVar("anychip_kernel_mode", default="auto")
# What compiled graphs read and guard on (see the module docstring).
_traced_backend: str | None = None
_traced_kernels: str = "auto"


# --- the registry, as the kernels need it --------------------------------------------------

# backend name -> kernel family, and torch device type -> backend name; built on first use and
# dropped when a registration is added or removed (plug-ins, tests).
_families: dict[str, str] | None = None
_device_backends: dict[str, str] | None = None


def forget() -> None:
    """Drop the cached view of the registry (called when it changes, and by ``reset``)."""
    global _families, _device_backends
    _families = _device_backends = None


registry.on_change(forget)


def _load() -> tuple[dict[str, str], dict[str, str]]:
    global _families, _device_backends
    if _families is None or _device_backends is None:
        regs = registry.registrations()  # highest priority first
        builtin = {r.name for r in registry.REGISTRY}
        devices: dict[str, str] = {}
        for reg in regs:
            if reg.device_type != "jax":  # torchax tensors: the JAX platform decides, below
                devices.setdefault(reg.device_type, reg.name)
        for reg in regs:  # a built-in backend named like its device type beats a plug-in sharing it
            if reg.name == reg.device_type and reg.name in builtin:
                devices[reg.device_type] = reg.name
        _families = {r.name: r.kernel_family for r in regs}
        _device_backends = devices
    return _families, _device_backends


def known_backends() -> tuple[str, ...]:
    """Every registered backend name, highest priority first."""
    return tuple(_load()[0])


def family_of(backend: str) -> str:
    """The kernel family (table column) ``backend`` uses; "reference" when it has none.

    A plug-in whose ``kernel_family`` names no column runs only the reference ops.
    ValueError for a name no registration knows.
    """
    families = _load()[0]
    if backend not in families:
        forget()  # a plug-in named in $ANYCHIP_PLUGINS since the last look
        families = _load()[0]
    if backend not in families:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(families)}")
    family = families[backend]
    return family if family in FAMILIES else REFERENCE_FAMILY


def _backend_for_device(kind: str) -> str:
    devices = _load()[1]
    if kind == "meta":  # shape-only tensors (fake tensors, meta init) compute nowhere: the cpu column
        kind = "cpu"
    if kind not in devices:
        forget()
        devices = _load()[1]
    if kind not in devices:
        raise ValueError(f"anychip kernels know no backend for device type {kind!r}; pass backend=")
    return devices[kind]


def _check_backend(name: str) -> str:
    family_of(name)
    return name


# Under torch.compile these look-ups are constants of the graph, so Dynamo does not trace the
# registry (plug-in loading, sorting, os.environ). This is what
# torch.compiler.assume_constant_result does; calling it would import torch._dynamo, and with
# it triton, when anychip is imported (2 s). A registration added after a compile needs a
# recompile (torch._dynamo.reset()).
_backend_for_device._dynamo_marked_constant = True  # type: ignore[attr-defined]
_check_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


# --- which backend a call runs on ------------------------------------------------------------


def backend_of(tensor: Any) -> str:
    """The backend name for a tensor's device type (anything with ``.device.type``)."""
    kind = tensor.device.type
    if kind == "jax":  # a torchax tensor: jax is imported already
        import jax

        return f"jax:{jax.default_backend()}"
    return _backend_for_device(kind)


def default_backend() -> str | None:
    """The backend ``kernel_scope`` set for this context (None: from the tensors' device)."""
    return _traced_backend if torch.compiler.is_compiling() else _backend.get()


def default_kernels() -> str:
    """The mode ``kernel_scope`` set for this context: "auto" or "reference"."""
    return _traced_kernels if torch.compiler.is_compiling() else _kernels.get()


def resolve_backend(backend: str | None, tensor: Any) -> str:
    """explicit ``backend`` > the scope's backend > the tensor's device."""
    if backend is not None:
        return _check_backend(backend)
    scoped = default_backend()
    if scoped is not None:
        return scoped
    return backend_of(tensor)


def mode(kernels: str | None) -> str:
    """The effective ``kernels=``: "auto"/None is "reference" when ANYCHIP_KERNELS or the
    scope says so, else "auto"; any other value is an explicit request."""
    if kernels is None or kernels == "auto":
        env = os.environ.get(ENV_VAR, "").strip() or "auto"
        if env not in MODES:
            raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {env!r}")
        return "reference" if "reference" in (env, default_kernels()) else "auto"
    if not isinstance(kernels, str):
        raise TypeError(f"kernels must be a str, got {type(kernels).__name__}")
    return kernels


# --- the defaults a TrainStep sets -----------------------------------------------------------


def _check_mode(kernels: str) -> None:
    if kernels not in MODES:
        raise ValueError(f"default kernels must be one of {MODES}, got {kernels!r}")


def set_default_backend(name: str | None) -> str | None:
    """Set this context's default backend (None: from the tensors' device); returns the previous."""
    global _traced_backend
    if name is not None:
        family_of(name)
    previous = _backend.get()
    _backend.set(name)
    _traced_backend = name
    return previous


def set_default_kernels(kernels: str) -> str:
    """Set this context's default mode, "auto" or "reference"; returns the previous one.

    "reference" turns every kernel off, like ANYCHIP_KERNELS=reference; an explicit
    implementation name on a call still wins.
    """
    global _traced_kernels
    _check_mode(kernels)
    previous = _kernels.get()
    _kernels.set(kernels)
    _traced_kernels = kernels
    return previous


@contextlib.contextmanager
def kernel_scope(backend: str | None = None, kernels: str = "auto") -> Iterator[None]:
    """Within the block, calls without ``backend=`` run as on ``backend`` and calls with
    kernels="auto" use ``kernels``, in this context only (thread, asyncio task)::

        with anychip.kernels.kernel_scope(backend="cuda", kernels="auto"):
            loss = loss_fn(model, batch)
    """
    global _traced_backend, _traced_kernels
    if backend is not None:
        family_of(backend)
    _check_mode(kernels)
    tokens = _backend.set(backend), _kernels.set(kernels)
    traced = _traced_backend, _traced_kernels
    _traced_backend, _traced_kernels = backend, kernels
    try:
        yield
    finally:
        _backend.reset(tokens[0])
        _kernels.reset(tokens[1])
        _traced_backend, _traced_kernels = traced


defaults = kernel_scope  # the earlier name of kernel_scope
