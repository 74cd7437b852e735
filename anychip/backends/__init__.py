"""Backend registry and the one selection policy.

Every backend is one module with a stdlib-only ``probe()`` and a backend class; this file
lists them as data (:data:`REGISTRY`) and decides which one runs:

1. an explicit name (``ac.backend("cuda")``) fails loudly when that backend is unavailable,
   with the reason and the install command;
2. ``ANYCHIP_BACKEND`` is treated exactly like an explicit name;
3. otherwise auto-detection walks the registrations with ``auto=True`` by priority and
   quietly skips the unavailable ones, logging why.

Probes never import torch, jax or a vendor SDK (they read ``/dev``, ``/sys``, package
metadata and ``neuron-ls``), so ``anychip devices`` is fast and never crashes on a broken
install. The heavy import happens when the chosen backend is first used.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
from types import MappingProxyType
from typing import Callable, Mapping

log = logging.getLogger("anychip")

ENV_VAR = "ANYCHIP_BACKEND"
PLUGINS_ENV = "ANYCHIP_PLUGINS"


class BackendError(RuntimeError):
    """A backend was asked for by name and cannot be used; the message says why and how to fix it."""


class UnknownBackendError(BackendError, ValueError):
    """A backend name that no registration knows."""


@dataclasses.dataclass(frozen=True)
class Availability:
    """What a probe found, without importing any SDK."""

    name: str
    available: bool
    reason: str
    devices: int = 0
    device_kind: str = ""
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    install: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", MappingProxyType(dict(self.versions)))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"versions": dict(self.versions)}


LAUNCHERS = ("torchrun", "jax.distributed")


@dataclasses.dataclass(frozen=True)
class Registration:
    """One backend, as data: how to probe it, how to build it, and where it sits in auto-detect."""

    name: str
    module: str  # "anychip.backends.cuda": provides probe(name) and create(availability)
    priority: int  # higher is tried first by auto-detect
    auto: bool = True  # False: only ever used when asked for by name
    summary: str = ""
    # How several processes are started: "torchrun" (one process per device), or
    # "jax.distributed" (one process per host drives all its devices through a mesh).
    launcher: str = "torchrun"

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"backend name must be non-empty lowercase, got {self.name!r}")
        if not isinstance(self.priority, int):
            raise TypeError(f"priority of {self.name!r} must be an int")
        if not self.module or any(not part.isidentifier() for part in self.module.split(".")):
            raise ValueError(f"module of {self.name!r} must be an import path, got {self.module!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher of {self.name!r} must be one of {LAUNCHERS}, got {self.launcher!r}")

    def probe(self) -> Availability:
        # A probe that raises is a bug in the probe, but it must never break `anychip devices`.
        try:
            return importlib.import_module(self.module).probe(self.name)
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed
            return Availability(self.name, False, f"probe failed: {type(exc).__name__}: {exc}")


# The table. Priorities: a dedicated accelerator beats the CPU; CUDA and Neuron torch stacks
# run the model natively, so JAX on GPU/CPU is only used when asked for; a TPU is only
# reachable through JAX, so jax:tpu is auto-detected.
REGISTRY: tuple[Registration, ...] = (
    Registration("cuda", "anychip.backends.cuda", 100, summary="PyTorch on NVIDIA GPUs"),
    Registration("jax:tpu", "anychip.backends.jax", 95, summary="torch model traced to JAX via torchax, on TPU", launcher="jax.distributed"),
    Registration("neuron", "anychip.backends.neuron", 90, summary="TorchNeuron (native torch-neuronx 2.13+), trn2/trn3"),
    Registration("neuron-xla", "anychip.backends.neuron_xla", 80, summary="torch_xla lazy tensors (torch-neuronx 2.9), trn1 or any PJRT device"),
    Registration("jax:gpu", "anychip.backends.jax", 40, auto=False, summary="torch model traced to JAX via torchax, on GPU", launcher="jax.distributed"),
    Registration("jax:cpu", "anychip.backends.jax", 20, auto=False, summary="torch model traced to JAX via torchax, on CPU", launcher="jax.distributed"),
    Registration("cpu", "anychip.backends.cpu", 10, summary="PyTorch on the CPU"),
)

# Documented, deterministic aliases (STYLE 7): plain "jax" means JAX's own default platform
# order, TPU then GPU then CPU, resolved by probing in that order.
ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({"jax": ("jax:tpu", "jax:gpu", "jax:cpu")})

_extra: list[Registration] = []  # test-only registrations (never auto-selected, see register())
_cache: dict[str, object] = {}


def registrations() -> tuple[Registration, ...]:
    return tuple(sorted((*REGISTRY, *_extra), key=lambda r: -r.priority))


def register(reg: Registration) -> None:
    """Add a registration (tests, plug-ins). It is never auto-selected unless ``auto=True``."""
    if any(r.name == reg.name for r in registrations()):
        raise ValueError(f"a backend named {reg.name!r} is already registered")
    _extra.append(reg)
    reset()


def unregister(name: str) -> None:
    _extra[:] = [r for r in _extra if r.name != name]
    reset()


def load_plugins() -> list[str]:
    """Import the modules named in ``$ANYCHIP_PLUGINS`` (comma-separated), which register
    backends (or workloads) from other packages or tests. Returns the ``sys.path`` roots they
    were found under, so a worker process can import them too. A bad name is a ValueError."""
    import os.path

    roots = []
    for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
        if not name:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"cannot import plug-in {name!r} named in ${PLUGINS_ENV}: {exc}") from exc
        path = getattr(module, "__file__", None)
        if path:
            root = os.path.dirname(os.path.abspath(path))
            for _ in range(name.count(".") + (os.path.basename(path) == "__init__.py")):
                root = os.path.dirname(root)
            roots.append(root)
    return roots


def reset() -> None:
    """Forget cached selections and backend objects (tests, or after changing the environment)."""
    _cache.clear()


def _registration(name: str) -> Registration:
    known = {r.name: r for r in registrations()}
    if name in known:
        return known[name]
    names = sorted(known) + sorted(ALIASES)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownBackendError(f"unknown backend {name!r}.{hint} Known backends: {', '.join(names)}.")


def backends() -> list[Availability]:
    """One :class:`Availability` per known backend, in auto-detect priority order."""
    return [r.probe() for r in registrations()]


def backend(name: str | None = None):
    """The backend to run on: explicit ``name`` > ``$ANYCHIP_BACKEND`` > auto-detect.

    Cached per resolved name; :func:`reset` clears the cache.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend name must be a string such as 'cpu' or 'jax:tpu', got {type(name).__name__}")
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        origin = f"${ENV_VAR}"
    else:
        origin = "backend()"
    if name is None:
        return _auto()
    name = name.strip().lower()
    if name in ALIASES:
        return _first_available(name, ALIASES[name], origin)
    reg = _registration(name)
    if name not in _cache:
        avail = reg.probe()
        if not avail.available:
            fix = f" Install: {avail.install}" if avail.install else ""
            raise BackendError(f"backend {name!r} (asked for by {origin}) is unavailable: {avail.reason}.{fix}")
        _cache[name] = importlib.import_module(reg.module).create(avail)
    return _cache[name]


def _first_available(alias: str, names: tuple[str, ...], origin: str):
    reasons = []
    for n in names:
        avail = _registration(n).probe()
        if avail.available:
            return backend(n)
        reasons.append(f"{n}: {avail.reason}")
    raise BackendError(f"no backend behind {alias!r} (asked for by {origin}) is available: " + "; ".join(reasons))


def _auto():
    if "<auto>" in _cache:
        return _cache["<auto>"]
    for reg in registrations():
        if not reg.auto:
            continue
        avail = reg.probe()
        if avail.available:
            log.info("anychip: auto-selected backend %r (%s)", reg.name, avail.reason)
            chosen = backend(reg.name)
            _cache["<auto>"] = chosen
            return chosen
        log.info("anychip: skipping backend %r: %s", reg.name, avail.reason)
    raise BackendError("no backend is available, not even 'cpu': is torch installed? pip install torch")


Probe = Callable[[str], Availability]

__all__ = [
    "ALIASES",
    "Availability",
    "BackendError",
    "ENV_VAR",
    "REGISTRY",
    "Registration",
    "UnknownBackendError",
    "backend",
    "backends",
    "load_plugins",
    "register",
    "registrations",
    "reset",
    "unregister",
]
