"""torch autocast for a torchax environment: ``precision="bf16"`` on the JAX backends.

torchax runs a torch model by dispatching each torch function (``F.linear``, ``F.cross_entropy``,
``Tensor.softmax``) and each aten op it decomposes into to a JAX lowering. ``install`` wraps that
dispatch in torch's autocast policy (:data:`anychip.precision.AUTOCAST_OPS`, the list of the torch
device the backend stands in for): while the environment's ``autocast_dtype`` property is set
(``env.override_property(autocast_dtype=torch.bfloat16)``), a listed op gets its floating inputs
cast as torch would and runs with autocast off inside, as torch's autocast kernel redispatches
below itself; an op not listed runs in its inputs' dtypes, and the ops it decomposes into are
looked up in turn, as in torch.

Why not torchax's own policy (``torchax/amp.py``): it holds torch's CPU list keyed by aten
overloads only, so the ops torchax lowers at the function level (``F.linear``) or that reach it
already decomposed (``F.cross_entropy`` arrives as ``_log_softmax`` + ``nll_loss_forward``) are
never cast, and its "promote" fails on ``cat``'s list argument. This wrapper sets the property to
None on the way in, so torchax's partial table never applies on top.

The matmul family (``linear``, ``addmm``, ``matmul``, ``mm``, ``bmm``, ``baddbmm``) is lowered
the way torch's bf16 CPU/CUDA kernels compute it: bf16 operands, float32 accumulation, the bias
added in float32 and one rounding of the result to bf16. torchax's own lowerings round the
product and then the bias sum (two roundings, 1.3e-5 relative on a Linear + cross-entropy loss).
"""

from __future__ import annotations

from typing import Any

from anychip.precision import AUTOCAST_ALIASES, AUTOCAST_OPS

