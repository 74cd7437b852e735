"""Backend registry: selection precedence, every error path, probes that import nothing heavy."""

from __future__ import annotations

import json
import pathlib
import re
import logging
import subprocess
import sys

import pytest

import anychip as ac
from anychip.backends import Availability, Registration, register, registrations, reset, unregister
from anychip.backends.facts import host as facts
from anychip.backends.facts import tpu
from anychip.backends.torch import cuda as cuda_backend

def _readme_backends() -> set[str]:
    """The backends of the README's support matrix (its first table), which must be exactly
    the built-in registrations: the two are written separately and must not drift apart."""
    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    table = readme.read_text().split("## Backends and what has been verified", 1)[1].split("\n\n")[1]
    return {m for m in re.findall(r"^\| `([a-z:-]+)` \|", table, flags=re.M)}


README_BACKENDS = _readme_backends()


def test_the_readme_support_matrix_lists_exactly_the_built_in_backends():
    from anychip.backends import REGISTRY

    assert README_BACKENDS == {r.name for r in REGISTRY}


# A test-only module standing in for a backend module: probe() + create().
class _FakeModule:
    def __init__(self, available: bool, reason: str = "fake"):
        self.available, self.reason = available, reason

    def probe(self, name):
        return Availability(name, self.available, self.reason, devices=1, install="pip install fake-sdk")

    def create(self, availability):
        from anychip.backends.torch.cpu import CpuBackend

        backend = CpuBackend(availability)
        backend.name = availability.name
        return backend


@pytest.fixture
def fake_backends(monkeypatch):
    """Register test-only backends living in fake modules; removed afterwards."""
    added = []

    def add(name, available, priority=1000, auto=True, reason="fake"):
        module = f"_anychip_fake_{name.replace('-', '_')}"
        monkeypatch.setitem(sys.modules, module, _FakeModule(available, reason))
        register(Registration(name, module, priority, auto=auto))
        added.append(name)

    yield add
    for name in added:
        unregister(name)


def test_every_design_backend_is_registered_and_probed():
    names = {a.name for a in ac.backends()}
    assert README_BACKENDS <= names
    for a in ac.backends():
        assert a.reason, f"{a.name} gives no reason"


def test_backends_are_listed_in_priority_order():
    prios = [r.priority for r in registrations()]
    assert prios == sorted(prios, reverse=True)


def test_cpu_always_available_and_auto_selected_here():
    avail = {a.name: a for a in ac.backends()}
    assert avail["cpu"].available
    expected = next(r.name for r in registrations() if r.auto and avail[r.name].available)
    assert ac.backend().name == expected


def test_explicit_beats_environment(monkeypatch, fake_backends):
    fake_backends("fake-env", True, auto=False)
    monkeypatch.setenv("ANYCHIP_BACKEND", "fake-env")
    assert ac.backend().name == "fake-env"
    assert ac.backend("cpu").name == "cpu"


def test_environment_beats_auto(monkeypatch, fake_backends):
    fake_backends("fake-auto", True, priority=10_000)
    fake_backends("fake-env", True, auto=False)
    assert ac.backend().name == "fake-auto"
    reset()
    monkeypatch.setenv("ANYCHIP_BACKEND", "fake-env")
    assert ac.backend().name == "fake-env"


def test_environment_is_as_strict_as_explicit(monkeypatch, fake_backends):
    fake_backends("fake-missing", False, reason="no fake device")
    monkeypatch.setenv("ANYCHIP_BACKEND", "fake-missing")
    with pytest.raises(ac.BackendError, match=r"\$ANYCHIP_BACKEND.*no fake device.*pip install fake-sdk"):
        ac.backend()


def test_auto_skips_unavailable_quietly_and_logs_why(fake_backends, caplog):
    fake_backends("fake-missing", False, priority=10_000, reason="no fake device")
    with caplog.at_level(logging.INFO, logger="anychip"):
        chosen = ac.backend()
    assert chosen.name != "fake-missing"
    assert "skipping backend 'fake-missing': no fake device" in caplog.text


