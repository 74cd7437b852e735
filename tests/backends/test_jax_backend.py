"""The jax backends' probe (stdlib only, fake sysfs), registry entries and device facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import anychip as ac
from anychip.backends import jax as jb
from anychip.backends.facts import host as facts
from anychip.backends.facts import tpu
from anychip.backends.jax.backend import JaxBackend
from support import requires


def fake_pci(root, devices):
    for i, (vendor, device) in enumerate(devices):
        d = root / f"0000:00:{i:02x}.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")


@pytest.fixture
def everything_installed(monkeypatch):
    monkeypatch.setattr(facts, "importable", lambda m: True)
    monkeypatch.setattr(facts, "versions", lambda *d: {x: "1.0" for x in d if x in jb.REQUIRED})


def test_probe_does_not_import_jax_torchax_optax_or_torch():
    code = (
        "import sys, json; from anychip.backends import jax as jb; "
        "r = [jb.probe(n).as_dict() for n in ('jax:tpu', 'jax:gpu', 'jax:cpu')]; "
        "print(json.dumps([sorted(m for m in ('jax', 'jaxlib', 'torchax', 'optax', 'torch') if m in sys.modules), r]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, results = json.loads(out.stdout)
    assert imported == []
    assert [r["name"] for r in results] == ["jax:tpu", "jax:gpu", "jax:cpu"]


@pytest.mark.parametrize("missing", ["jax", "torchax", "optax"])
def test_missing_package_names_it_and_the_install_command(monkeypatch, missing):
    monkeypatch.setattr(facts, "importable", lambda m: m != missing)
    for name in ("jax:tpu", "jax:gpu", "jax:cpu"):
        avail = jb.probe(name)
        assert not avail.available and missing in avail.reason
        assert avail.install == "pip install 'anychip[jax]'"


def test_explicit_request_without_jax_fails_loudly_with_the_install_command(monkeypatch):
    monkeypatch.setattr(facts, "importable", lambda m: m != "torchax")
    with pytest.raises(ac.BackendError, match=r"torchax.*pip install 'anychip\[jax\]'"):
        ac.backend("jax:cpu")


def test_tpu_present_without_libtpu(monkeypatch, tmp_path, everything_installed):
    fake_pci(tmp_path, [("0x1ae0", "0x005e"), ("0x1ae0", "0x005e"), ("0x8086", "0x1234")])
    monkeypatch.setattr(tpu, "PCI_ROOT", str(tmp_path))
    monkeypatch.setattr(facts, "importable", lambda m: m != "libtpu")
    avail = jb.probe("jax:tpu")
    assert not avail.available
    assert avail.reason == "a TPU seems present but libtpu is not installed"
    assert avail.install == "pip install 'jax[tpu]'"
    assert avail.devices == 2 and avail.device_kind == "TPU v4"


def test_tpu_with_libtpu_is_available(monkeypatch, tmp_path, everything_installed):
    fake_pci(tmp_path, [("0x1ae0", "0x0063")] * 4)
    monkeypatch.setattr(tpu, "PCI_ROOT", str(tmp_path))
    avail = jb.probe("jax:tpu")
    assert avail.available and avail.devices == 4 and avail.device_kind == "TPU v5 lite"
    from anychip.backends.facts.peaks import peak_flops

    assert peak_flops(avail.device_kind) == 197e12  # the kind names match the peak table


def test_google_nic_is_not_a_tpu(monkeypatch, tmp_path, everything_installed):
    # Every GCE VM has a gVNIC with Google's vendor id: the device id must be checked too.
    fake_pci(tmp_path, [("0x1ae0", "0x0042")])
    monkeypatch.setattr(tpu, "PCI_ROOT", str(tmp_path))
    avail = jb.probe("jax:tpu")
    assert not avail.available and "none of them a TPU" in avail.reason


def test_no_tpu(monkeypatch, tmp_path, everything_installed):
    monkeypatch.setattr(tpu, "PCI_ROOT", str(tmp_path))
    avail = jb.probe("jax:tpu")
    assert not avail.available and "no TPU found" in avail.reason


def test_gpu_needs_a_cuda_plugin_and_a_device(monkeypatch, everything_installed):
    avail = jb.probe("jax:gpu")
    assert not avail.available and "CUDA plugin" in avail.reason and avail.install == "pip install 'jax[cuda12]'"
    monkeypatch.setattr(facts, "versions", lambda *d: {x: "1.0" for x in d if x in (*jb.REQUIRED, "jax-cuda12-plugin")})
    monkeypatch.setattr(facts, "device_files", lambda pattern: [])
    avail = jb.probe("jax:gpu")
    assert not avail.available and "/dev/nvidia0" in avail.reason
    monkeypatch.setattr(facts, "device_files", lambda pattern: ["/dev/nvidia0", "/dev/nvidia1"])
    monkeypatch.setattr(facts, "run_tool", lambda argv, timeout=5.0: (0, "NVIDIA H100 80GB HBM3\nNVIDIA H100 80GB HBM3\n"))
    avail = jb.probe("jax:gpu")
    assert avail.available and avail.devices == 2 and avail.device_kind == "NVIDIA H100 80GB HBM3"


def test_cpu_counts_forced_host_devices(monkeypatch, everything_installed):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert jb.probe("jax:cpu").devices == 8
    monkeypatch.delenv("XLA_FLAGS")
    assert jb.probe("jax:cpu").devices == 1


@requires("jax", "torchax", "optax")
def test_registry_builds_a_jax_backend_and_the_alias_resolves_to_cpu_here():
    be = ac.backend("jax:cpu")
    assert isinstance(be, JaxBackend) and be.name == "jax:cpu" and be.platform == "cpu"
    if not (jb.probe("jax:tpu").available or jb.probe("jax:gpu").available):
        assert ac.backend("jax") is be
    assert be.device_count >= 1 and be.device_kind == "cpu"


@requires("jax", "torchax", "optax")
def test_device_facts_on_cpu():
    be = ac.backend("jax:cpu")
    stats = be.memory_stats()
    assert stats.source == "process RSS" and stats.peak_bytes > 0  # XLA:CPU keeps no allocator stats
    assert be.peak_flops("bf16") is None  # no datasheet peak for a host CPU
    be.synchronize()  # nothing pending: a no-op
    be.init_distributed()  # no JAX_COORDINATOR_ADDRESS: a no-op
    assert "JAX_COORDINATOR_ADDRESS" not in os.environ


@requires("jax", "torchax", "optax")
def test_place_and_place_batch_give_jax_arrays():
    import jax
    import torch

    be = ac.backend("jax:cpu")
    state = be.place(torch.nn.Linear(3, 2))
    assert set(state) == {"weight", "bias"} and all(isinstance(v, jax.Array) for v in state.values())
    batch = be.place_batch({"x": torch.ones(4, 3, dtype=torch.float64), "y": torch.arange(4)}, accumulate=2)
    assert batch["x"].shape == (2, 2, 3) and batch["x"].dtype == jax.numpy.float32
    assert batch["y"].dtype == jax.numpy.int32 and batch["y"].tolist() == [[0, 1], [2, 3]]
