"""The native `neuron` backend without Trainium: neuron-ls outputs in the documented format, a fake
torch_neuronx module (never auto-selected), and the contract facts the backend must state."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

import anychip as ac
from anychip.backends.facts import host as facts
from anychip.backends.facts import neuron as neuron_facts
from anychip.backends.torch import neuron

# `neuron-ls --json-output` as documented (AWS Neuron SDK 2.33): a list of devices. No Trainium
# is reachable here, so these follow the documented fields rather than a hardware capture.
TRN2_LS = json.dumps(
    [
        {"neuron_device": i, "bdf": f"{i:02x}:00.0", "nc_count": 4, "memory_size": 103079215104,
         "neuroncore_ids": list(range(4 * i, 4 * i + 4)), "neuron_processes": []}
        for i in range(16)
    ]
)
TRN1_LS = json.dumps(
    [{"neuron_device": i, "nc_count": 2, "memory_size": 34359738368, "neuroncore_ids": [2 * i, 2 * i + 1]} for i in range(16)]
)


@pytest.fixture
def host(monkeypatch):
    """Fake the machine facts the probe reads."""

    def make(versions=None, ls=(0, TRN2_LS), nodes=16, product="trn2.48xlarge", python=(3, 12)):
        versions = {"torch": "2.13.0", "torch-neuronx": "2.13.1", **(versions or {})}
        monkeypatch.setattr(facts, "python_version", lambda: python)
        monkeypatch.setattr(facts, "version", lambda d: versions.get(d))
        monkeypatch.setattr(facts, "versions", lambda *ds: {d: versions[d] for d in ds if versions.get(d)})
        monkeypatch.setattr(facts, "device_files", lambda p: [f"/dev/neuron{i}" for i in range(nodes)])
        monkeypatch.setattr(facts, "run_tool", lambda argv, timeout=5.0: ls)
        monkeypatch.setattr(neuron_facts, "_chip_from_instance", lambda: product.split(".")[0] if product else "")

    return make


@pytest.fixture
def fake_torch_neuronx(monkeypatch):
    module = types.ModuleType("torch_neuronx")
    module.__anychip_fake__ = True
    monkeypatch.setitem(sys.modules, "torch_neuronx", module)
    return module


def test_lineage_from_version():
    assert neuron_facts.lineage("2.13.0") == "native"
    assert neuron_facts.lineage("2.14.1+abc") == "native"
    assert neuron_facts.lineage("2.9.0.2.11") == "xla"
    assert neuron_facts.lineage(None) is None


def test_probe_trn2_native(host):
    host()
    avail = neuron.probe()
    assert avail.available
    assert avail.devices == 64 and avail.device_kind == "trn2 NeuronCore"
    assert "trn2, trn3" in avail.reason


def test_torchneuron_needs_python_3_12(host):
    host(python=(3, 11))
    avail = neuron.probe()
    assert not avail.available
    assert avail.reason == "torch-neuronx 2.13.1 (TorchNeuron) needs Python >= 3.12, and this is Python 3.11"
    assert "Python >= 3.12" in avail.install


@pytest.mark.parametrize("tnx, torch_version, ok", [
    ("2.13.3", "2.13.0", True), ("2.14.3", "2.14.1", True), ("2.14.3", "2.13.0", False), ("2.13.3", None, False),
])
def test_torchneuron_is_matched_to_its_torch(host, tnx, torch_version, ok):
    host({"torch-neuronx": tnx, "torch": torch_version})
    avail = neuron.probe()
    assert avail.available is ok
    if not ok:
        want = ".".join(tnx.split(".")[:2])
        have = f"torch {torch_version} is installed" if torch_version else "torch is not installed"
        assert avail.reason == f"torch-neuronx {tnx} is built for torch {want}, and {have}"
        assert avail.install == f"pip install 'torch=={want}.*'"


def test_a_torchneuron_newer_than_the_releases_checked_says_so(host):
    host({"torch-neuronx": "2.15.0", "torch": "2.15.0"})
    avail = neuron.probe()
    assert avail.available and avail.reason.endswith("newer than the torch-neuronx 2.13 / 2.14 releases checked here")
    host({"torch-neuronx": "2.14.3", "torch": "2.14.0"})
    assert "newer than" not in neuron.probe().reason and neuron.probe().reason.startswith("TorchNeuron 2.14.3, serves trn2, trn3")


def test_the_install_hint_names_the_current_torchneuron_releases(host):
    host({"torch-neuronx": None})
    install = neuron.probe().install
    for text in ("torch-neuronx==2.14.3 'torch==2.14.*'", "torch-neuronx==2.13.3 pairs with torch 2.13", "Neuron SDK 2.33",
                 "trn2/trn3", "Python >= 3.12", "https://pip.repos.neuron.amazonaws.com"):
        assert text in install, text


@pytest.mark.parametrize(
    "ls, note",
    [
        (None, "neuron-ls not installed"),
        ((1, "failed to discover Neuron devices\n"), "neuron-ls failed: failed to discover Neuron devices"),
        ((0, "{not json"), "not JSON"),
        ((0, json.dumps({"devices": 3})), "not a list of devices"),
    ],
)
def test_neuron_ls_problems_fall_back_to_dev_nodes(host, ls, note):
    host(ls=ls, nodes=2)
    avail = neuron.probe()
    assert avail.available and avail.devices == 2 * 4  # trn2: 4 logical cores per chip
    assert note in avail.reason


def test_no_devices_names_what_is_missing(host):
    host(ls=(1, "failed to discover Neuron devices"), nodes=0)
    avail = neuron.probe()
    assert not avail.available
    assert "no Neuron devices" in avail.reason and "failed to discover" in avail.reason


def test_not_installed_gives_the_install_command(host):
    host(versions={"torch-neuronx": None})
    avail = neuron.probe()
    assert not avail.available and "pip.repos.neuron.amazonaws.com" in avail.install


def test_xla_lineage_points_to_neuron_xla(host):
    host(versions={"torch-neuronx": "2.9.0.2.11"}, ls=(0, TRN1_LS), product="trn1.32xlarge")
    avail = neuron.probe()
    assert not avail.available and "use backend 'neuron-xla'" in avail.reason and "trn1" in avail.reason


def test_both_lineages_installed_is_a_conflict(host):
    host(versions={"torch-xla": "2.9.0"})
    avail = neuron.probe()
    assert not avail.available and "both Neuron lineages" in avail.reason and "uninstall torch-xla" in avail.reason


def test_explicit_request_without_devices_fails_loudly(host):
    host(ls=(1, "failed to discover Neuron devices"), nodes=0)
    with pytest.raises(ac.BackendError, match="backend 'neuron'.*no Neuron devices"):
        ac.backend("neuron")


def test_backend_facts_with_fake_torch_neuronx(host, fake_torch_neuronx, monkeypatch):
    host()
    be = ac.backend("neuron")
    assert be.name == "neuron"
    assert be.traits.device_type == "neuron"  # also the autocast device type used by the torch engine
    assert be.traits.dist_backend == "neuron"
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    be.compile(lambda: None)
    assert seen == {"backend": "neuron", "fullgraph": True, "dynamic": False}
    groups, bound = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: groups.append(backend))
    monkeypatch.setattr(torch.accelerator, "set_device_index", bound.append)
    be.init_distributed()
    assert groups == ["neuron"] and bound == [1]  # this rank's device first, then the group


def test_device_string_in_a_fresh_process():
    """TorchNeuron is an out-of-tree PrivateUse1 device named "neuron" by `import torch_neuronx`.
    The name can be set once per process (torchax takes it for "jax"), so check in a new one."""
    code = (
        "import sys, types, torch\n"
        "fake = types.ModuleType('torch_neuronx')\n"
        "torch.utils.rename_privateuse1_backend('neuron')\n"
        "sys.modules['torch_neuronx'] = fake\n"
        "from anychip.backends.registry import Availability\nfrom anychip.backends.torch import neuron\n"
        "be = neuron.create(Availability('neuron', True, 'fake', devices=1, device_kind='trn2 NeuronCore'))\n"
        "print(be.device)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "neuron"


def test_never_auto_selected_without_devices(host, fake_torch_neuronx):
    host(nodes=0, ls=None)
    assert ac.backend().name != "neuron"


@pytest.mark.parametrize(
    "env, cores",
    [({}, 1), ({"NEURON_RT_NUM_CORES": "4"}, 4), ({"NEURON_RT_VISIBLE_CORES": "0-3"}, 4), ({"NEURON_RT_VISIBLE_CORES": "0,2,5-6"}, 4)],
)
def test_peak_flops_per_core_in_use(host, fake_torch_neuronx, monkeypatch, env, cores):
    for k in ("NEURON_RT_NUM_CORES", "NEURON_RT_VISIBLE_CORES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    host()
    be = ac.backend("neuron")
    # Trainium2: 667 TFLOP/s bf16 per chip, 4 logical NeuronCores per chip at LNC=2
    assert be.peak_flops("bf16") == pytest.approx(667e12 / 4 * cores)


def test_dynamic_shapes_warn_before_the_first_compile(host, fake_torch_neuronx, monkeypatch, caplog):
    import logging

    from anychip.backends.torch.base import NativeTorchBackend

    host()
    be = ac.backend("neuron")
    # no Neuron device here: stop at the placement, which is where the warning must come from
    monkeypatch.setattr(NativeTorchBackend, "place_batch", lambda self, batch: batch)
    x = torch.zeros(2, 16, dtype=torch.long)
    torch._dynamo.mark_dynamic(x, 1)
    with caplog.at_level(logging.WARNING, logger="anychip"):
        be.place_batch((x, x.clone()))
        be.place_batch((x, x))
    assert caplog.text.count("neuron compiles static shapes only; batch dims [1]") == 1
    plain = ac.backend("neuron")
    assert plain is be
