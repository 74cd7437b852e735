"""Backends as data: what a probe found (:class:`Availability`), every fact about a backend
(:class:`Registration`), the built-in table, and plug-ins.

Stdlib only (and the errors leaf). A backend is one module providing ``probe(name) -> Availability`` and
``create(availability) -> Backend``, plus one row here (or one ``register()`` call from a
plug-in named in ``$ANYCHIP_PLUGINS``). Everything else in anychip reads the facts it needs
(device type, kernel family, engine family, launcher, host CPU, peak FLOP/s) from the row, so
nothing else has to learn a new backend's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from types import MappingProxyType
from typing import Mapping

from anychip.errors import InvalidArgumentError

PLUGINS_ENV = "ANYCHIP_PLUGINS"
LAUNCHERS = ("torchrun", "jax.distributed")
ENGINES = ("torch", "jax")


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


@dataclasses.dataclass(frozen=True)
class Registration:
    """One backend, as data.

    name:          what users pass (``ac.backend("cuda")``), lowercase.
    module:        import path of the module with ``probe(name)`` and ``create(availability)``.
    priority:      auto-detect tries higher first.
    auto:          False: used only when asked for by name.
    device_type:   torch device type of the tensors the step computes on ("cuda", "xla",
                   "jax" for torchax tensors); kernels map a tensor to its backend by it.
    kernel_family: the column of the kernel table this backend uses (a built-in backend's
                   name, e.g. "cpu" or "cuda"), or "reference" for the reference ops only.
    engine:        "torch" (a torch.nn.Module stepped eagerly or compiled) or "jax" (traced
                   into one jitted JAX step).
    launcher:      how several processes start: "torchrun" (one per device) or
                   "jax.distributed" (one per host, driving all its devices through a mesh).
    host_cpu:      the step computes on the host CPU (benchmarks then default to fp32).
    peak_tflops:   dense peak TFLOP/s of one device by precision, for devices the facts table
                   does not know (a plug-in's own chip); the table wins where it knows one.
    """

    name: str
    module: str
    priority: int
    auto: bool = True
    summary: str = ""
    device_type: str = "cpu"
    kernel_family: str = ""
    engine: str = "torch"
    launcher: str = "torchrun"
    host_cpu: bool = False
    peak_tflops: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"backend name must be non-empty lowercase, got {self.name!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TypeError(f"priority of {self.name!r} must be an int")
        if not self.module or any(not part.isidentifier() for part in self.module.split(".")):
            raise ValueError(f"module of {self.name!r} must be an import path, got {self.module!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher of {self.name!r} must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine of {self.name!r} must be one of {ENGINES}, got {self.engine!r}")
        if not self.device_type or not self.device_type.isidentifier():
            raise ValueError(f"device_type of {self.name!r} must be a torch device type such as 'cuda', got {self.device_type!r}")
        for dtype, tflops in dict(self.peak_tflops).items():
            if not (isinstance(tflops, (int, float)) and not isinstance(tflops, bool) and tflops > 0):
                raise ValueError(f"peak_tflops[{dtype!r}] of {self.name!r} must be a number > 0, got {tflops!r}")
        object.__setattr__(self, "kernel_family", self.kernel_family or self.name)
        object.__setattr__(self, "peak_tflops", MappingProxyType(dict(self.peak_tflops)))

    def probe(self) -> Availability:
        # A probe that raises is a bug in the probe, but it must never break `anychip devices`.
        try:
            return importlib.import_module(self.module).probe(self.name)
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed
            return Availability(self.name, False, f"probe failed: {type(exc).__name__}: {exc}")

    def create(self, availability: Availability):
        return importlib.import_module(self.module).create(availability)


# The built-in table. Priorities: a dedicated accelerator beats the CPU; CUDA and Neuron torch
# stacks run the model natively, so JAX on GPU/CPU is only used when asked for; jax:tpu is
# auto-detected because a TPU is reached through JAX.
_JAX = dict(module="anychip.backends.jax", device_type="jax", engine="jax", launcher="jax.distributed")
REGISTRY: tuple[Registration, ...] = (
    Registration("cuda", "anychip.backends.torch.cuda", 100, summary="PyTorch on NVIDIA GPUs", device_type="cuda"),
    Registration("jax:tpu", priority=95, summary="torch model traced to JAX via torchax, on TPU", **_JAX),
    # Below jax:tpu: on a TPU with both installed the tested JAX route wins; TorchTPU is beta.
    Registration("tpu", "anychip.backends.torch.tpu", 93, summary="TorchTPU: native PyTorch on TPU (torch-tpu, beta)",
                 device_type="tpu", kernel_family="reference"),
    Registration(
        "neuron", "anychip.backends.torch.neuron", 90, summary="TorchNeuron (native torch-neuronx 2.13 / 2.14), trn2/trn3",
        device_type="neuron",
    ),
    Registration(
        "neuron-xla", "anychip.backends.torch.neuron_xla", 80,
        summary="torch_xla lazy tensors (torch-neuronx 2.9, frozen), trn1 or any PJRT device",
        device_type="xla",
    ),
    Registration("jax:gpu", priority=40, auto=False, summary="torch model traced to JAX via torchax, on GPU", **_JAX),
    Registration("jax:cpu", priority=20, auto=False, summary="torch model traced to JAX via torchax, on CPU", host_cpu=True, **_JAX),
    Registration("cpu", "anychip.backends.torch.cpu", 10, summary="PyTorch on the CPU", host_cpu=True),
)

# Documented, deterministic aliases: plain "jax" means JAX's own default platform order, TPU
# then GPU then CPU, resolved by probing in that order.
ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({"jax": ("jax:tpu", "jax:gpu", "jax:cpu")})

_extra: list[Registration] = []  # registered by plug-ins and tests
_plugins: dict[str, tuple[str, str]] = {}  # plug-in entry -> (its sys.path root, its module name)
_listeners: list = []  # called after the table changes (selection caches)


def on_change(callback) -> None:
    """Call ``callback()`` whenever a registration is added or removed."""
    _listeners.append(callback)


def registrations() -> tuple[Registration, ...]:
    """Every registration, built-in and plug-in, highest priority first."""
    load_plugins()
    return tuple(sorted((*REGISTRY, *_extra), key=lambda r: -r.priority))


def find(name: str) -> Registration | None:
    return next((r for r in registrations() if r.name == name), None)


def register(reg: Registration) -> None:
    """Add a backend (plug-ins, tests). It takes part in auto-detect when ``reg.auto`` is True."""
    if not isinstance(reg, Registration):
        raise TypeError(f"register() takes a Registration, got {type(reg).__name__}")
    if reg in _extra:
        return  # the same plug-in imported again (a test that dropped its module): nothing new
    if any(r.name == reg.name for r in (*REGISTRY, *_extra)):
        raise ValueError(f"a backend named {reg.name!r} is already registered")
    _extra.append(reg)
    for callback in _listeners:
        callback()


def unregister(name: str) -> None:
    _extra[:] = [r for r in _extra if r.name != name]
    for callback in _listeners:
        callback()


def _import_plugin(entry: str):
    """A module by import path, or a ``.py`` file by path (imported under its file name)."""
    if entry.endswith(".py") or os.sep in entry:
        path = os.path.abspath(entry)
        name = os.path.splitext(os.path.basename(path))[0]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or not os.path.isfile(path):
            raise ImportError(f"no such file: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(entry)


def load_plugins() -> list[str]:
    """Import the plug-ins named in ``$ANYCHIP_PLUGINS`` (comma-separated module paths or
    ``.py`` files), once each; they register backends or workloads. Returns the ``sys.path``
    roots they came from, so a worker process can import them too. A plug-in that cannot be
    imported, or raises while it is, is an InvalidArgumentError (a ValueError) naming it."""
    for entry in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
        # Imported once; again only when its module was dropped from sys.modules since.
        if not entry or (entry in _plugins and _plugins[entry][1] in sys.modules):
            continue
        _plugins[entry] = ("", "")  # before the import: a plug-in that calls registrations() must not recurse
        try:
            module = _import_plugin(entry)
        except ImportError as exc:
            del _plugins[entry]
            raise InvalidArgumentError(f"cannot import plug-in {entry!r} named in ${PLUGINS_ENV}: {exc}") from exc
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plug-in's own failure (sys.exit included) is reported, naming it
            del _plugins[entry]
            raise InvalidArgumentError(
                f"plug-in {entry!r} named in ${PLUGINS_ENV} failed on import: {type(exc).__name__}: {exc}; "
                f"fix it or remove it from ${PLUGINS_ENV}"
            ) from exc
        path, root = getattr(module, "__file__", None), ""
        if path:
            root = os.path.dirname(os.path.abspath(path))
            if not (entry.endswith(".py") or os.sep in entry):
                for _ in range(entry.count(".") + (os.path.basename(path) == "__init__.py")):
                    root = os.path.dirname(root)
        _plugins[entry] = (root, module.__name__)
    active = {e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(",")}
    return [root for entry, (root, _) in _plugins.items() if entry in active and root]
