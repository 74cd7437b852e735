"""Kernel dispatch: which implementation of each op runs on which backend (issue 5, DESIGN.md Kernels).

Every op lives in ``anychip/kernels/<op>/``: ``reference.py`` is plain PyTorch and *is* the
specification; every other file there is one implementation with the same public names
(``triton.py`` for CUDA, ``jax.py`` / ``pallas.py`` for the JAX backend, ``torch_chunked.py``,
``sdpa.py``). ``TABLE`` below says, as data, where each implementation runs (STYLE 2, the
frozen ``ImplInfo`` of Liger-Kernel); ``select`` is the one policy that reads it:

    explicit implementation name  >  "reference" (argument, ANYCHIP_KERNELS or
    set_default_kernels)  >  auto

* ``kernels="auto"`` (the default) means "pick for me": the highest-priority implementation
  that runs on the backend, else the reference. ``ANYCHIP_KERNELS=reference``,
  ``set_default_kernels("reference")`` or ``kernels="reference"`` turn every kernel off: ops
  then run the plain PyTorch reference.
* ``kernels="<name>"`` (e.g. ``"triton"``) asks for that implementation explicitly; it wins
  over the environment variable and raises ``KernelUnavailableError`` with a one-line reason
  when it cannot run on the backend.

The backend of a call: its ``backend=`` argument, else ``set_default_backend`` (or the
``defaults(backend=..., kernels=...)`` context manager a TrainStep wraps its step in), else
the input tensor's device.

Backend names are the strings of DESIGN.md: ``cpu cuda neuron neuron-xla jax:cpu jax:gpu
jax:tpu``. Probing uses ``importlib.util.find_spec`` only: importing this package never imports
triton or jax (STYLE 3); an implementation module is imported on first use.

The JAX backend runs the same torch model through torchax. Each op is a
``torch.library.custom_op`` in namespace ``anychip``; ``jax_overrides(platform)`` maps those ops
to their JAX implementations and ``install_jax_overrides(env, platform)`` registers them in a
torchax environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = (
    "cpu",
    "cuda",
    "neuron",
    "neuron-xla",
    "jax:cpu",
    "jax:gpu",
    "jax:tpu",
)
JAX_BACKENDS: tuple[str, ...] = ("jax:cpu", "jax:gpu", "jax:tpu")
OPS: tuple[str, ...] = ("rms_norm", "linear_cross_entropy", "swiglu", "rotary", "attention")
ENV_VAR = "ANYCHIP_KERNELS"
MODES: tuple[str, ...] = ("auto", "reference")
FRAMEWORKS: tuple[str, ...] = ("torch", "jax")

# pip distribution for each module an implementation may require (for the error message).
_INSTALL = {"triton": "pip install triton", "jax": "pip install jax"}


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel implementation cannot run on the requested backend."""


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of one op: where it runs and what it needs. Pure data.

    op, name:     the op and the implementation; the code is ``anychip.kernels.<op>.<name>``.
    framework:    "torch" (takes torch tensors) or "jax" (takes jax arrays; reached from torch
                  through torchax, see ``jax_overrides``).
    backends:     backends where it runs natively; auto may pick it there.
    requires:     top-level modules it imports, probed with ``find_spec``.
    priority:     auto picks the highest priority that runs; the reference has 0.
    interpreted:  backends where it runs only in an interpreter (Triton's TRITON_INTERPRET=1,
                  Pallas' interpret=True): for tests, so only an explicit request gets it.
    interpreter_env: environment variable that must be "1" for ``interpreted`` ("" = none).
    experimental: never picked by auto (not verified on hardware); explicit requests only,
                  like JAX's ``BackendRegistration(experimental=True)``.
    explicit_only: why auto does not pick it although it runs (e.g. it saves memory but was
                  measured slower than the compiled reference); "" = auto may pick it.
    direct:       plain torch code that the public entry calls as is and torch autograd
                  differentiates; otherwise the op goes through its ``anychip::<op>`` custom op.
    note:         one line for ``available()``.
    """

    op: str
    name: str
    framework: str
    backends: tuple[str, ...]
    requires: tuple[str, ...] = ()
    priority: int = 0
    interpreted: tuple[str, ...] = ()
    interpreter_env: str = ""
    explicit_only: str = ""
    experimental: bool = False
    direct: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        where = f"Impl({self.op!r}, {self.name!r})"
        if self.op not in OPS:
            raise ValueError(f"{where}: unknown op; known: {', '.join(OPS)}")
        if not self.name.isidentifier():
            raise ValueError(f"{where}: name must be a Python identifier (it names the file)")
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"{where}: framework must be one of {FRAMEWORKS}")
        for field in ("backends", "requires", "interpreted"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{where}: {field} must be a tuple of str, got {value!r}")
        if not self.backends and not self.interpreted:
            raise ValueError(f"{where}: runs nowhere (no backends, no interpreted backends)")
        unknown = set(self.backends + self.interpreted) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{where}: unknown backends {sorted(unknown)}; known: {BACKENDS}")
        if set(self.backends) & set(self.interpreted):
            raise ValueError(f"{where}: a backend is both native and interpreted")
        if self.name == "reference":
            if self.framework != "torch" or not self.direct or set(self.backends) != set(BACKENDS):
                raise ValueError(f"{where}: the reference is direct torch code on every backend")
            if self.priority != 0 or self.requires or self.experimental:
                raise ValueError(f"{where}: the reference has priority 0 and no requirements")
        elif self.priority <= 0:
            raise ValueError(f"{where}: a kernel needs priority > 0 to beat the reference")
        runs_on = self.backends + self.interpreted
        if self.framework == "jax" and not set(runs_on) <= set(JAX_BACKENDS):
            raise ValueError(f"{where}: a jax implementation runs on jax:* backends only")
        if self.framework == "torch" and self.name != "reference" and set(runs_on) & set(JAX_BACKENDS):
            raise ValueError(f"{where}: a torch kernel cannot run on jax:* (use a jax implementation)")
        if self.direct and self.framework != "torch":
            raise ValueError(f"{where}: only torch code can be called directly")

    @property
    def module(self) -> str:
        return f"anychip.kernels.{self.op}.{self.name}"


def _reference(op: str) -> Impl:
    return Impl(op, "reference", "torch", BACKENDS, direct=True, note="plain PyTorch; the spec")


def _triton(op: str, note: str) -> Impl:
    return Impl(
        op, "triton", "torch", ("cuda",), requires=("triton",), priority=20,
        interpreted=("cpu",), interpreter_env="TRITON_INTERPRET", note=note,
    )


def _jax(op: str, note: str) -> Impl:
    return Impl(op, "jax", "jax", JAX_BACKENDS, requires=("jax",), priority=10, note=note)


# The dispatch table. Order inside an op does not matter: priority decides.
TABLE: tuple[Impl, ...] = (
    _reference("rms_norm"),
    # Alone 1.09x the compiled reference, but inside a compiled llama-small step Triton
    # rms_norm + rotary made the step 0.92x (H100, RESULTS.md): an opaque custom op stops
    # inductor fusing the norm with its neighbours.
    dataclasses.replace(
        _triton("rms_norm", "row-blocked Triton forward/backward, dw reduced per program"),
        explicit_only="llama-small step 0.92x with it vs inductor fusing the reference (H100)",
    ),
    _jax("rms_norm", "jnp; XLA fuses it"),
    Impl(
        "rms_norm", "pallas", "jax", ("jax:tpu",), requires=("jax",), priority=20,
        interpreted=("jax:cpu",), experimental=True,
        note="Pallas (Mosaic) kernel with custom_vjp; not verified on a TPU, explicit only",
    ),
    _reference("linear_cross_entropy"),
    # Both chunked heads cut the head's peak memory ~35x (9.4 GB -> 0.27 GB at GPT-2 small,
    # 16 x 1024) but ran 6-10x slower than the inductor-compiled unfused head on an H100
    # (benchmarks/RESULTS.md): worth asking for when memory is the limit, not a default.
    Impl(
        "linear_cross_entropy", "torch_chunked", "torch", ("cpu", "cuda"), priority=10,
        note="token chunks, logits never whole; backward recomputes each chunk",
        explicit_only="saves memory but measured ~10x slower than the compiled unfused head (H100)",
    ),
    dataclasses.replace(
        _triton("linear_cross_entropy", "token chunks; cuBLAS matmul + Triton softmax/grad in place"),
        explicit_only="saves memory but measured ~6x slower than the compiled unfused head (H100)",
    ),
    dataclasses.replace(
        _jax("linear_cross_entropy", "token chunks under lax.map/scan with custom_vjp"),
        # GPT-2 small bf16 on jax:gpu went from 435k to 290k tokens/s with it (H100, RESULTS.md)
        explicit_only="saves memory but cost a third of jax:gpu's GPT-2-small throughput (H100)",
    ),
    _reference("swiglu"),
    dataclasses.replace(
        _triton("swiglu", "elementwise Triton forward/backward"),
        # inductor fuses the reference's silu*up into its neighbours; the opaque op cannot be
        explicit_only="measured 0.63x the inductor-compiled reference on an H100",
    ),
    _jax("swiglu", "jnp; XLA fuses it"),
    _reference("rotary"),
    dataclasses.replace(
        _triton("rotary", "Triton, strided q/k, rotate-half"),
        explicit_only="llama-small step 0.92x with it vs inductor fusing the reference (H100)",
    ),
    _jax("rotary", "jnp; XLA fuses it"),
    _reference("attention"),
    Impl(
        "attention", "sdpa", "torch", ("cpu", "cuda"), priority=10, direct=True,
        note="torch scaled_dot_product_attention (flash / memory-efficient)",
    ),
    _jax("attention", "jax.nn.dot_product_attention; cudnn on GPU for bf16/fp16"),
)

IMPLS: dict[tuple[str, str], Impl] = {(i.op, i.name): i for i in TABLE}
if len(IMPLS) != len(TABLE):
    raise RuntimeError("anychip.kernels.TABLE lists an (op, name) twice")


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


# --- probing -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def reset() -> None:
    """Forget cached probes (tests that fake a missing module call this)."""
    _module_available.cache_clear()


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def why_not(impl: Impl, backend: str) -> str:
    """The one-line reason ``impl`` cannot run on ``backend``, or "" when it can."""
    _check_backend(backend)
    missing = [m for m in impl.requires if not _module_available(m)]
    if missing:
        how = "; ".join(_INSTALL.get(m, f"pip install {m}") for m in missing)
        return f"needs {', '.join(missing)}, which is not installed ({how})"
    if backend in impl.backends:
        return ""
    if backend in impl.interpreted:
        if impl.interpreter_env and os.environ.get(impl.interpreter_env) != "1":
            return f"runs on {backend} only in the interpreter: set {impl.interpreter_env}=1"
        return ""
    native = ", ".join(impl.backends) if impl.backends else "no backend natively"
    return f"runs on {native}, not on {backend}"


# --- defaults a TrainStep sets ------------------------------------------------------------

_default_backend: str | None = None
_default_kernels: str = "auto"


def set_default_backend(name: str | None) -> str | None:
    """Set the backend the ops and ``anychip.nn`` modules assume; returns the previous one.

    None (the initial value) means: infer it from the input tensor's device on each call
    (cpu, cuda, neuron, xla -> neuron-xla, jax -> jax:<jax.default_backend()>).
    """
    global _default_backend
    if name is not None:
        _check_backend(name)
    previous, _default_backend = _default_backend, name
    return previous


def default_backend() -> str | None:
    return _default_backend


def set_default_kernels(mode: str) -> str:
    """"auto" (initial) or "reference": the mode of every call that says kernels="auto".

    "reference" turns every kernel off, like ANYCHIP_KERNELS=reference; an explicit
    implementation name on a call still wins. Returns the previous mode.
    """
    global _default_kernels
    if mode not in MODES:
        raise ValueError(f"default kernels must be one of {MODES}, got {mode!r}")
    previous, _default_kernels = _default_kernels, mode
    return previous


@contextlib.contextmanager
def defaults(backend: str | None = None, kernels: str = "auto") -> Iterator[None]:
    """Within the block, calls without ``backend=`` run as on ``backend`` and calls with
    kernels="auto" use ``kernels``. TrainStep wraps its step in this, so two steps on
    different backends in one process do not see each other's setting:

        with anychip.kernels.defaults(backend="cuda", kernels="auto"):
            loss = loss_fn(model, batch)
    """
    previous_backend, previous_kernels = set_default_backend(backend), set_default_kernels(kernels)
    try:
        yield
    finally:
        set_default_backend(previous_backend)
        set_default_kernels(previous_kernels)


def _mode(kernels: str | None) -> str:
    """Resolve the mode: "auto"/None is "reference" when ANYCHIP_KERNELS or
    set_default_kernels says so, else "auto"; anything else is an explicit request."""
    if kernels is None or kernels == "auto":
        env = os.environ.get(ENV_VAR, "").strip() or "auto"
        if env not in MODES:
            raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {env!r}")
        return "reference" if "reference" in (env, _default_kernels) else "auto"
    if not isinstance(kernels, str):
        raise TypeError(f"kernels must be a str, got {type(kernels).__name__}")
    return kernels


def select(op: str, backend: str, kernels: str | None = "auto") -> Impl:
    """The implementation of ``op`` to run on ``backend``.

    kernels: "auto" (best that runs, honouring ANYCHIP_KERNELS), "reference", or an
    implementation name, which must run here or ``KernelUnavailableError`` is raised.
    """
    _check_op(op)
    _check_backend(backend)
    mode = _mode(kernels)
    if mode == "reference":
        return IMPLS[(op, "reference")]
    if mode == "auto":
        best = IMPLS[(op, "reference")]
        for impl in TABLE:
            if impl.op != op or impl.experimental or impl.explicit_only or backend not in impl.backends:
                continue
            reason = why_not(impl, backend)
            if reason:
                log.debug("anychip kernel %s/%s skipped on %s: %s", op, impl.name, backend, reason)
            elif impl.priority > best.priority:
                best = impl
        return best
    impl = IMPLS.get((op, mode))
    if impl is None:
        names = ", ".join(i.name for i in TABLE if i.op == op)
        raise ValueError(f"{op} has no implementation {mode!r}; known: auto, {names}")
    reason = why_not(impl, backend)
    if reason:
        raise KernelUnavailableError(f"kernel {op}/{mode} cannot run on backend {backend}: {reason}")
    return impl


def _selected_name(op: str, backend: str, kernels: str | None) -> str:
    return select(op, backend, kernels).name


# Under torch.compile the choice is a constant of the graph, so Dynamo does not trace the
# probing (find_spec, os.environ, an lru_cache it warns about). This is what
# torch.compiler.assume_constant_result does (same attribute from torch 2.0 to 2.13); calling
# it would import torch._dynamo, and with it triton, when anychip is imported (2 s).
# tests/kernels/test_kernel_compile.py checks there is no graph break.
# Changing ANYCHIP_KERNELS after a compile needs a recompile (torch._dynamo.reset()).
_selected_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


def select_for_call(op: str, backend: str, kernels: str | None) -> Impl:
    """``select`` as the public op entries call it: safe inside ``torch.compile`` tracing."""
    if kernels in (None, "auto") and _default_kernels == "reference":
        kernels = "reference"  # read here, outside the constant, so a compiled graph guards on it
    impl = IMPLS[(op, _selected_name(op, backend, kernels))]
    if impl.framework == "jax" and not _jax_overrides_made:
        # Without the overrides torchax fails deep inside with an unrelated message.
        raise KernelUnavailableError(
            f"kernel {op}/{impl.name} runs through torchax: call "
            "anychip.kernels.install_jax_overrides(env, platform) first, or use kernels='reference'"
        )
    return impl


def available(backend: str | None = None) -> list[KernelStatus]:
    """Every (op, implementation) on ``backend`` (default: all backends): runs or why not."""
    backends = BACKENDS if backend is None else (backend,)
    rows = []
    for be in backends:
        _check_backend(be)
        for op in OPS:
            chosen = select(op, be, "auto").name
            for impl in TABLE:
                if impl.op != op:
                    continue
                reason = why_not(impl, be)
                if not reason and impl.experimental:
                    note = "experimental: explicit request only"
                elif not reason and be in impl.interpreted:
                    note = "interpreter only: explicit request only"
                elif not reason and impl.explicit_only:
                    note = f"explicit request only: {impl.explicit_only}"
                else:
                    note = reason
                rows.append(KernelStatus(op, impl.name, be, not reason, note, impl.name == chosen, impl.note))
    return rows


def load(impl: Impl) -> ModuleType:
    """Import the implementation module (lazily: triton/jax load on first use)."""
    return importlib.import_module(impl.module)


# --- which backend a call runs on --------------------------------------------------------


_DEVICE_BACKENDS = {"cpu": "cpu", "cuda": "cuda", "neuron": "neuron", "xla": "neuron-xla", "meta": "cpu"}


def backend_of(tensor: torch.Tensor) -> str:
    """The backend name for a tensor's device type."""
    kind = tensor.device.type
    if kind in _DEVICE_BACKENDS:
        return _DEVICE_BACKENDS[kind]
    if kind == "jax":  # a torchax tensor: jax is imported already
        import jax

        return f"jax:{jax.default_backend()}"
    raise ValueError(f"anychip kernels do not know device type {kind!r}; pass backend=")


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """explicit ``backend`` > ``set_default_backend`` > the tensor's device."""
    if backend is not None:
        _check_backend(backend)
        return backend
    if _default_backend is not None:
        return _default_backend
    return backend_of(tensor)


def torch_module(op: str, impl_name: str) -> ModuleType:
    """The torch implementation module behind an ``anychip::<op>`` custom-op call."""
    impl = IMPLS.get((op, impl_name))
    if impl is None:
        raise ValueError(f"{op} has no implementation {impl_name!r}")
    if impl.framework != "torch":
        raise RuntimeError(
            f"kernel {op}/{impl_name} is JAX code and runs only through torchax: call "
            "anychip.kernels.install_jax_overrides(env, platform) on the torchax environment"
        )
    return load(impl)


# --- JAX backend (torchax) ---------------------------------------------------------------


# Set by jax_overrides(): the JAX backend has asked for the overrides (and installs them).
_jax_overrides_made = False


def _jax_platform(platform: str) -> str:
    name = platform.removeprefix("jax:")
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"JAX platform must be cpu, gpu or tpu (or jax:*), got {platform!r}")
    return name