def test_non_auto_backend_is_never_auto_selected(fake_backends):
    fake_backends("fake-manual", True, priority=10_000, auto=False)
    assert ac.backend().name != "fake-manual"


def test_explicit_unavailable_names_reason_and_install(fake_backends):
    fake_backends("fake-missing", False, reason="no fake device")
    with pytest.raises(ac.BackendError) as err:
        ac.backend("fake-missing")
    msg = str(err.value)
    assert "'fake-missing'" in msg and "no fake device" in msg and "pip install fake-sdk" in msg
    assert "\n" not in msg


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(ac.UnknownBackendError) as err:
        ac.backend("cdua")
    msg = str(err.value)
    assert "Did you mean 'cuda' (PyTorch on NVIDIA GPUs)?" in msg
    for name in README_BACKENDS:
        assert name in msg


@pytest.mark.parametrize("typed, meant", [
    ("jxa:cpu", ["'jax:cpu' (torch model traced to JAX via torchax, on CPU)", "'cpu' (PyTorch on the CPU)"]),
    ("xla", ["'neuron-xla' (torch_xla lazy tensors"]),  # no close spelling: the device word finds it
    ("jaxx", ["'jax' (alias: the first available of jax:tpu, jax:gpu, jax:cpu)"]),
])
def test_the_hint_says_what_each_suggestion_means_and_names_the_others_on_that_device(typed, meant):
    with pytest.raises(ac.UnknownBackendError) as err:
        ac.backend(typed)
    hint = str(err.value).split("Did you mean ")[1].split("? Known backends")[0]
    for text in meant:
        assert text in hint
    assert hint.count("'") == 2 * len(meant)  # nothing suggested beyond them


def test_no_hint_for_a_name_like_no_backend():
    with pytest.raises(ac.UnknownBackendError) as err:
        ac.backend("zzz")
    assert "Did you mean" not in str(err.value)


def test_unknown_name_is_also_a_value_error():
    with pytest.raises(ValueError):
        ac.backend("tpu-v9")


def test_non_string_name():
    with pytest.raises(TypeError, match="must be a string"):
        ac.backend(3)


def test_selection_is_cached_and_reset_clears_it():
    first = ac.backend("cpu")
    assert ac.backend("cpu") is first
    ac.reset()
    assert ac.backend("cpu") is not first


def test_jax_alias_resolves_in_documented_order(monkeypatch):
    order = []

    def fake_probe(self):
        order.append(self.name)
        return Availability(self.name, False, "not in this test")

    monkeypatch.setattr(Registration, "probe", fake_probe)
    with pytest.raises(ac.BackendError, match="jax:tpu: not in this test; jax:gpu: .*; jax:cpu: "):
        ac.backend("jax")
    assert order == ["jax:tpu", "jax:gpu", "jax:cpu"]


def test_registration_is_validated():
    with pytest.raises(ValueError):
        Registration("", "anychip.backends.torch.cpu", 1)
    with pytest.raises(ValueError):
        Registration("Upper", "anychip.backends.torch.cpu", 1)
    with pytest.raises(ValueError):
        Registration("x", "not a module", 1)
    with pytest.raises(TypeError):
        Registration("x", "anychip.backends.torch.cpu", 1.5)
    with pytest.raises(ValueError, match="already registered"):
        register(Registration("cpu", "anychip.backends.torch.cpu", 1))


def test_a_probe_that_raises_is_reported_not_raised(monkeypatch):
    class Broken:
        @staticmethod
        def probe(name):
            raise OSError("driver exploded")

    monkeypatch.setitem(sys.modules, "_anychip_broken", Broken)
    avail = Registration("broken", "_anychip_broken", 1).probe()
    assert not avail.available and "driver exploded" in avail.reason


# -- the cuda probe, with the machine facts faked ---------------------------------------------------


def test_cuda_probe_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(facts, "version", lambda d: "2.13.0+cpu" if d == "torch" else None)
    avail = cuda_backend.probe()
    assert not avail.available and "CPU-only build" in avail.reason and "download.pytorch.org" in avail.install


