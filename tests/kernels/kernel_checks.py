"""Shared by the kernel tests: run an implementation and the float64 reference, compare.

Every comparison is against the reference evaluated in float64 on the same (rounded) inputs,
forward outputs and the gradients of every differentiable input.
"""

from __future__ import annotations

import os

import numpy as np
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

# (rtol, atol) per dtype; atol is relative to the largest reference magnitude.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    # atol scales with the tensor (a mean loss has gradients of size 1/N), down to 1e-3: below
    # that a gradient is a cancellation (RMSNorm of one element) and rounding dominates.
    scale = max(float(expected.abs().max()), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def cotangents(outputs: tuple[torch.Tensor, ...], seed: int = 1) -> list[torch.Tensor]:
    """Random float64 cotangents, rounded through each output's dtype (so both sides see the same)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).double() for o in outputs]


def torch_run(fn, inputs: list[torch.Tensor], differentiable: list[int], cots=None):
    """outputs, gradients of the differentiable inputs, and the float64 cotangents used."""
    leaves = [t.detach().clone().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    cots = cotangents(outs) if cots is None else cots
    grads = torch.autograd.grad(
        outs, [leaves[i] for i in differentiable], [c.to(o.device, o.dtype) for c, o in zip(cots, outs)]
    )
    return outs, grads, cots


def _widen(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.double() if t.dtype.is_floating_point else t for t in inputs]


def check_torch(fn, reference, inputs, differentiable, dtype, what: str) -> None:
    """fn on ``inputs`` vs ``reference`` on the same values in float64, forward and backward."""
    outs, grads, cots = torch_run(fn, inputs, differentiable)
    ref_outs, ref_grads, _ = torch_run(reference, _widen(inputs), differentiable, cots)
    with torch.no_grad():  # the spec also fixes the output dtypes
        spec = reference(*inputs)
    spec = spec if isinstance(spec, tuple) else (spec,)
    for i, (a, e, s) in enumerate(zip(outs, ref_outs, spec)):
        assert a.dtype == s.dtype and a.shape == s.shape, f"{what} output {i}: {a.dtype}{tuple(a.shape)}"
        assert_close(a, e, dtype, f"{what} output {i}")
    for i, a, e in zip(differentiable, grads, ref_grads):
        assert a.dtype == inputs[i].dtype, f"{what}: grad {i} has dtype {a.dtype}, input {inputs[i].dtype}"
        assert_close(a, e, dtype, f"{what} grad of input {i}")


def to_jax(t: torch.Tensor):
    import jax.numpy as jnp

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through float32 (exact)
        return jnp.asarray(t.detach().float().cpu().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.detach().cpu().numpy())


def from_jax(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a.astype("float32") if a.dtype.name == "bfloat16" else a).copy())


def check_jax(fn, reference, inputs, differentiable, dtype, what: str) -> None:
    """A JAX implementation vs the float64 torch reference, forward and VJP."""
    import jax

    jax_inputs = [to_jax(t) for t in inputs]

    def partial_fn(*diff_args):
        args = list(jax_inputs)
        for i, a in zip(differentiable, diff_args):
            args[i] = a
        return fn(*args)

    # jit: one XLA compile per direction instead of one per jnp op (3-5x faster on a CPU).
    out, vjp = jax.vjp(jax.jit(partial_fn), *[jax_inputs[i] for i in differentiable])
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    cots = []
    for o in outs:  # rounded through the output's dtype, as in cotangents()
        rounded = torch.bfloat16 if o.dtype.name == "bfloat16" else torch.float32
        cots.append(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(rounded).double())
    ref_outs, ref_grads, _ = torch_run(reference, _widen(inputs), differentiable, cots)
    jax_cots = [to_jax(c.float()).astype(o.dtype) for c, o in zip(cots, outs)]
    grads = vjp(tuple(jax_cots) if isinstance(out, tuple) else jax_cots[0])
    for i, (a, e) in enumerate(zip(outs, ref_outs)):
        assert_close(from_jax(a), e, dtype, f"{what} output {i}")
    for i, a, e in zip(differentiable, grads, ref_grads):
        assert a.dtype == jax_inputs[i].dtype, f"{what}: grad {i} has dtype {a.dtype}"
        assert_close(from_jax(a), e, dtype, f"{what} grad of input {i}")