def jax_overrides(platform: str, *, include_sdpa: bool = True) -> dict[Any, Callable[..., Any]]:
    """``{torch op: jax function}`` for torchax, for the JAX platform "cpu" | "gpu" | "tpu".

    Keys are the ``torch.ops.anychip.<op>.default`` overloads (forward and ``<op>_backward``);
    each value takes jax arrays plus the op's scalar arguments, including the implementation
    name the torch side selected, and returns jax arrays. With ``include_sdpa`` it also maps
    ``torch.nn.functional.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention``
    to ``jax.nn.dot_product_attention`` (cudnn on GPU): torchax's own lowering materialises
    the full attention matrix (DESIGN.md: 1.62x on a GPT-2-small bf16 step on an H100).

    Values are JAX callables: register them with ``install_jax_overrides`` or with
    ``env.override_op_definition(op, torchax.interop.torch_view(fn))``.
    """
    global _jax_overrides_made
    name = _jax_platform(platform)
    overrides: dict[Any, Callable[..., Any]] = {}
    for op in OPS:
        package = importlib.import_module(f"anychip.kernels.{op}")
        overrides.update(package.jax_overrides(name))
    if include_sdpa:
        from anychip.kernels.attention import jax_sdpa_overrides

        overrides.update(jax_sdpa_overrides(name))
    _jax_overrides_made = True
    return overrides