def test_cuda_probe_without_gpu(monkeypatch):
    monkeypatch.setattr(facts, "version", lambda d: "2.11.0" if d == "torch" else None)
    monkeypatch.setattr(facts, "device_files", lambda pattern: [])
    avail = cuda_backend.probe()
    assert not avail.available and "/dev/nvidia0" in avail.reason


def test_cuda_probe_with_gpus(monkeypatch):
    monkeypatch.setattr(facts, "version", lambda d: "2.11.0+cu130" if d == "torch" else None)
    monkeypatch.setattr(facts, "device_files", lambda pattern: ["/dev/nvidia0", "/dev/nvidia1"])
    monkeypatch.setattr(
        facts, "run_tool", lambda argv, timeout=5.0: (0, "NVIDIA H100 80GB HBM3, 580.159.04\nNVIDIA H100 80GB HBM3, 580.159.04\n")
    )
    avail = cuda_backend.probe()
    assert avail.available and avail.devices == 2
    assert avail.device_kind == "NVIDIA H100 80GB HBM3" and avail.versions["driver"] == "580.159.04"


def test_device_files_ignores_control_nodes(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert facts.device_files(str(tmp_path / "nvidia")) == [str(tmp_path / "nvidia0"), str(tmp_path / "nvidia1")]


def test_tpu_chips_count_tpus_not_every_google_device(tmp_path):
    # The gVNIC network card of a GCE VM shares Google's vendor id; only TPU device ids count.
    for i, (vendor, device) in enumerate((("0x1ae0", "0x005e"), ("0x10de", "0x2330"), ("0x1ae0", "0x0042"))):
        (tmp_path / f"0000:00:0{i}.0").mkdir()
        (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
        (tmp_path / f"0000:00:0{i}.0" / "device").write_text(device + "\n")
    assert tpu.tpu_chips(str(tmp_path)) == (1, "TPU v4", True)


# -- probing never imports a heavy SDK -----------------------------------------------------------------


def test_probing_imports_no_heavy_sdk():
    code = (
        "import sys, json, anychip; anychip.backends();"
        "heavy = {'torch', 'jax', 'jaxlib', 'torchax', 'torch_xla', 'torch_neuronx', 'torch_tpu', 'libtpu', 'triton', 'optax'};"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_availability_dict_round_trips_through_json():
    data = json.loads(json.dumps([a.as_dict() for a in ac.backends()]))
    assert {d["name"] for d in data} >= README_BACKENDS
    assert all(isinstance(d["available"], bool) for d in data)


def _tpu_pci(root, name: str, device: str, group: str | None) -> None:
    pci = root / "sys" / name
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1ae0\n")
    (pci / "device").write_text(device + "\n")
    if group is not None:
        (root / "groups" / group).mkdir(parents=True, exist_ok=True)
        (pci / "iommu_group").symlink_to(root / "groups" / group)


def test_tpu_host_counts_the_vfio_bound_tpus_and_the_accel_nodes(tmp_path):
    _tpu_pci(tmp_path, "0000:00:04.0", "0x006f", "7")  # bound: /dev/vfio/7 exists
    _tpu_pci(tmp_path, "0000:00:05.0", "0x006f", "8")  # in an IOMMU group with no vfio node
    _tpu_pci(tmp_path, "0000:00:06.0", "0x006f", None)  # no IOMMU group at all
    (tmp_path / "dev" / "vfio").mkdir(parents=True)
    (tmp_path / "dev" / "vfio" / "7").touch()
    (tmp_path / "dev" / "vfio" / "vfio").touch()  # the vfio control node is no group
    for name in ("accel0", "accel1", "accelctl"):
        (tmp_path / "dev" / name).touch()
    found = tpu.tpu_host(str(tmp_path / "sys"), str(tmp_path / "dev"))
    assert found == tpu.TpuHost(chips=3, kind="TPU v6 lite", google=True, vfio=1, accel=2)
    assert tpu.tpu_host(str(tmp_path / "nothing"), str(tmp_path / "nothing")) == tpu.TpuHost(0, "", False, 0, 0)
