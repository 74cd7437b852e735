"""The defaults a TrainStep sets are per context, and backend names come from the registry."""

from __future__ import annotations

import threading
import types

import pytest
import torch

import anychip.kernels as kernels
from anychip.backends.registry import Registration, register, unregister


def test_kernel_scope_is_per_thread():
    """Two threads inside kernel_scope with different settings each see their own."""
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, tuple] = {}

    def run(backend: str, mode: str) -> None:
        with kernels.kernel_scope(backend=backend, kernels=mode):
            barrier.wait()  # both scopes are open now
            seen[backend] = (kernels.default_backend(), kernels.default_kernels(),
                             kernels.resolve_backend(None, torch.zeros(1)))
            barrier.wait()  # neither closes before the other has looked

    threads = [threading.Thread(target=run, args=a) for a in (("neuron", "reference"), ("cuda", "auto"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"neuron": ("neuron", "reference", "neuron"), "cuda": ("cuda", "auto", "cuda")}
    assert kernels.default_backend() is None and kernels.default_kernels() == "auto"


def test_kernel_scope_validates_and_restores():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with kernels.kernel_scope(backend="gpu"):
            pass
    with pytest.raises(ValueError, match="default kernels must be one of"):
        with kernels.kernel_scope(kernels="triton"):
            pass
    with kernels.kernel_scope(backend="neuron"), kernels.kernel_scope(backend="cpu", kernels="reference"):
        assert (kernels.default_backend(), kernels.default_kernels()) == ("cpu", "reference")
    assert kernels.default_backend() is None
    assert kernels.defaults is kernels.kernel_scope


def test_an_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown backend 'fakechip2'; known: .*cuda"):
        kernels.select("rms_norm", "fakechip2")
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.available("fakechip2")
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.resolve_backend("fakechip2", torch.zeros(1))
    with pytest.raises(ValueError, match="know no backend for device type 'strange'"):
        kernels.backend_of(types.SimpleNamespace(device=types.SimpleNamespace(type="strange")))


@pytest.fixture
def fakechip():
    """A plug-in backend on its own device type that reuses the cpu kernel column."""
    register(Registration("fakechip", "anychip.backends.torch.cpu", 1, auto=False, device_type="fakechip", kernel_family="cpu"))
    try:
        yield "fakechip"
    finally:
        unregister("fakechip")


def test_a_plugin_backend_uses_its_kernel_family(fakechip):
    assert "fakechip" in kernels.known_backends()
    rows = [r for r in kernels.available() if r.backend == "fakechip"]
    assert {(r.op, r.name) for r in rows} == {(i.op, i.name) for i in kernels.TABLE}
    assert rows == kernels.available("fakechip")
    assert kernels.select("rms_norm", "fakechip").name == kernels.select("rms_norm", "cpu").name
    assert kernels.select("attention", "fakechip").name == "sdpa"  # the cpu column's choice
    assert kernels.select("linear_cross_entropy", "fakechip", "torch_chunked").name == "torch_chunked"
    with pytest.raises(kernels.KernelUnavailableError, match=r"not on fakechip \(kernel family cpu\)"):
        kernels.select("rms_norm", "fakechip", "jax")
    stand_in = types.SimpleNamespace(device=types.SimpleNamespace(type="fakechip"))
    assert kernels.backend_of(stand_in) == "fakechip"
    assert kernels.resolve_backend(None, stand_in) == "fakechip"
    with kernels.kernel_scope(backend="fakechip"):
        assert kernels.resolve_backend(None, torch.zeros(1)) == "fakechip"
    assert kernels.backend_of(torch.zeros(1)) == "cpu"  # the built-in cpu keeps its device type


def test_a_plugin_sharing_a_device_type_does_not_take_it_over():
    register(Registration("cpu2", "anychip.backends.torch.cpu", 1000, auto=False, device_type="cpu", kernel_family="cpu"))
    register(Registration("fakechip3", "anychip.backends.torch.cpu", 5, auto=False, device_type="fake3", kernel_family="nochip"))
    try:
        assert kernels.backend_of(torch.zeros(1)) == "cpu"
        assert kernels.backend_of(torch.zeros(1, device="meta")) == "cpu"
        # a kernel family the table has no column for runs the reference only
        assert kernels.family_of("fakechip3") == "reference"
        assert {kernels.select(op, "fakechip3").name for op in kernels.OPS} == {"reference"}
        with pytest.raises(kernels.KernelUnavailableError, match="kernel family reference"):
            kernels.select("attention", "fakechip3", "sdpa")
    finally:
        unregister("cpu2")
        unregister("fakechip3")
    assert "cpu2" not in kernels.known_backends()