def install_jax_overrides(env: Any, platform: str, *, include_sdpa: bool = True) -> None:
    """Register ``jax_overrides(platform)`` in a torchax environment (``torchax.default_env()``)."""
    from torchax import interop

    for op, fn in jax_overrides(platform, include_sdpa=include_sdpa).items():
        env.override_op_definition(op, interop.torch_view(fn))


# Importing the op packages registers their torch.library custom ops. They import the names
# above, so they come last. The public entries live in the packages
# (anychip.kernels.rms_norm.rms_norm, ...): re-exporting a function here under the package's
# own name would leave two objects under one name (STYLE 8). The packages' __init__ modules
# never bind `triton` or `jax` as globals: importing the sibling implementation file
# (anychip.kernels.<op>.triton) sets that attribute on the package and would shadow it.
import anychip.kernels.attention  # noqa: E402
import anychip.kernels.linear_cross_entropy  # noqa: E402
import anychip.kernels.rms_norm  # noqa: E402
import anychip.kernels.rotary  # noqa: E402
import anychip.kernels.swiglu  # noqa: E402, F401

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "IMPLS",
    "OPS",
    "TABLE",
    "Impl",
    "KernelStatus",
    "KernelUnavailableError",
    "available",
    "backend_of",
    "default_backend",
    "defaults",
    "install_jax_overrides",
    "jax_overrides",
    "reset",
    "resolve_backend",
    "select",
    "set_default_backend",
    "set_default_kernels",
    "why_not",
]
