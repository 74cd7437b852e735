"""The `neuron-xla` probe with faked machine facts (no torch_xla in this venv), and what this
machine really says. The backend itself is tested in tests/xla/, inside the torch_xla venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import anychip as ac
from anychip.backends.facts import host as facts
from anychip.backends.facts import neuron
from anychip.backends.torch import neuron_xla

# `neuron-ls --json-output` on a trn1.32xlarge, documented format: 16 chips x 2 NeuronCore-v2.
TRN1_LS = json.dumps(
    [{"neuron_device": i, "nc_count": 2, "memory_size": 34359738368, "neuroncore_ids": [2 * i, 2 * i + 1]} for i in range(16)]
)
XLA_STACK = {"torch": "2.9.0", "torch-xla": "2.9.0", "torch-neuronx": "2.9.0.2.11.19965"}  # what torch-neuronx 2.9 installs


@pytest.fixture
def host(monkeypatch):
    """Fake the facts the probe reads: installed versions, PJRT_DEVICE, /dev/neuron*, neuron-ls, DMI."""

    def make(versions, pjrt=None, ls=None, nodes=0, product=""):
        monkeypatch.setattr(facts, "version", lambda d: versions.get(d))
        monkeypatch.setattr(facts, "versions", lambda *ds: {d: versions[d] for d in ds if versions.get(d)})
        monkeypatch.setattr(facts, "device_files", lambda p: [f"/dev/neuron{i}" for i in range(nodes)] if "neuron" in p else [])
        monkeypatch.setattr(facts, "run_tool", lambda argv, timeout=5.0: ls)
        monkeypatch.setattr(neuron, "_chip_from_instance", lambda: product.split(".")[0])
        for var in ("PJRT_DEVICE", "CPU_NUM_DEVICES"):
            monkeypatch.delenv(var, raising=False)
        if pjrt is not None:
            monkeypatch.setenv("PJRT_DEVICE", pjrt)

    return make


def test_trn1_host_with_the_xla_lineage(host):
    host(XLA_STACK, ls=(0, TRN1_LS), nodes=16, product="trn1.32xlarge")
    avail = neuron_xla.probe()
    assert avail.available
    assert avail.devices == 32 and avail.device_kind == "trn1 NeuronCore"
    assert "torch-neuronx 2.9.0.2.11.19965 is the XLA lineage" in avail.reason and neuron.SERVES["xla"] in avail.reason
    assert avail.versions["torch-xla"] == "2.9.0"


def test_on_trn1_it_says_the_stack_is_frozen_on_torch_neuronx_2_9(host):
    host(XLA_STACK, ls=(0, TRN1_LS), nodes=16, product="trn1.32xlarge")
    reason = neuron_xla.probe().reason
    assert reason.endswith("; frozen on torch-neuronx 2.9 (Neuron SDK <= 2.29; Neuron 2.30 ended PyTorch/XLA training)")
    host({"torch": "2.5.1", "torch-xla": "2.5.1", "torch-neuronx": "2.5.1.2.4.0"}, ls=(0, TRN1_LS), nodes=16, product="trn1.32xlarge")
    assert neuron_xla.probe().reason.endswith("; torch-neuronx 2.5.1.2.4.0 predates 2.9, the release followed here")


def test_the_install_hint_is_the_frozen_trn1_stack(host):
    host({})
    install = neuron_xla.probe().install
    assert install.startswith("pip install torch-neuronx==2.9.* --extra-index-url https://pip.repos.neuron.amazonaws.com (on a trn1")
    assert "Neuron SDK <= 2.29, the last with PyTorch/XLA training" in install


def test_trn1_host_without_neuron_ls_counts_device_nodes(host):
    host(XLA_STACK, ls=None, nodes=16, product="trn1.32xlarge")
    avail = neuron_xla.probe()
    assert avail.available and avail.devices == 32 and "neuron-ls not installed" in avail.reason


def test_xla_lineage_without_devices_says_how_to_test(host):
    host(XLA_STACK, ls=(1, "failed to discover Neuron devices"), nodes=0)
    avail = neuron_xla.probe()
    assert not avail.available
    assert "no Neuron devices" in avail.reason and "set PJRT_DEVICE=CPU" in avail.reason


@pytest.mark.parametrize("pjrt, cpus, devices", [("CPU", None, 1), ("cpu", "4", 4)])
def test_pjrt_cpu_for_testing(host, monkeypatch, pjrt, cpus, devices):
    host({"torch": "2.9.0+cu128", "torch-xla": "2.9.0"}, pjrt=pjrt)
    if cpus:
        monkeypatch.setenv("CPU_NUM_DEVICES", cpus)
    avail = neuron_xla.probe()
    assert avail.available and avail.device_kind == "PJRT CPU" and avail.devices == devices
    assert "PJRT_DEVICE=CPU" in avail.reason and "torch-neuronx is not installed" in avail.reason


def test_pjrt_device_wins_over_a_neuron_host(host):
    host(XLA_STACK, pjrt="CPU", ls=(0, TRN1_LS), nodes=16, product="trn1.32xlarge")
    avail = neuron_xla.probe()
    assert avail.available and avail.device_kind == "PJRT CPU" and "XLA lineage" in avail.reason


@pytest.mark.parametrize("pjrt", [None, "CPU"])
def test_torch_and_torch_xla_versions_must_match(host, pjrt):
    host({"torch": "2.13.0+cpu", "torch-xla": "2.9.0"}, pjrt=pjrt)
    avail = neuron_xla.probe()
    assert not avail.available
    assert "ABI mismatch: torch 2.13.0+cpu with torch-xla 2.9.0" in avail.reason
    assert avail.install == "pip install 'torch==2.9.*'"


def test_both_lineages_installed_is_a_conflict(host):
    host({"torch": "2.13.0", "torch-xla": "2.9.0", "torch-neuronx": "2.13.1"}, pjrt="CPU", ls=(0, TRN1_LS), nodes=16)
    avail = neuron_xla.probe()
    assert not avail.available
    assert "both Neuron lineages are installed" in avail.reason
    assert "torch-neuronx 2.13.1 is the native lineage" in avail.reason and neuron.SERVES["native"] in avail.reason
    assert "separate virtualenv" in avail.reason


def test_native_lineage_alone_points_to_neuron(host):
    host({"torch": "2.13.0", "torch-neuronx": "2.13.1"})
    avail = neuron_xla.probe()
    assert not avail.available and "use backend 'neuron'" in avail.reason and "pip.repos.neuron.amazonaws.com" in avail.install


def test_nothing_installed(host):
    host({"torch": "2.13.0"})
    avail = neuron_xla.probe()
    assert not avail.available
    assert avail.reason.startswith("torch-xla is not installed (torch-neuronx is not installed)")
    assert neuron.SERVES["xla"] in avail.reason and "PJRT_DEVICE=CPU" in avail.reason
    assert avail.install.startswith("pip install torch-neuronx==2.9.* --extra-index-url https://pip.repos.neuron.amazonaws.com")


@pytest.mark.parametrize("pjrt, told", [(None, "PJRT_DEVICE is not set"), ("NEURON", "PJRT_DEVICE=NEURON is set but")])
def test_torch_xla_alone_needs_pjrt_device_or_torch_neuronx(host, pjrt, told):
    host({"torch": "2.9.0", "torch-xla": "2.9.0"}, pjrt=pjrt)
    avail = neuron_xla.probe()
    assert not avail.available and told in avail.reason and "set PJRT_DEVICE=CPU" in avail.reason


def test_explicit_request_names_what_is_missing(host):
    host({"torch": "2.9.0", "torch-xla": "2.9.0"})
    with pytest.raises(ac.BackendError, match=r"backend 'neuron-xla'.*PJRT_DEVICE is not set.*Install: pip install torch-neuronx==2.9"):
        ac.backend("neuron-xla")


def test_never_auto_selected_when_unavailable(host):
    host({"torch": "2.9.0", "torch-xla": "2.9.0"})
    assert ac.backend().name != "neuron-xla"


@pytest.mark.parametrize("cores_env, cores", [({}, 1), ({"NEURON_RT_NUM_CORES": "2"}, 2), ({"NEURON_RT_VISIBLE_CORES": "0-7"}, 8)])
def test_peak_flops_per_neuroncore_in_use(monkeypatch, cores_env, cores):
    for k in ("NEURON_RT_NUM_CORES", "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in cores_env.items():
        monkeypatch.setenv(k, v)
    trn1 = neuron_xla.NeuronXlaBackend(ac.Availability("neuron-xla", True, "", 32, "trn1 NeuronCore"), device=None)
    assert trn1.devices_in_use == cores
    assert trn1.peak_flops("bf16") == pytest.approx(190e12 / 2 * cores)  # Trainium1: 190 TFLOP/s per 2-core chip
    cpu = neuron_xla.NeuronXlaBackend(ac.Availability("neuron-xla", True, "", 1, "PJRT CPU"), device=None)
    assert cpu.devices_in_use == 1 and cpu.peak_flops("bf16") is None


# -- this machine, unfaked -----------------------------------------------------------------------------


def _here_without_pjrt() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PJRT_DEVICE"}


def test_devices_json_is_truthful_here():
    out = subprocess.run([sys.executable, "-m", "anychip.cli", "devices", "--json"], capture_output=True, text=True,
                         timeout=300, env=_here_without_pjrt())
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout)["backends"] if r["name"] == "neuron-xla")
    installed = {d: facts.version(d) for d in ("torch", "torch-xla", "torch-neuronx")}
    assert row["versions"] == {d: v for d, v in installed.items() if v}
    if installed["torch-xla"] is None:
        assert row["available"] is False and row["reason"].startswith("torch-xla is not installed")
        assert "pip.repos.neuron.amazonaws.com" in row["install"]
    assert neuron.SERVES["xla"] in row["reason"] or neuron.SERVES["native"] in row["reason"]


def test_asked_for_here_fails_with_one_line():
    out = subprocess.run([sys.executable, "-m", "anychip.cli", "train", "--backend", "neuron-xla", "--steps", "1"],
                         capture_output=True, text=True, timeout=300, env=_here_without_pjrt())
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    missing = "torch-xla is not installed" if facts.version("torch-xla") is None else "PJRT_DEVICE"
    assert "backend 'neuron-xla'" in out.stderr and missing in out.stderr, out.stderr


@pytest.mark.parametrize("flags, expected", [(None, "--auto-cast=none"), ("--auto-cast=matmult -O2", "--auto-cast=matmult -O2")])
def test_create_on_trn1_keeps_fp32_unless_told_otherwise(monkeypatch, flags, expected):
    """create() on a Neuron host, with stand-ins for torch_neuronx / torch_xla (the real ones only
    load on Trainium with torch 2.9): PJRT client NEURON, and no silent fp32->bf16 matmul cast."""
    import types

    import torch

    imported = []
    fake_neuronx = types.ModuleType("torch_neuronx")
    fake_xla = types.ModuleType("torch_xla")
    fake_xla.device = lambda: imported.append("device") or torch.device("cpu")
    monkeypatch.setitem(sys.modules, "torch_neuronx", fake_neuronx)
    monkeypatch.setitem(sys.modules, "torch_xla", fake_xla)
    # create() writes these: set-then-delete so that monkeypatch restores them afterwards.
    for var in ("PJRT_DEVICE", "NEURON_CC_FLAGS", "NEURON_RT_NUM_CORES", "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    if flags is not None:
        monkeypatch.setenv("NEURON_CC_FLAGS", flags)
    be = neuron_xla.create(ac.Availability("neuron-xla", True, "", 32, "trn1 NeuronCore"))
    assert os.environ["PJRT_DEVICE"] == "NEURON" and os.environ["NEURON_CC_FLAGS"] == expected
    assert imported == ["device"] and be.device == torch.device("cpu") and be.devices_in_use == 1
