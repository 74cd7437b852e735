"""The dispatch table, select(), available(), ANYCHIP_KERNELS and explicit requests."""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import anychip.kernels as kernels
from anychip.kernels import FAMILIES, OPS, TABLE, Impl, KernelUnavailableError, available, select

# anychip.kernels.selection holds the probe and the flag.
select_module = importlib.import_module("anychip.kernels.selection")
table_module = importlib.import_module("anychip.kernels.table")
BACKENDS = ("cpu", "cuda", "neuron", "neuron-xla", "jax:cpu", "jax:gpu", "jax:tpu")  # the built-in ones


def _fake_modules(monkeypatch, installed: set[str]) -> None:
    """Pretend exactly ``installed`` can be imported (a cached function, like the real probe)."""
    monkeypatch.setattr(select_module, "_module_available", functools.lru_cache(maxsize=None)(lambda name: name in installed))


@pytest.fixture
def everything_installed(monkeypatch):
    _fake_modules(monkeypatch, {"triton", "jax"})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_every_op_has_a_reference_on_every_backend():
    for op in OPS:
        ref = kernels.IMPLS[(op, "reference")]
        assert set(ref.backends) == set(FAMILIES)


def test_every_implementation_module_exists():
    import importlib.util

    for impl in TABLE:
        assert importlib.util.find_spec(impl.module) is not None, impl.module


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(op="layer_norm", name="x", framework="torch", backends=("cpu",), priority=1), "unknown op"),
        (dict(op="swiglu", name="x-y", framework="torch", backends=("cpu",), priority=1), "identifier"),
        (dict(op="swiglu", name="x", framework="numpy", backends=("cpu",), priority=1), "framework"),
        (dict(op="swiglu", name="x", framework="torch", backends=["cpu"], priority=1), "tuple of str"),
        (dict(op="swiglu", name="x", framework="torch", backends=("xpu",), priority=1), "unknown backends"),
        (dict(op="swiglu", name="x", framework="torch", backends=(), priority=1), "runs nowhere"),
        (dict(op="swiglu", name="x", framework="torch", backends=("cpu",), priority=0), "priority > 0"),
        (dict(op="swiglu", name="x", framework="torch", backends=("jax:tpu",), priority=1), "cannot run on jax"),
        (dict(op="swiglu", name="x", framework="jax", backends=("cuda",), priority=1), "jax:* backends only"),
        (dict(op="swiglu", name="x", framework="jax", backends=("jax:cpu",), priority=1, direct=True), "directly"),
        (dict(op="swiglu", name="x", framework="torch", backends=("cuda",), interpreted=("cuda",), priority=1),
         "both native and interpreted"),
        (dict(op="swiglu", name="reference", framework="torch", backends=("cpu",), direct=True), "every backend"),
    ],
)
def test_impl_records_are_validated(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        Impl(**kwargs)


@pytest.mark.parametrize(
    "backend, expected",
    [
        # the chunked heads and the Triton swiglu are explicit-only: slower than the compiled
        # reference on an H100 (benchmarks/RESULTS.md)
        ("cuda", {"rms_norm": "reference", "linear_cross_entropy": "reference", "swiglu": "reference",
                  "rotary": "reference", "attention": "sdpa"}),
        ("cpu", {"rms_norm": "reference", "linear_cross_entropy": "reference", "swiglu": "reference",
                 "rotary": "reference", "attention": "sdpa"}),
        ("neuron", dict.fromkeys(OPS, "reference")),
        ("neuron-xla", dict.fromkeys(OPS, "reference")),
        ("jax:cpu", {**dict.fromkeys(OPS, "jax"), "linear_cross_entropy": "reference"}),
        ("jax:gpu", {**dict.fromkeys(OPS, "jax"), "linear_cross_entropy": "reference"}),
        ("jax:tpu", {**dict.fromkeys(OPS, "jax"), "linear_cross_entropy": "reference"}),  # pallas is experimental: explicit only
    ],
)
def test_auto_picks_the_best_implementation_that_runs(everything_installed, backend, expected):
    assert {op: select(op, backend).name for op in OPS} == expected


@pytest.fixture
def chunked_head_on_auto(monkeypatch):
    """The table as if auto picked the chunked heads (they are explicit-only by measurement):
    these tests need an op whose auto choice on the CPU is a kernel, not the reference."""
    import dataclasses as dc

    table = tuple(dc.replace(i, explicit_only="") if i.op == "linear_cross_entropy" else i for i in kernels.TABLE)
    monkeypatch.setattr(table_module, "TABLE", table)
    monkeypatch.setattr(table_module, "IMPLS", {(i.op, i.name): i for i in table})



def test_auto_falls_back_when_triton_is_missing(monkeypatch, chunked_head_on_auto):
    _fake_modules(monkeypatch, {"jax"})
    assert select("rms_norm", "cuda").name == "reference"
    assert select("linear_cross_entropy", "cuda").name == "torch_chunked"
    assert select("rms_norm", "jax:gpu").name == "jax"


def test_auto_on_jax_without_jax_is_the_reference(monkeypatch):
    _fake_modules(monkeypatch, {"triton"})
    assert select("swiglu", "jax:tpu").name == "reference"


def test_environment_variable_turns_every_kernel_off(everything_installed, monkeypatch):
    monkeypatch.setenv("ANYCHIP_KERNELS", "reference")
    for backend in BACKENDS:
        for op in OPS:
            assert select(op, backend).name == "reference"
            assert select(op, backend, "auto").name == "reference"
    # An explicit implementation name still wins over the environment variable.
    assert select("rms_norm", "cuda", "triton").name == "triton"


def test_environment_variable_is_validated(monkeypatch):
    monkeypatch.setenv("ANYCHIP_KERNELS", "fast")
    with pytest.raises(ValueError, match="ANYCHIP_KERNELS must be one of"):
        select("rms_norm", "cpu")


def test_reference_mode_argument(everything_installed):
    assert select("rms_norm", "cuda", "reference").name == "reference"


def test_public_entry_honours_the_environment(monkeypatch, chunked_head_on_auto):
    """With ANYCHIP_KERNELS=reference the entry runs plain torch: no kernel is called."""
    import anychip.kernels.linear_cross_entropy.torch_chunked as chunked
    from anychip.kernels.linear_cross_entropy import linear_cross_entropy

    calls = []
    original = chunked.linear_cross_entropy_forward
    monkeypatch.setattr(chunked, "linear_cross_entropy_forward", lambda *a: calls.append(a) or original(*a))
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    monkeypatch.setenv("ANYCHIP_KERNELS", "reference")
    reference_loss = linear_cross_entropy(h, w, t)
    assert not calls
    monkeypatch.delenv("ANYCHIP_KERNELS")
    torch.testing.assert_close(linear_cross_entropy(h, w, t), reference_loss)  # auto on cpu: torch_chunked
    assert len(calls) == 1


@pytest.mark.parametrize(
    "op, name, backend, installed, interpret, reason",
    [
        ("rms_norm", "triton", "cpu", {"triton"}, None, "runs on cpu only in the interpreter: set TRITON_INTERPRET=1"),
        ("rms_norm", "triton", "neuron", {"triton"}, "1", "runs on cuda, not on neuron"),
        ("rms_norm", "triton", "cuda", set(), None, "needs triton, which is not installed (pip install triton)"),
        ("rms_norm", "jax", "cuda", {"jax"}, None, "runs on jax:cpu, jax:gpu, jax:tpu, not on cuda"),
        ("rms_norm", "pallas", "jax:gpu", {"jax"}, None, "runs on jax:tpu, not on jax:gpu"),
        ("attention", "sdpa", "jax:tpu", {"jax"}, None, "runs on cpu, cuda, not on jax:tpu"),
        ("linear_cross_entropy", "torch_chunked", "neuron", set(), None, "runs on cpu, cuda, not on neuron"),
    ],
)
def test_explicit_request_that_cannot_run_raises_one_line(monkeypatch, op, name, backend, installed, interpret, reason):
    _fake_modules(monkeypatch, installed)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(KernelUnavailableError) as err:
        select(op, backend, name)
    message = str(err.value)
    assert "\n" not in message
    assert message == f"kernel {op}/{name} cannot run on backend {backend}: {reason}"


def test_explicit_requests_that_can_run(everything_installed, monkeypatch):
    assert select("rms_norm", "jax:cpu", "pallas").name == "pallas"  # interpreted: explicit is fine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("swiglu", "cpu", "triton").name == "triton"


def test_public_entry_raises_for_an_explicit_kernel_that_cannot_run(monkeypatch):
    from anychip.kernels.rms_norm import rms_norm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="rms_norm/triton cannot run on backend cpu"):
        rms_norm(torch.randn(2, 4), torch.ones(4), kernels="triton")


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="has no implementation 'cuda_graphs'; known: auto, reference"):
        select("rms_norm", "cpu", "cuda_graphs")
    with pytest.raises(ValueError, match="unknown kernel op"):
        select("layer_norm", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        select("rms_norm", "gpu")


def test_available_lists_every_implementation_on_every_backend(everything_installed):
    rows = available()
    assert len(rows) == len(TABLE) * len(kernels.known_backends())
    assert set(BACKENDS) <= {r.backend for r in rows}
    by_key = {(r.op, r.name, r.backend): r for r in rows}
    triton_cpu = by_key[("rms_norm", "triton", "cpu")]
    assert not triton_cpu.available and "TRITON_INTERPRET=1" in triton_cpu.reason
    pallas_tpu = by_key[("rms_norm", "pallas", "jax:tpu")]
    assert pallas_tpu.available and not pallas_tpu.selected and "experimental" in pallas_tpu.reason
    assert by_key[("attention", "sdpa", "cuda")].selected
    assert by_key[("attention", "sdpa", "cuda")].reason == ""
    triton_cuda = by_key[("rms_norm", "triton", "cuda")]
    assert triton_cuda.available and not triton_cuda.selected and "explicit request only" in triton_cuda.reason
    for backend in kernels.known_backends():  # exactly one selected implementation per op and backend
        for op in OPS:
            assert sum(r.selected for r in rows if r.op == op and r.backend == backend) == 1
    assert {r.backend for r in available("cuda")} == {"cuda"}


def test_defaults_context_sets_and_restores(everything_installed, chunked_head_on_auto):
    from anychip.kernels.swiglu import swiglu

    x = torch.randn(3)
    with kernels.defaults(backend="neuron", kernels="reference"):
        assert kernels.resolve_backend(None, x) == "neuron"
        assert select("linear_cross_entropy", "cuda").name == "reference"
        assert select("linear_cross_entropy", "cuda", "torch_chunked").name == "torch_chunked"  # explicit wins
        swiglu(x, x)
        with pytest.raises(ValueError, match="default kernels must be one of"):
            kernels.set_default_kernels("triton")
    assert kernels.default_backend() is None
    assert select("linear_cross_entropy", "cuda").name == "triton"


@pytest.mark.before_torchax  # see tests/conftest.py
def test_default_kernels_is_a_guard_of_compiled_graphs(monkeypatch, chunked_head_on_auto):
    """A compiled function re-selects when the default mode changes (it is read outside the
    constant-folded selection)."""
    import anychip.kernels.linear_cross_entropy.torch_chunked as chunked
    from anychip.kernels.linear_cross_entropy import linear_cross_entropy

    torch._dynamo.reset()
    calls = []
    original = chunked.linear_cross_entropy_forward
    monkeypatch.setattr(chunked, "linear_cross_entropy_forward", lambda *a: calls.append(1) or original(*a))
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t), backend="eager", fullgraph=True)
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    compiled(h, w, t)
    assert len(calls) == 1  # auto on cpu: torch_chunked
    with kernels.defaults(kernels="reference"):
        compiled(h, w, t)
    assert len(calls) == 1
    torch._dynamo.reset()


