"""Every TorchTPU name and behaviour the `tpu` backend relies on, checked in the real torch-tpu 0.2.0
package on a CPU: what can run without a TPU runs (the import, the compile-backend registration,
TorchTPU's AdamW, `create()`'s refusal), the rest is read from the package's own code and data."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import pathlib
import types

import pytest
import torch
import torch_tpu
from packaging.requirements import Requirement

import anychip as ac
from anychip.backends.facts import tpu as tpu_facts
from anychip.backends.torch import tpu
from anychip.backends.torch.cpu import CpuBackend

ROOT = pathlib.Path(torch_tpu.__file__).parent


def _source_tree(module) -> ast.Module:
    return ast.parse(inspect.getsource(module))


def _calls(tree, name: str) -> list[ast.Call]:
    """Every call of ``name`` (a function or a method) in ``tree``."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]


def _function(module, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(_source_tree(module)) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_release_and_its_requirements_are_the_ones_the_probe_states():
    assert importlib.metadata.version("torch-tpu") == "0.2.0"
    reqs = {r.name: r.specifier for r in map(Requirement, importlib.metadata.requires("torch-tpu"))}
    (low, high) = (".".join(map(str, v)) for v in tpu.TORCH_RANGE)
    assert low in reqs["torch"] and high in reqs["torch"]
    assert "2.10.9" not in reqs["torch"] and "2.15.1" not in reqs["torch"]
    assert f"'libtpu{reqs['libtpu']}'" in tpu.INSTALL
    assert importlib.util.find_spec("libtpu") is None  # the condition every check here runs under


def test_the_torch_entry_point_is_the_loader_create_calls():
    points = {e.name: e.value for e in importlib.metadata.entry_points(group="torch.backends")}
    assert points.get("torch_tpu") == "torch_tpu._loader:load"
    from torch_tpu import _loader

    assert not [p for p in inspect.signature(_loader.load).parameters.values() if p.default is p.empty]


def test_importing_it_registers_no_device_and_starts_nothing_here():
    from torch_tpu import _loader

    assert torch._C._get_privateuse1_backend_name() == "privateuseone"
    assert _loader._DEVICE_INITIALIZED is False
    assert torch._dynamo.config.allow_rnn is True  # the side effect the backend documents


def test_load_registers_the_tpu_device_and_the_tpu_process_group():
    from torch_tpu import _loader

    load = _function(_loader, "load")
    assert [ast.literal_eval(c.args[0]) for c in _calls(load, "_init_device")] == ["tpu"]
    init = _function(_loader, "_init_device_impl")
    assert _calls(init, "rename_privateuse1_backend")
    assert {ast.literal_eval(c.args[0]) for c in _calls(init, "register_backend")} == {tpu.TpuBackend.traits.dist_backend, "tpu_dist"}


def test_the_compile_backend_is_registered_under_the_name_the_backend_uses():
    import torch_tpu._internal.compile  # noqa: F401 - registers it, as load() does

    assert tpu.TpuBackend.traits.compile_backend in torch._dynamo.list_backends(exclude_tags=())


def test_autocast_on_tpu_supports_bfloat16():
    from torch_tpu._internal.device._device_module import TpuDeviceModule

    assert torch.bfloat16 in TpuDeviceModule.get_amp_supported_dtype()


def test_the_rng_generators_are_public_and_not_internal():
    """From torch 2.13 on, torch.tpu.get_rng_state refuses callers outside torch; the backend uses
    the default generators, which are an experimental (callable) public name of torch.tpu."""
    from torch_tpu._internal import public_api
    from torch_tpu._internal.device import _device_module
    from torch_tpu._internal.utils.annotations import Stage

    target = public_api._PUBLIC_MODULES["torch.tpu"].exports["default_generators"]
    assert target == "torch_tpu._internal.device._device_module:TpuDeviceModule.default_generators"
    assert _device_module.__tt_api_stages__["default_generators"].stage is Stage.EXPERIMENTAL


def test_its_allocator_serves_torch_accelerator_memory_statistics():
    """torch.accelerator.memory_allocated and reset_peak_memory_stats, which the backend reads, go
    to the device allocator's getDeviceStats / resetPeakStats: TorchTPU's glue for this torch has both."""
    from torch_tpu import _versioned_so_loader

    suffix = _versioned_so_loader.version_suffix(torch.__version__)
    glue = (ROOT / "csrc" / "common" / f"glue_{suffix}" / f"libpywrap_{suffix}_common.so").read_bytes()
    for symbol in (b"_ZN9torch_tpu12TpuAllocator14getDeviceStatsEa", b"_ZN9torch_tpu12TpuAllocator14resetPeakStatsEa"):
        assert symbol in glue, symbol


def test_the_launch_helper_sets_the_variable_the_backend_checks():
    from torch_tpu._internal import public_api
    from torch_tpu._internal.distributed import distributed

    assert public_api._PUBLIC_MODULES["torch.tpu.distributed"].main == distributed.__name__  # python -m torch.tpu.distributed
    assert list(inspect.signature(distributed.set_tpu_launch_env).parameters) == ["nnodes", "nproc_per_node"]
    sets = {ast.literal_eval(c.args[0]) for c in _calls(_source_tree(distributed), "get_and_set_str_env_once")}
    assert tpu.LAUNCH_ENV in sets


def test_the_pci_ids_and_the_device_count_agree_with_torch_tpu(tmp_path, monkeypatch):
    """The probe counts what torch-tpu counts before its runtime starts: TPU PCI devices bound to vfio."""
    from torch_tpu._internal.utils import hardware

    assert set(hardware._PCI_DEVICE_ID_TO_NAME) <= set(tpu_facts.TPU_PCI_DEVICES)
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    for i, (device, bound) in enumerate((("0x006f", True), ("0x006f", True), ("0x006f", False), ("0x0042", True))):
        node = sysfs / f"0000:00:0{i + 4}.0"
        node.mkdir(parents=True)
        (node / "vendor").write_text("0x1ae0\n")
        (node / "device").write_text(device + "\n")
        (tmp_path / "groups" / str(i)).mkdir(parents=True)
        (node / "iommu_group").symlink_to(tmp_path / "groups" / str(i))
        if bound:
            (dev / "vfio" / str(i)).touch()
    paths = {"/sys/bus/pci/devices": sysfs, "/dev/vfio": dev / "vfio"}
    real = pathlib.Path
    monkeypatch.setattr(hardware, "pathlib", types.SimpleNamespace(Path=lambda p, *rest: real(paths.get(str(p), p), *rest)))
    assert hardware.get_tpu_device_count() == tpu_facts.tpu_host(str(sysfs), str(dev)).vfio == 2


def test_the_probe_here_says_installed_no_tpu_and_the_fix():
    if tpu_facts.tpu_host().chips:
        pytest.skip("this machine has a TPU: the no-TPU answer does not apply")
    avail = tpu.probe()
    assert not avail.available
    assert avail.reason.startswith("torch-tpu 0.2.0 is installed, but no TPU was found (")
    assert avail.reason.endswith("); TorchTPU runs on a Cloud TPU VM")
    assert avail.versions["torch-tpu"] == "0.2.0" and "libtpu" not in avail.versions
    with pytest.raises(ac.BackendError) as err:
        ac.backend("tpu")
    assert f"backend 'tpu' (asked for by backend()) is unavailable: {avail.reason}" in str(err.value)


def test_create_with_the_real_package_and_no_tpu_fails_cleanly_and_starts_nothing():
    from torch_tpu import _loader

    with pytest.raises(ac.BackendError, match="torch-tpu registered no 'tpu' device: it found no vfio-bound TPU"):
        tpu.create(ac.Availability("tpu", True, "forced for the test"))
    assert torch._C._get_privateuse1_backend_name() == "privateuseone" and _loader._DEVICE_INITIALIZED is False


class TpuOptimizerOnTheCpu(tpu.TpuBackend):
    """The tpu backend with the CPU's placement, compilation and autocast: only its optimizer differs."""

    traits = CpuBackend.traits


def _train(backend, steps: int = 6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    opt = ac.AdamW(lr=3e-2, weight_decay=0.1, no_decay=lambda name, p: p.ndim < 2, schedule=ac.WarmupCosine(warmup=2, total=steps))
    step = ac.TrainStep(model, lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), optimizer=opt, backend=backend, max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(1)
    losses = [step((torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen))).loss for _ in range(steps)]
    return step, losses


def test_torch_tpu_adamw_is_the_optimizer_and_trains_exactly_as_torch_adamw():
    from torch_tpu._internal.optim import AdamW

    step, losses = _train(TpuOptimizerOnTheCpu(ac.Availability("tpu", True, "test", devices=1, device_kind="TPU v6 lite")))
    optimizer = step.engine.optimizer
    assert type(optimizer) is AdamW
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]  # the no_decay groups survive
    reference, want = _train(ac.backend("cpu"))
    assert type(reference.engine.optimizer) is torch.optim.AdamW
    assert losses == want
    got, expected = step.state_dict()["model"], reference.state_dict()["model"]
    assert all(torch.equal(got[k], expected[k]) for k in expected)
