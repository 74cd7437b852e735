"""The device contract and the facts a backend is built from: RNG through checkpoints, peak
FLOP/s from the table or the registration, the traits record, the non-finite guard choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import anychip as ac
from anychip.backends import registry
from anychip.backends.registry import Availability, Registration
from anychip.backends.torch import guards
from anychip.backends.torch.base import NativeTorchBackend, Traits
from anychip.backends.torch.cpu import CpuBackend
from anychip.engine import StepSpec
from anychip.precision import policy


class GeneratorBackend(CpuBackend):
    """A CPU backend whose 'device' has a generator of its own, as CUDA or XLA do."""

    name = "rngchip"

    def __init__(self, availability):
        super().__init__(availability)
        self.generator = bytearray(b"\x01\x02\x03\x04")
        self.restored = []

    def rng_state(self) -> dict:
        return {"rngchip": bytes(self.generator), "counter": 7}

    def set_rng_state(self, state: dict) -> None:
        self.restored.append(dict(state))


@pytest.fixture
def rngchip():
    registry.register(Registration("rngchip", "anychip.backends.torch.cpu", 1, auto=False, kernel_family="cpu", device_type="rngchip"))
    try:
        yield GeneratorBackend(Availability("rngchip", True, "test", devices=1, device_kind="RNG chip"))
    finally:
        registry.unregister("rngchip")


def _step(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    return ac.TrainStep(model, lambda m, b: m(b).pow(2).mean(), optimizer=ac.SGD(lr=0.1), backend=backend)


def test_checkpoints_save_and_restore_the_device_generator(rngchip, tmp_path):
    step = _step(rngchip)
    step(torch.randn(8, 4))
    ac.save(step, tmp_path)
    rngchip.generator[:] = b"\xff\xff\xff\xff"  # the generator moves on after the save
    ac.load(tmp_path, step)
    assert rngchip.restored == [{"rngchip": b"\x01\x02\x03\x04", "counter": 7}]
    ac.load(tmp_path, step, restore_rng=False)
    assert len(rngchip.restored) == 1  # restore_rng=False leaves every generator alone


def test_a_cpu_backend_has_no_device_generator_state():
    assert ac.backend("cpu").rng_state() == {}


def test_peak_flops_from_the_table_else_from_the_registration(rngchip):
    table = CpuBackend(Availability("cpu", True, "", devices=1, device_kind="NVIDIA H100 80GB HBM3"))
    assert table.peak_flops("bf16") == pytest.approx(989.4e12)
    assert rngchip.peak_flops("bf16") is None  # neither the table nor the registration knows it
    registry.unregister("rngchip")
    registry.register(Registration("rngchip", "anychip.backends.torch.cpu", 1, auto=False, peak_tflops={"bf16": 2.0}))
    assert rngchip.peak_flops("bf16") == pytest.approx(2e12) and rngchip.peak_flops("fp32") is None


def test_registrations_refuse_bad_facts():
    with pytest.raises(ValueError, match="peak_tflops"):
        Registration("x", "anychip.backends.torch.cpu", 1, peak_tflops={"bf16": 0})
    with pytest.raises(ValueError, match="engine"):
        Registration("x", "anychip.backends.torch.cpu", 1, engine="tensorflow")
    with pytest.raises(ValueError, match="device_type"):
        Registration("x", "anychip.backends.torch.cpu", 1, device_type="no such")
    assert Registration("x", "anychip.backends.torch.cpu", 1).kernel_family == "x"  # its own column by default


def test_traits_are_a_frozen_record():
    traits = Traits(device_type="cuda", compile_options={"dynamic": False})
    with pytest.raises(dataclasses.FrozenInstanceError):
        traits.device_type = "cpu"
    with pytest.raises(TypeError):
        traits.compile_options["dynamic"] = True


@pytest.mark.parametrize(
    ("traits", "on_nonfinite", "fused", "parallel", "expected"),
    [
        (Traits(), "raise", False, None, guards.eager_check),
        (Traits(), "skip", True, None, guards.eager_check),
        (Traits(device_type="cuda"), "raise", True, None, guards.deferred_check),
        (Traits(device_type="cuda"), "raise", True, "fsdp", guards.eager_check),
        (Traits(device_type="xla", lazy_tensors=True), "raise", False, None, guards.masked_check),
        (Traits(device_type="xla", lazy_tensors=True), "ignore", False, None, guards.unchecked),
        (Traits(), "ignore", True, None, guards.unchecked),
    ],
)
def test_the_non_finite_guard_is_chosen_from_the_facts(traits, on_nonfinite, fused, parallel, expected):
    backend = type("B", (NativeTorchBackend,), {"traits": traits})(Availability("b", True, ""))
    spec = StepSpec(torch.nn.Linear(1, 1), None, ac.SGD(), policy("fp32"), on_nonfinite=on_nonfinite, parallel=parallel)
    assert guards.choose(backend, spec, fused) is expected