def test_resolve_backend_precedence():
    x = torch.zeros(1)
    assert kernels.resolve_backend(None, x) == "cpu"
    assert kernels.resolve_backend(None, torch.zeros(1, device="meta")) == "cpu"
    assert kernels.set_default_backend("cuda") is None
    assert kernels.resolve_backend(None, x) == "cuda"
    assert kernels.resolve_backend("jax:tpu", x) == "jax:tpu"
    assert kernels.set_default_backend(None) == "cuda"
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.set_default_backend("xpu")


def test_importing_kernels_imports_no_sdk():
    """Probing uses find_spec only, so importing the kernels loads no SDK: no triton, jax, torchax or torch._dynamo."""
    code = (
        "import sys, anychip.kernels, anychip.nn; "
        "heavy = {'triton', 'jax', 'torchax', 'torch._dynamo'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_explicit_only_kernels_run_when_asked_and_say_why_auto_skips_them():
    from anychip.kernels import available, select

    assert select("linear_cross_entropy", "cpu", "torch_chunked").name == "torch_chunked"
    rows = {(r.op, r.name): r for r in available("cuda")}
    assert rows[("linear_cross_entropy", "triton")].available
    assert "explicit request only" in rows[("linear_cross_entropy", "triton")].reason
    assert not rows[("linear_cross_entropy", "triton")].selected
