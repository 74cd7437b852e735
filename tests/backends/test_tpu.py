"""The `tpu` backend (TorchTPU) where torch-tpu is not installed: the probe on faked machine
facts, selection, the hints, and that this environment stays free of torch-tpu. The real package
is checked in its own environment (tests/tpu, `make test-tpu`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import pytest

import anychip as ac
from anychip.backends.facts import host as facts
from anychip.backends.facts import tpu as tpu_facts
from anychip.backends.torch import tpu
from anychip.cli import auto_detect_line


def test_this_environment_has_no_torch_tpu():
    """torch-tpu loads into every `import torch` of an environment it is installed in (a
    `torch.backends` entry point), and without libtpu that aborts the interpreter."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("torch-tpu")
    assert importlib.util.find_spec("torch_tpu") is None
    loaders = [e.value for e in importlib.metadata.entry_points(group="torch.backends")]
    assert not [v for v in loaders if v.startswith("torch_tpu")], loaders


def test_selecting_tpu_here_fails_with_the_reason_and_the_install_command(monkeypatch):
    with pytest.raises(ac.BackendError) as err:
        ac.backend("tpu")
    msg = str(err.value)
    assert "backend 'tpu' (asked for by backend()) is unavailable: torch-tpu is not installed" in msg
    assert "pip install torch-tpu==0.2.0 'libtpu>=0.0.50'" in msg and "\n" not in msg
    monkeypatch.setenv("ANYCHIP_BACKEND", "tpu")
    with pytest.raises(ac.BackendError, match=r"asked for by \$ANYCHIP_BACKEND\) is unavailable: torch-tpu is not installed"):
        ac.backend()


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Fake what the probe reads: installed versions, importable modules, the PCI and /dev trees."""

    def make(versions=None, tpus=0, device="0x006f", vfio=True, accel=0, importable=(), gvnic=False):
        versions = {"torch": "2.13.0", "torch-tpu": "0.2.0", "libtpu": "0.0.51", **(versions or {})}
        monkeypatch.setattr(facts, "version", lambda d: versions.get(d))
        monkeypatch.setattr(facts, "versions", lambda *ds: {d: versions[d] for d in ds if versions.get(d)})
        monkeypatch.setattr(facts, "importable", lambda m: m in importable)
        root = tmp_path / str(len(list(tmp_path.iterdir())))  # a fresh tree per call
        sys_root, dev = root / "sys", root / "dev"
        (dev / "vfio").mkdir(parents=True)
        sys_root.mkdir()
        pci = [("0x1ae0", device)] * tpus + [("0x1ae0", "0x0042")] * gvnic  # 0x0042: gVNIC, not a TPU
        for i, (vendor, dev_id) in enumerate(pci):
            node = sys_root / f"0000:00:{i + 4:02x}.0"
            node.mkdir()
            (node / "vendor").write_text(vendor + "\n")
            (node / "device").write_text(dev_id + "\n")
            if vfio:
                (root / "groups" / str(i)).mkdir(parents=True)
                (node / "iommu_group").symlink_to(root / "groups" / str(i))
                (dev / "vfio" / str(i)).touch()
        for i in range(accel):
            (dev / f"accel{i}").touch()
        monkeypatch.setattr(tpu_facts, "PCI_ROOT", str(sys_root))
        monkeypatch.setattr(tpu_facts, "DEV_ROOT", str(dev))

    return make


def test_probe_installed_without_a_tpu_says_so_and_the_fix(machine):
    machine()
    avail = tpu.probe()
    assert not avail.available
    assert avail.reason == ("torch-tpu 0.2.0 is installed, but no TPU was found (no PCI device from Google, vendor 0x1ae0); "
                            "TorchTPU runs on a Cloud TPU VM")
    machine(gvnic=True)
    assert "(Google PCI devices, none of them a TPU)" in tpu.probe().reason


@pytest.mark.parametrize("torch_version, ok", [
    ("2.10.2", False), ("2.11.0", True), ("2.13.0+cpu", True), ("2.14.0.dev20260711", True), ("2.15.0", True), ("2.15.1", False),
])
def test_probe_checks_the_torch_versions_torch_tpu_supports(machine, torch_version, ok):
    machine({"torch": torch_version}, tpus=4)
    avail = tpu.probe()
    assert avail.available is ok
    if not ok:
        assert avail.reason == f"torch-tpu 0.2.0 needs torch 2.11 to 2.15, and torch {torch_version} is installed"
        assert avail.install == "pip install 'torch>=2.11,<=2.15'"


def test_probe_a_tpu_reached_through_accel_nodes_only(machine):
    machine(tpus=4, device="0x0063", vfio=False, accel=4)
    avail = tpu.probe()
    assert not avail.available
    assert avail.reason.startswith("4 TPU v5 lite chip(s) found, none bound to vfio (4 /dev/accel node(s)); torch-tpu 0.2.0 opens")
    assert avail.reason.endswith("use backend 'jax:tpu' on this VM")


def test_probe_a_tpu_without_libtpu(machine):
    machine({"libtpu": None}, tpus=8)
    avail = tpu.probe()
    assert not avail.available and avail.reason == "a TPU is present but libtpu is not installed"
    assert avail.install == "pip install 'libtpu>=0.0.50'" and avail.devices == 8 and avail.device_kind == "TPU v6 lite"


def test_probe_a_tpu_vm(machine, monkeypatch):
    machine(tpus=4, device="0x0076")
    avail = tpu.probe()
    assert avail.available and avail.devices == 4 and avail.device_kind == "TPU7x"
    assert avail.reason == "TorchTPU 0.2.0 (beta) on 4 TPU7x device(s)"
    assert avail.versions == {"torch": "2.13.0", "torch-tpu": "0.2.0", "libtpu": "0.0.51"}


def test_probe_warns_that_torch_tpu_autoload_takes_the_device_torchax_needs(machine, monkeypatch):
    machine(tpus=4, importable=("torchax",))
    monkeypatch.delenv(tpu.AUTOLOAD_ENV, raising=False)
    assert "set TORCH_DEVICE_BACKEND_AUTOLOAD=0 to run jax:* in this environment" in tpu.probe().reason
    monkeypatch.setenv(tpu.AUTOLOAD_ENV, "0")
    assert tpu.probe().reason == "TorchTPU 0.2.0 (beta) on 4 TPU v6 lite device(s)"


def test_auto_detect_tries_jax_tpu_before_tpu_and_devices_says_so(machine, monkeypatch):
    """On a TPU VM with both installed a plain ac.backend() is jax:tpu; 'tpu' only when named."""
    jax_backends = importlib.import_module("anychip.backends.jax")
    machine(tpus=4)
    monkeypatch.setenv(tpu.AUTOLOAD_ENV, "0")
    monkeypatch.setattr(jax_backends, "probe", lambda name: ac.Availability(name, name == "jax:tpu", "fake TPU"))
    monkeypatch.setattr(jax_backends, "create", lambda avail: f"<{avail.name}>")
    monkeypatch.setattr(tpu, "create", lambda avail: f"<{avail.name}>")
    assert ac.backend() == "<jax:tpu>"
    assert ac.backend("tpu") == "<tpu>"
    line = auto_detect_line(ac.list_backends())
    assert line.startswith("auto-detect picks 'jax:tpu'; also available, used only when named: 'tpu'")
    monkeypatch.setattr(jax_backends, "probe", lambda name: ac.Availability(name, False, "jax is not installed"))
    ac.reset()
    assert ac.backend() == "<tpu>"  # TorchTPU alone is auto-detected


@pytest.mark.parametrize("typed", ["torch-tpu", "tpuu", "jax-tpu"])
def test_a_tpu_like_name_is_answered_with_both_tpu_routes_and_what_each_is(typed):
    with pytest.raises(ac.UnknownBackendError) as err:
        ac.backend(typed)
    msg = str(err.value)
    assert "'tpu' (TorchTPU: native PyTorch on TPU (torch-tpu, beta))" in msg
    assert "'jax:tpu' (torch model traced to JAX via torchax, on TPU)" in msg


def test_tpu_runs_the_reference_kernels():
    from anychip.kernels import scope

    assert scope.family_of("tpu") == "reference"


TAKEN_BY_TORCHAX = """
import json, torch
torch.utils.rename_privateuse1_backend("jax")  # what `import torchax` does
from anychip.backends.registry import Availability
from anychip.backends.torch import tpu
try:
    tpu.create(Availability("tpu", True, "test"))
