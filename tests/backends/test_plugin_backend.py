"""A new backend is one file: a plug-in module written here, named in ANYCHIP_PLUGINS and in
nothing else, shows up in `anychip devices`, in the kernel table, trains gpt-tiny and gets an
MFU from `anychip bench`. The README's "Adding a backend" recipe is this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

PLUGIN = textwrap.dedent(
    '''
    """fakechip: a made-up accelerator whose tensors live on the host CPU."""

    from anychip.backends.registry import Availability, Registration, register
    from anychip.backends.torch.base import NativeTorchBackend, Traits


    def probe(name="fakechip"):
        return Availability(name, True, "simulated on the host CPU", devices=1, device_kind="FakeChip F1")


    class FakeChipBackend(NativeTorchBackend):
        name = "fakechip"
        traits = Traits(device_type="cpu", dist_backend="gloo")


    def create(availability):
        return FakeChipBackend(availability)


    register(Registration(
        "fakechip", __name__, priority=1, auto=False, summary="a plug-in backend in one file",
        device_type="fakechip", kernel_family="cpu", host_cpu=True, peak_tflops={"fp32": 0.5, "bf16": 1.0},
    ))
    '''
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    from anychip.backends import registry

    path = tmp_path / "fakechip_plugin.py"
    path.write_text(PLUGIN)
    monkeypatch.setenv("ANYCHIP_PLUGINS", str(path))
    yield path
    registry.unregister("fakechip")
    sys.modules.pop("fakechip_plugin", None)


def _cli(*args, env_plugin, cwd):
    env = {**os.environ, "ANYCHIP_PLUGINS": str(env_plugin)}
    return subprocess.run([sys.executable, "-m", "anychip.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_devices_lists_the_plugin(plugin, tmp_path):
    done = _cli("devices", "--json", env_plugin=plugin, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = {b["name"]: b for b in json.loads(done.stdout)["backends"]}
    assert found["fakechip"]["available"] and found["fakechip"]["device_kind"] == "FakeChip F1"


def test_kernel_table_describes_the_plugin(plugin):
    from anychip import kernels
    from anychip.backends import registrations

    assert "fakechip" in {r.name for r in registrations()}
    rows = [r for r in kernels.available() if r.backend == "fakechip"]
    assert {r.op for r in rows} == set(kernels.OPS)
    # Its kernel family is cpu's: the same implementations run, and auto picks the same ones.
    cpu = {(r.op, r.name): (r.available, r.selected) for r in kernels.available("cpu")}
    assert {(r.op, r.name): (r.available, r.selected) for r in rows} == cpu

    class StandIn:  # a tensor of the fakechip device, as far as kernel dispatch looks
        device = torch.device("cpu")

    StandIn.device = type("Device", (), {"type": "fakechip"})()
    assert kernels.backend_of(StandIn()) == "fakechip"
    assert kernels.select("rms_norm", "fakechip").name == kernels.select("rms_norm", "cpu").name


def test_the_plugin_trains_gpt_tiny_like_cpu(plugin):
    import anychip as ac
    from anychip import workloads

    wl = workloads.get("gpt-tiny")
    losses = {}
    for name in ("cpu", "fakechip"):
        step = ac.TrainStep(wl.build(seed=0), wl.loss_fn, optimizer=ac.AdamW(lr=1e-3), backend=name)
        losses[name] = [step(wl.batch(i, 4, 32)).loss for i in range(3)]
        assert step.backend.name == name
    assert losses["fakechip"] == losses["cpu"]
    assert losses["cpu"][-1] < losses["cpu"][0]


def test_bench_gives_the_plugin_an_mfu(plugin, tmp_path):
    out = tmp_path / "run.json"
    done = _cli(
        "bench", "--workload", "gpt-tiny", "--backends", "fakechip", "--steps", "3", "--warmup", "1",
        "--batch", "4", "--seq", "32", "--json", str(out), env_plugin=plugin, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["backend"] == "fakechip" and row["status"] == "ok"
    assert row["peak_flops"] == pytest.approx(0.5e12)  # fp32, the host-CPU default precision
    assert row["mfu"] is not None and 0 < row["mfu"] < 1
