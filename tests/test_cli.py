"""The anychip command: devices, train, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from anychip.bench.supervise import LAUNCH_ENV  # a launcher's variables: none may leak in from the shell running the tests
from anychip.cli import main

BUILT_IN_BACKENDS = {"cpu", "cuda", "neuron", "neuron-xla", "tpu", "jax:tpu", "jax:gpu", "jax:cpu"}


def run(*args, env=None):
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return subprocess.run([sys.executable, "-m", "anychip.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**base, **(env or {})})


def test_devices_json_lists_every_backend_truthfully():
    out = run("devices", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["layout"] == {"engine": None, "world_size": 1, "rank": 0, "local_rank": 0, "local_world_size": 1,
                             "coordinator": None, "nodes": 1}
    rows = {r["name"]: r for r in doc["backends"]}
    assert BUILT_IN_BACKENDS <= set(rows)
    assert rows["cpu"]["available"] is True
    for name, row in rows.items():
        assert row["reason"], name
        if not row["available"]:
            assert not row["reason"].startswith("probe failed"), f"{name}: {row['reason']}"


def test_devices_table_names_every_backend():
    out = run("devices")
    assert out.returncode == 0, out.stderr
    for name in BUILT_IN_BACKENDS:
        assert name in out.stdout
    assert out.stdout.rstrip().splitlines()[-1] == "launch: single process (no torchrun or jax.distributed launch detected)"


def test_devices_names_the_backend_auto_detect_picks():
    import anychip as ac

    out = run("devices", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["auto"] == ac.backend().name  # the same policy as ac.backend()
    text = run("devices").stdout
    assert f"auto-detect picks {ac.backend().name!r}" in text


def test_the_auto_detect_line_names_the_available_backends_used_only_when_named():
    from anychip.backends import Availability, Registration, register, unregister
    from anychip.cli import auto_detect_line

    register(Registration("chip-first", "anychip.backends.torch.cpu", 97))
    register(Registration("chip-second", "anychip.backends.torch.cpu", 96))
    register(Registration("chip-manual", "anychip.backends.torch.cpu", 95, auto=False))
    try:
        found = [Availability(n, ok, "test") for n, ok in
                 (("chip-first", True), ("chip-second", True), ("chip-manual", True), ("cuda", False), ("cpu", True))]
        assert auto_detect_line(found) == ("auto-detect picks 'chip-first'; also available, used only when named: "
                                           "'chip-second', 'chip-manual', 'cpu'")
        assert auto_detect_line(found[2:4]) == "auto-detect finds no backend; also available, used only when named: 'chip-manual'"
    finally:
        for name in ("chip-first", "chip-second", "chip-manual"):
            unregister(name)


PLUGIN = '''
from anychip.backends import Availability, Registration, register

def probe(name):
    return Availability(name, False, "the plug-in's chip is not in this machine", install="pip install plugin-sdk")

register(Registration("plugin-chip", __name__, priority=1, auto=False))
'''


def test_devices_lists_plugin_backends(tmp_path):
    plugin = tmp_path / "anychip_cli_test_plugin.py"
    plugin.write_text(PLUGIN)
    out = run("devices", "--json", env={"ANYCHIP_PLUGINS": str(plugin)})
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["backends"]}
    assert BUILT_IN_BACKENDS <= set(rows)
    assert rows["plugin-chip"]["reason"] == "the plug-in's chip is not in this machine"
    out = run("devices", env={"ANYCHIP_PLUGINS": str(plugin), "COLUMNS": "250"})
    assert out.returncode == 0 and "plugin-chip" in out.stdout and "pip install plugin-sdk" in out.stdout


# What torchrun --nnodes 2 --nproc-per-node 4 gives the second process of the second node.
TORCHRUN_WORKER = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}


def test_devices_shows_the_torchrun_layout():
    out = run("devices", env=TORCHRUN_WORKER)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().splitlines()[-1] == (
        "launch: torchrun: world size 8 (2 node(s) x 4), this is rank 5 (local rank 1), coordinator 10.0.0.7:29500"
    )
    out = run("devices", "--json", env=TORCHRUN_WORKER)
    assert json.loads(out.stdout)["layout"] == {
        "engine": "torchrun", "world_size": 8, "rank": 5, "local_rank": 1, "local_world_size": 4,
        "coordinator": "10.0.0.7:29500", "nodes": 2,
    }


def test_devices_shows_the_jax_distributed_layout():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.7:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    out = run("devices", "--json", env=env)
    assert out.returncode == 0, out.stderr
    lay = json.loads(out.stdout)["layout"]
    assert (lay["engine"], lay["world_size"], lay["rank"], lay["coordinator"]) == ("jax.distributed", 4, 3, "10.0.0.7:1234")


def test_devices_with_a_broken_launcher_variable_still_lists_the_backends():
    out = run("devices", env={"WORLD_SIZE": "eight"})
    assert out.returncode == 0, out.stderr
    assert "cpu" in out.stdout and (
        "launch: cannot tell: environment variable WORLD_SIZE='eight' is not an integer" in " ".join(out.stdout.split())
    )


def test_devices_imports_no_heavy_module():
    """`anychip devices` (the layout line included) probes and reads the environment; it never
    imports torch, jax or an SDK, under a launcher or not."""
    code = (
        "import contextlib, io, json, sys; from anychip.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['devices']); main(['devices', '--json'])\n"
        "heavy = {'torch', 'jax', 'jaxlib', 'torchax', 'torch_xla', 'torch_neuronx', 'torch_tpu', 'libtpu', 'triton', 'optax'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))"
    )
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}, **TORCHRUN_WORKER}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_train_shows_falling_loss(capsys):
    assert main(["train", "--workload", "mlp", "--backend", "cpu", "--steps", "30", "--log-every", "10"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    first, last = (float(v) for v in summary.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first


def test_train_mlp_in_pure_bf16(capsys):
    """bf16-pure keeps the MLP's parameters and AdamW state in bfloat16; it must still learn."""
    assert main(["train", "--workload", "mlp", "--backend", "cpu", "--precision", "bf16-pure", "--steps", "30", "--lr", "3e-3"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    first, last = (float(v) for v in summary.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert summary.startswith("mlp on cpu:") and last < first


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--backend", "cdua"], "unknown backend 'cdua'. Did you mean 'cuda' (PyTorch on NVIDIA GPUs)?"),
        (["train", "--workload", "gtp-tiny"], "unknown workload 'gtp-tiny'"),
        (["train", "--precision", "fp8"], "unknown precision 'fp8'"),
        (["train", "--steps", "0"], "must be >= 1"),
        (["train", "--lr", "-3"], "must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


WIDE_FACTS = (
    ("jax:gpu", False, "no CUDA plugin for jax installed", 0, "", {"jax": "0.10.2", "torchax": "0.0.14.dev20261026"},
     "pip install 'jax[cuda12]'"),
    ("jax:cpu", False, "jax is not installed", 0, "", {}, "pip install 'anychip[jax]'"),
    ("cuda", True, "8 GPUs", 8, "NVIDIA H200 141GB HBM3e", {"torch": "2.13.0+cu128", "cuda": "12.8"}, ""),
    ("neuron-xla", False, "torch-xla is not installed", 0, "", {"torch": "2.13.0+cpu"},
     "pip install torch-neuronx==2.9.* --extra-index-url https://pip.repos.neuron.amazonaws.com"),
)


@pytest.mark.parametrize("width", [80, 100, 120])
def test_devices_output_keeps_every_name_figure_and_install_command_whole(width):
    """Rendered at a narrow terminal width, no backend name, count, version or install command is
    split across lines, and brackets in install commands are text, not rich markup."""
    import io

    from rich.console import Console

    from anychip.backends import Availability
    from anychip.cli import devices_notes, devices_table

    found = [Availability(n, ok, why, devices=d, device_kind=kind, versions=v, install=fix) for n, ok, why, d, kind, v, fix in WIDE_FACTS]
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None)
    console.print(devices_table(found))
    for text in devices_notes(found):
        console.print(text, highlight=False, markup=False, soft_wrap=True)
    lines = out.getvalue().splitlines()

    def on_one_line(needle):
        return any(needle in line for line in lines)

    for name, ok, _why, devices, _kind, versions, fix in WIDE_FACTS:
        assert on_one_line(f"{name} "), name
        if devices:
            assert on_one_line(f" {devices} "), (name, devices)
        for package, version in versions.items():
            assert on_one_line(f"{package} {version}"), (package, version)
        if fix and not ok:
            assert on_one_line(fix), fix
    assert on_one_line("'jax[cuda12]'") and on_one_line("'anychip[jax]'")
    table_lines = [line for line in lines if line.startswith(("┃", "│", "┏", "┡", "└"))]
    assert all(len(line) <= width for line in table_lines)