except Exception as exc:
    print(json.dumps([type(exc).__name__, str(exc)]))
"""


def test_create_refuses_a_process_whose_privateuse1_device_is_taken():
    """torchax (jax:*) registers PyTorch's one PrivateUse1 device as 'jax'; TorchTPU needs it too."""
    out = subprocess.run([sys.executable, "-c", TAKEN_BY_TORCHAX], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kind, message = json.loads(out.stdout)
    assert kind == "BackendError"
    assert message.startswith("backend 'tpu' cannot start in this process: PyTorch's PrivateUse1 device is already 'jax'")


def test_torchrun_without_torch_tpu_launch_environment_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv(tpu.LAUNCH_ENV, raising=False)
    backend = tpu.TpuBackend(ac.Availability("tpu", True, "test", devices=4, device_kind="TPU v6 lite"))
    with pytest.raises(ac.DistributedError, match=r'eval "\$\(python -m torch.tpu.distributed\)"'):
        backend.init_distributed()


def test_peak_of_one_tpu_device_comes_from_the_facts_table():
    one = lambda kind: tpu.TpuBackend(ac.Availability("tpu", True, "test", devices=4, device_kind=kind))  # noqa: E731
    assert one("TPU v6 lite").peak_flops("bf16") == pytest.approx(918e12)
    assert one("TPU7x").peak_flops("bf16") == pytest.approx(2307e12 / 2)  # a process drives one of a chip's two devices
    assert one("TPU v5 lite").peak_flops("fp32") is None


def test_bench_gives_a_row_to_each_tpu_route_with_its_reason(tmp_path):
    out = subprocess.run([sys.executable, "-m", "anychip.cli", "bench", "--backends", "tpu,jax:tpu", "--steps", "2",
                          "--json", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr  # a backend named but unavailable is a failed row
    rows = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert list(rows) == ["tpu", "jax:tpu"]
    assert rows["tpu"]["status"] == "unavailable" and rows["tpu"]["error"].startswith(tpu.probe().reason)
    assert rows["jax:tpu"]["status"] == "unavailable" and rows["jax:tpu"]["error"]


def test_the_readme_quotes_the_hint_the_code_gives():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    typed, quoted = re.search(r'`ac\.backend\("([^"]+)"\)` says "(Did you mean .*?\?)"', readme, flags=re.S).groups()
    with pytest.raises(ac.UnknownBackendError) as err:
        ac.backend(typed)
    assert " ".join(quoted.split()) in str(err.value)
