"""What JAX tracing cannot do, said in the user's terms: the torch op torchax cannot lower, or
the host read of a traced value, each with the user's own line."""

from __future__ import annotations

import os
import re

from anychip.errors import LossFunctionError, UnsupportedOpError

# anychip/ (this file is anychip/backends/jax/diagnose.py)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def is_library_frame(filename: str) -> bool:
    """Frames of torch, torchax, jax, the stdlib and anychip's own step machinery."""
    import jax
    import torch
    import torchax

    path = os.path.realpath(filename)
    here = _PACKAGE_DIR
    packages = [os.path.dirname(os.path.realpath(m.__file__)) for m in (jax, torch, torchax)]
    packages += [os.path.join(here, f) for f in ("backends", "kernels", "step.py", "batch.py", "engine.py")]
    if path.startswith(tuple(packages)) or "/jaxlib/" in path or path.startswith("<"):
        return True
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    return path.startswith(stdlib) and "-packages" not in path  # site-/dist-packages hold user libraries


def user_frame(exc: BaseException) -> str:
    """'file.py:12 in forward: `y = pool(x)`' for the innermost frame outside the libraries."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not is_library_frame(f.filename)]
    if not frames:
        return "an unknown line"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def translate(exc: BaseException, backend_name: str) -> BaseException | None:
    """A clearer error for what JAX tracing cannot do, or None to re-raise ``exc`` as is."""
    import jax
    from torchax.tensor import OperatorNotFound

    chain, cur = [], exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, OperatorNotFound):
            found = re.search(r"name (\S+) has no lowering", str(e))
            op = found.group(1) if found else str(e)
            return UnsupportedOpError(
                f"{backend_name} cannot run {op}: torchax has no JAX lowering for it (called at {user_frame(e)}). "
                f"Run this model on a torch backend (backend='cpu' or 'cuda'), or give the op a JAX "
                f"implementation through a kernel override (anychip.kernels)."
            )
        host_reads = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)
        if isinstance(e, host_reads):
            return LossFunctionError(
                f"{backend_name} traces the model into a jitted step, and it reads a tensor value on the host "
                f"at {user_frame(e)} (.item(), float(t), bool(t) or an `if` on a tensor); keep such logic "
                "out of the model and loss_fn, or use a torch backend"
            )
    return None