# anychip's kernel ops are custom ops, opaque to torch autocast; under torch autocast the
# linear_cross_entropy wrapper casts hidden and weight to the autocast dtype before the op (as an
# unfused head would run), which on JAX the wrapper cannot see: the op itself is cast here.
_ANYCHIP_OPS = {"anychip::linear_cross_entropy": "lower"}
# torch computes a norm over a bf16 input with float32 weight and bias (the mix autocast makes
# when a norm is not in the device's list, as on CPU) in float32 and returns the input's dtype;
# torchax's lowerings return the promoted float32.
_NORMS_IN_INPUT_DTYPE = {"native_layer_norm", "group_norm"}
# The namespaces whose ops torchax's dispatch mode forwards; other ops reach dispatch as functions.
_DISPATCHED_NAMESPACES = ("aten", "_c10d_functional", "torchvision", "xla")
_MATMULS = ("linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "__matmul__", "__rmatmul__")


def device_type_for(platform: str) -> str:
    """The torch device whose autocast list a JAX platform applies: jax:cpu is compared with
    `cpu`; GPUs and TPUs train with CUDA's list (float32 softmax and norms)."""
    return "cpu" if platform.removeprefix("jax:") == "cpu" else "cuda"


def op_name(func: Any) -> str:
    """The name an op has in torch's autocast lists: aten ops and torch functions by their aten
    name, other namespaces' ops as ``namespace::name``."""
    ns = getattr(func, "namespace", None)
    if ns is not None:  # an OpOverload / OpOverloadPacket
        name = getattr(func, "_opname", None) or func.__name__.split(".")[0]
        if ns != "aten":
            return f"{ns}::{name}"
    else:
        name = getattr(func, "__name__", "")
    return AUTOCAST_ALIASES.get(name, name)


def _cast_inputs(rule: str, args, kwargs, dtype):
    import torch
    from torch.utils import _pytree as pytree

    def eligible(a):  # torch's is_eligible: floating and not float64
        return isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64

    if rule == "fp32_opt_dtype" and (
        kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
    ):
        return args, kwargs  # the call chose its output dtype: left alone, as in torch
    if rule == "promote":
        found = [a.dtype for a in pytree.tree_leaves((args, kwargs)) if eligible(a)]
        target = torch.float32 if torch.float32 in found else dtype
    else:
        target = dtype if rule == "lower" else torch.float32
    return pytree.tree_map_only(torch.Tensor, lambda a: a.to(target) if eligible(a) and a.dtype != target else a, (args, kwargs))


class _Dispatch:
    """``env.dispatch`` with torch's autocast policy in front (see the module docstring)."""

    _UNSET = object()

    def __init__(self, env, table: dict[str, str]):
        self.env, self.table, self.inner = env, table, env.dispatch
        self.active = self._UNSET  # inside an op: the autocast dtype its decomposition sees
        from torchax.tensor import OperatorNotFound

        self._not_found = OperatorNotFound

    def __call__(self, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        dtype = self.env.param.autocast_dtype if self.active is self._UNSET else self.active
        if dtype is None and self.active is self._UNSET:
            return self.inner(func, types, args, kwargs)
        rule = self.table.get(op_name(func)) if dtype is not None else None
        if rule is not None:
            with self.env:
                args, kwargs = _cast_inputs(rule, args, kwargs, dtype)
        saved, self.active = self.active, (None if rule is not None else dtype)
        try:
            with self.env.override_property(autocast_dtype=None):
                if rule == "lower" and getattr(func, "__name__", "").split(".")[0] in _MATMULS:
                    return _matmul(self.env, func, args, kwargs, lambda: self.inner(func, types, args, kwargs))
                try:
                    out = self.inner(func, types, args, kwargs)
                    if rule is None and dtype is not None and op_name(func) in _NORMS_IN_INPUT_DTYPE:
                        with self.env:
                            out = _first_as(out, args[0])
                    return out
                except self._not_found:
                    if rule is None or getattr(func, "namespace", None) in _DISPATCHED_NAMESPACES:
                        raise
                    # A torch function with no lowering (F.cross_entropy): torchax's function
                    # mode would rerun it with the arguments it had; run it here with the cast
                    # ones, autocast off for the aten ops it decomposes into.
                    return func(*args, **kwargs)
        finally:
            self.active = saved


def _first_as(out, like):
    """``out`` (or its first element) in ``like``'s dtype."""
    import torch

    if not isinstance(like, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return (_first_as(out[0], like), *out[1:])
    return out.to(like.dtype) if isinstance(out, torch.Tensor) and out.dtype != like.dtype else out


def _matmul(env, func, args, kwargs, fallback):
    """One rounding per result: float32 accumulation and bias, then the result in the operands'
    dtype. Anything but the plain forms (scaled addmm, mixed dtypes) takes torchax's lowering."""
    import jax.numpy as jnp

    name = getattr(func, "_opname", None) or func.__name__
    bias = None
    if name == "linear":
        (a, b, *rest), transpose = args, True
        bias = kwargs.get("bias", rest[0] if rest else None)
    elif name in ("matmul", "mm", "bmm", "__matmul__") and len(args) == 2 and not kwargs:
        (a, b), transpose = args, False
    elif name == "__rmatmul__" and len(args) == 2 and not kwargs:
        (b, a), transpose = args, False
    elif name in ("addmm", "baddbmm") and len(args) == 3 and not kwargs:  # beta = alpha = 1
        (bias, a, b), transpose = args, False
    else:
        return fallback()
    x, y, c = env.t2j_iso((a, b, bias))
    if x.dtype != y.dtype or not jnp.issubdtype(x.dtype, jnp.floating) or (c is not None and c.dtype != x.dtype):
        return fallback()
    return env.j2t_iso(_rounded_once(transpose, c is not None)(x, y, *([] if c is None else [c])))


def _rounded_once(transpose: bool, bias: bool):
    """``x @ y (+ c)`` rounded once to the operands' dtype. The backward is the one of the plain
    low-precision formula (bf16 gradient matmuls, as torch's backward runs them); a float32
    accumulation in the forward alone would otherwise make JAX differentiate through float32
    dots (twice the matmul cost on accelerators, for the same rounded values)."""
    import jax
    import jax.numpy as jnp

    def product(x, y, **kw):
        return jnp.einsum("...a,ba->...b", x, y, **kw) if transpose else jnp.matmul(x, y, **kw)

    def plain(x, y, *c):
        out = product(x, y)
        return out + c[0] if bias else out

    @jax.custom_vjp
    def fused(x, y, *c):
        out = product(x, y, preferred_element_type=jnp.float32)
        return (out + c[0].astype(jnp.float32) if bias else out).astype(x.dtype)

    def forward(x, y, *c):
        return fused(x, y, *c), (x, y, *c)

    def backward(saved, ct):
        return jax.vjp(plain, *saved)[1](ct)

    fused.defvjp(forward, backward)
    return fused


def install(env, platform: str) -> None:
    """Make ``env`` apply torch's autocast policy for ``platform`` whenever its ``autocast_dtype``
    property is set. Idempotent."""
    if isinstance(env.dispatch, _Dispatch):
        return
    table = {**AUTOCAST_OPS[device_type_for(platform)], **_ANYCHIP_OPS}
    env.dispatch = _Dispatch(env, table)


def compiler_options(platform: str, policy) -> dict[str, str]:
    """XLA options a precision policy needs on ``platform``.

    On XLA:CPU (jaxlib 0.10) the YNNPACK library fusions drop bf16 round trips inside a fusion
    (a bf16 result converted back to float32 keeps its float32 value), so a bf16 op is not
    rounded where torch rounds it: 9e-5 relative on a Linear + cross-entropy loss against `cpu`
    bf16. ``xla_allow_excess_precision=false`` does not stop it; turning the YNN fusions off
    does (0 difference). fp32 programs have no such round trips and keep the fusions.
    """
    if policy.compute_dtype == "fp32" or platform.removeprefix("jax:") != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": ""}
