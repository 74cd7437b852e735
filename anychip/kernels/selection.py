"""Selection: which implementation of an op runs on a backend, read from the kernel table.

    explicit implementation name  >  "reference" (argument, ANYCHIP_KERNELS or the scope)  >  auto

* ``kernels="auto"`` (the default): the highest-priority implementation that runs on the
  backend's kernel family, else the reference.
* ``kernels="reference"``, ``ANYCHIP_KERNELS=reference`` or ``kernel_scope(kernels="reference")``
  turn every kernel off: ops run the plain PyTorch reference.
* ``kernels="<name>"`` asks for that implementation; it wins over the environment variable and
  raises ``KernelUnavailableError`` with a one-line reason when it cannot run on the backend.

Probing uses ``importlib.util.find_spec`` only, so importing the kernels never imports triton or
jax; an implementation module is imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

from anychip.errors import KernelUnavailableError
from anychip.kernels import scope, table

log = logging.getLogger(__name__)

# pip distribution for each module an implementation may require (for the error message).
_INSTALL = {"triton": "pip install triton", "jax": "pip install jax"}


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """One row of ``available()``: can ``op``/``name`` run on ``backend``, and does auto pick it."""

    op: str
    name: str
    backend: str
    available: bool
    reason: str  # why not; or, when it runs only on request, why auto skips it; else ""
    selected: bool  # what auto (under the current ANYCHIP_KERNELS) picks on this backend
    note: str  # what the implementation is (Impl.note)


@functools.lru_cache(maxsize=None)
def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def reset() -> None:
    """Forget cached probes and the cached view of the backend registry (for tests)."""
    _module_available.cache_clear()
    scope.forget()


def _check_op(op: str) -> None:
    if op not in table.OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(table.OPS)}")


def why_not(impl: table.Impl, backend: str) -> str:
    """The one-line reason ``impl`` cannot run on ``backend``, or "" when it can."""
    family = scope.family_of(backend)
    missing = [m for m in impl.requires if not _module_available(m)]
    if missing:
        how = "; ".join(_INSTALL.get(m, f"pip install {m}") for m in missing)
        return f"needs {', '.join(missing)}, which is not installed ({how})"
    if impl.name == "reference" or family in impl.backends:
        return ""
    where = backend if family == backend else f"{backend} (kernel family {family})"
    if family in impl.interpreted:
        if impl.interpreter_env and os.environ.get(impl.interpreter_env) != "1":
            return f"runs on {where} only in the interpreter: set {impl.interpreter_env}=1"
        return ""
    native = ", ".join(impl.backends) if impl.backends else "no backend natively"
    return f"runs on {native}, not on {where}"


def select(op: str, backend: str, kernels: str | None = "auto") -> table.Impl:
    """The implementation of ``op`` to run on ``backend`` (a registered backend name).

    kernels: "auto" (best that runs, honouring ANYCHIP_KERNELS and the scope), "reference", or
    an implementation name, which must run here or ``KernelUnavailableError`` is raised.
    """
    _check_op(op)
    family = scope.family_of(backend)
    chosen = scope.mode(kernels)
    reference = table.IMPLS[(op, "reference")]
    if chosen == "reference":
        return reference
    if chosen == "auto":
        best = reference
        for impl in table.TABLE:
            if impl.op != op or impl.experimental or impl.explicit_only or family not in impl.backends:
                continue
            reason = why_not(impl, backend)
            if reason:
                log.debug("anychip kernel %s/%s skipped on %s: %s", op, impl.name, backend, reason)
            elif impl.priority > best.priority:
                best = impl
        return best
    impl = table.IMPLS.get((op, chosen))
    if impl is None:
        names = ", ".join(i.name for i in table.TABLE if i.op == op)
        raise ValueError(f"{op} has no implementation {chosen!r}; known: auto, {names}")
    reason = why_not(impl, backend)
    if reason:
        raise KernelUnavailableError(f"kernel {op}/{chosen} cannot run on backend {backend}: {reason}")
    return impl


def _selected_name(op: str, backend: str, kernels: str | None) -> str:
    return select(op, backend, kernels).name


# Under torch.compile the choice is a constant of the graph, so Dynamo does not trace the
# probing (find_spec, os.environ, an lru_cache it warns about); see scope.py for why this
# attribute and not torch.compiler.assume_constant_result. test_kernel_compile.py checks there
# is no graph break. Changing ANYCHIP_KERNELS after a compile needs torch._dynamo.reset().
_selected_name._dynamo_marked_constant = True  # type: ignore[attr-defined]

# Set once torchax overrides were assembled (anychip.kernels.torchax): without them a JAX
# implementation fails deep inside torchax with an unrelated message.
_jax_overrides_made = False


def mark_jax_overrides_made() -> None:
    global _jax_overrides_made
    _jax_overrides_made = True


def select_for_call(op: str, backend: str, kernels: str | None) -> table.Impl:
    """``select`` as the public op entries call it: safe inside ``torch.compile`` tracing."""
    if kernels in (None, "auto") and scope.default_kernels() == "reference":
        kernels = "reference"  # read here, outside the constant, so a compiled graph guards on it
    impl = table.IMPLS[(op, _selected_name(op, backend, kernels))]
    if impl.framework == "jax" and not _jax_overrides_made:
        raise KernelUnavailableError(
            f"kernel {op}/{impl.name} runs through torchax: call "
            "anychip.kernels.install_jax_overrides(env, platform) first, or use kernels='reference'"
        )
    return impl


def _row(op: str, impl: table.Impl, backend: str, chosen: str) -> KernelStatus:
    reason = why_not(impl, backend)
    family = scope.family_of(backend)
    if not reason and impl.experimental:
        note = "experimental: explicit request only"
    elif not reason and family in impl.interpreted:
        note = "interpreter only: explicit request only"
    elif not reason and impl.explicit_only:
        note = f"explicit request only: {impl.explicit_only}"
    else:
        note = reason
    return KernelStatus(op, impl.name, backend, not reason, note, impl.name == chosen, impl.note)


def available(backend: str | None = None) -> list[KernelStatus]:
    """Every (op, implementation) on ``backend`` (default: every registered backend): runs or why not."""
    backends = scope.known_backends() if backend is None else (backend,)
    rows = []
    for be in backends:
        scope.family_of(be)
        for op in table.OPS:
            chosen = select(op, be, "auto").name
            rows.extend(_row(op, impl, be, chosen) for impl in table.TABLE if impl.op == op)
    return rows


def load(impl: table.Impl) -> ModuleType:
    """Import the implementation module (lazily: triton/jax load on first use)."""
    return importlib.import_module(impl.module)


def torch_module(op: str, impl_name: str) -> ModuleType:
    """The torch implementation module behind an ``anychip::<op>`` custom-op call."""
    impl = table.IMPLS.get((op, impl_name))
    if impl is None:
        raise ValueError(f"{op} has no implementation {impl_name!r}")
    if impl.framework != "torch":
        raise RuntimeError(
            f"kernel {op}/{impl_name} is JAX code and runs only through torchax: call "
            "anychip.kernels.install_jax_overrides(env, platform) on the torchax environment"
        )
    return load(impl)
