"""Built-in workloads: a model, a seeded synthetic data stream, the loss, and FLOPs per token.

``get("gpt-tiny")`` returns a :class:`Workload`; ``"hf:llama"`` (``"hf:llama-small"``) a Hugging
Face architecture built from its config (:mod:`anychip.workloads.hf`); a user workload is
``"pkg.module:factory"``, where ``factory()`` returns a :class:`Workload`.
"""

from __future__ import annotations

import difflib
import importlib

from anychip.errors import InvalidArgumentError
from anychip.workloads import gpt, hf, llama, mlp
from anychip.workloads.base import Workload

__all__ = ["BUILTIN", "HF_PREFIX", "Workload", "get", "with_size"]

HF_PREFIX = "hf:"  # reserved: "hf:<model_type>[-<size>]" is a Hugging Face architecture, never a module path


def _lm(name: str, module, preset: str, batch: int, seq: int) -> Workload:
    c = module.PRESETS[preset]
    return Workload(
        name,
        build=lambda seed=0, **kw: module.build(preset, seed=seed, **kw),
        batch=lambda step, b, t, seed=0: module.synthetic_tokens(step, b, t, module.PRESETS[preset].vocab, seed),
        loss_fn=module.loss_fn,
        flops_per_token=module.flops_per_token,
        default_batch=batch,
        default_seq=seq,
        max_seq=c.ctx,
        batch_bytes_per_token=16,  # int64 inputs and targets
        # Every block keeps at least its q, k, v, attention output and two normalised inputs:
        # 8 x dim floats per token and layer (the MLP's hidden activations come on top).
        activation_bytes_per_token=4 * 8 * c.dim * c.layers,
    )


BUILTIN: dict[str, Workload] = {
    "mlp": Workload(
        "mlp", mlp.build, mlp.batch, mlp.loss_fn, mlp.flops_per_token, default_batch=64, default_seq=1, max_seq=1,
        batch_bytes_per_token=mlp.SAMPLE_BYTES, activation_bytes_per_token=mlp.ACTIVATION_BYTES,
    ),
    "gpt-tiny": _lm("gpt-tiny", gpt, "tiny", 8, 64),
    "gpt-small": _lm("gpt-small", gpt, "small", 16, 1024),
    "llama-tiny": _lm("llama-tiny", llama, "tiny", 8, 64),
    "llama-small": _lm("llama-small", llama, "small", 16, 1024),
}


def get(name: str) -> Workload:
    """A built-in workload by name, or a user one as ``'pkg.module:factory'``."""
    if isinstance(name, Workload):
        return name
    if not isinstance(name, str):
        raise InvalidArgumentError(f"workload must be a name such as 'gpt-tiny' or 'pkg.module:factory', got {type(name).__name__}")
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith(HF_PREFIX):
        model_type, size = _hf_name(name)
        return hf.hf_workload(model_type, size)
    if ":" in name:
        return _from_factory(name)
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InvalidArgumentError(f"unknown workload {name!r}.{hint} Built-in: {', '.join(BUILTIN)}; Hugging Face: "
                               f"{', '.join(HF_PREFIX + t for t in hf.MODEL_TYPES)}; or give 'pkg.module:factory'.")


def _hf_name(name: str) -> tuple[str, str]:
    """``hf:llama`` -> (llama, tiny); ``hf:llama-small`` -> (llama, small)."""
    rest = name[len(HF_PREFIX):]
    model_type, dash, size = rest.rpartition("-")
    if dash and size in hf.SIZES:
        return model_type, size
    return rest, "tiny"


def with_size(name: str, size: str | None) -> str:
    """The workload name ``--size`` asks for: ``hf:llama`` at size small is ``hf:llama-small``.
    Only Hugging Face workloads take a size (the built-in ones name theirs: gpt-tiny, gpt-small)."""
    if size is None:
        return name
    if not isinstance(name, str) or not name.startswith(HF_PREFIX):
        raise InvalidArgumentError(f"--size applies to {HF_PREFIX}<model_type> workloads, not {name!r} (built-in sizes are in the "
                                   "name: gpt-tiny, gpt-small, llama-tiny, llama-small)")
    if size not in hf.SIZES:
        raise InvalidArgumentError(f"unknown size {size!r}; choose one of {', '.join(hf.SIZES)}")
    return f"{HF_PREFIX}{_hf_name(name)[0]}-{size}"


def _from_factory(name: str) -> Workload:
    """``'pkg.module:factory'``: import the module, call ``factory()``, check what it returned."""
    module_name, _, attr = name.partition(":")
    if not module_name.strip() or not attr.strip():
        raise InvalidArgumentError(f"workload {name!r}: expected 'pkg.module:factory', with both parts")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot load workload {name!r}: {exc}") from exc
    if not callable(factory):
        raise InvalidArgumentError(f"workload {name!r} is a {type(factory).__name__}, not a factory: name a function that returns "
                                   "anychip.workloads.Workload")
    try:
        workload = factory()
    except Exception as exc:  # noqa: BLE001 - whatever the user's factory raises is reported as its failure
        raise InvalidArgumentError(f"workload factory {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(workload, Workload):
        raise InvalidArgumentError(
            f"workload factory {name!r} returned {type(workload).__name__} {workload!r:.60}; a workload factory takes no "
            "arguments and must return anychip.workloads.Workload"
        )
    return workload
