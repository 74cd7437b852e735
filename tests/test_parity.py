"""``anychip parity``: the loss table, the first step out of tolerance, and exit codes 0 / 1 / 2.

A deliberately perturbed backend (test-only, registered through ANYCHIP_PLUGINS in the worker
subprocesses) multiplies the loss by (1 + 1e-3) from step 7 on; parity must name step 7.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from anychip.backends import unregister
from anychip.cli import main
from anychip.parity import RTOL, check_reference, compare, default_reference, default_rtol
from support import requires

PLUGIN_NAME = "anychip_parity_test_plugin"
PLUGIN = '''
"""Test-only backends and a small workload for tests/test_parity.py, loaded through ANYCHIP_PLUGINS."""
from anychip.backends import Availability, Registration, register
from anychip.backends.torch.cpu import CpuBackend, probe as cpu_probe
from anychip.backends.torch.engine import TorchEngine
from anychip.engine import StepOutput
from anychip.workloads import Workload, mlp

PERTURB_FROM = 7


class PerturbedEngine(TorchEngine):
    def step(self, batch, tokens):
        out = super().step(batch, tokens)
        if out.step < PERTURB_FROM:
            return out
        return StepOutput(out.step, out.loss_tensor * (1 + 1e-3), out.grad_norm, out.lr, out.tokens)


class BrokenEngine(TorchEngine):
    def step(self, batch, tokens):
        if self.updates == 2:
            raise RuntimeError("the device fell off the bus")
        return super().step(batch, tokens)


class Perturbed(CpuBackend):
    name = "cpu-perturbed"

    def make_engine(self, spec):
        return PerturbedEngine(self, spec)


class Broken(CpuBackend):
    name = "cpu-broken"

    def make_engine(self, spec):
        return BrokenEngine(self, spec)


def probe(name):
    if name == "cpu-missing":
        return Availability(name, False, "no such device on this machine", install="pip install imaginary-sdk")
    return cpu_probe(name)


def create(availability):
    return {"cpu-perturbed": Perturbed, "cpu-broken": Broken}[availability.name](availability)


for _name in ("cpu-perturbed", "cpu-broken", "cpu-missing"):
    register(Registration(_name, __name__, priority=0, auto=False, summary="test only"))


def make_workload():
    return Workload("small-mlp", mlp.build, mlp.batch, mlp.loss_fn, mlp.flops_per_token, default_batch=16, default_seq=1)
'''
TEST_BACKENDS = ("cpu-perturbed", "cpu-broken", "cpu-missing")
WORKLOAD = f"{PLUGIN_NAME}:make_workload"


@pytest.fixture
def plugin_dir(tmp_path):
    (tmp_path / f"{PLUGIN_NAME}.py").write_text(PLUGIN)
    return tmp_path


@pytest.fixture
def plugin_here(plugin_dir, monkeypatch):
    """The plug-in, imported in this process (for the in-process bad-input tests). Imported
    here, not left to load_plugins: that imports each plug-in once per process, and every
    test unregisters the plug-in's backends when it ends."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("ANYCHIP_PLUGINS", PLUGIN_NAME)
    sys.modules.pop(PLUGIN_NAME, None)
    importlib.import_module(PLUGIN_NAME)
    yield
    for name in TEST_BACKENDS:
        unregister(name)
    sys.modules.pop(PLUGIN_NAME, None)


def parity(plugin_dir, *args, plugins=PLUGIN_NAME):
    # One torch thread per worker: tiny models, and no OpenMP spinning on a busy machine.
    env = dict(os.environ, ANYCHIP_PLUGINS=plugins, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugin_dir), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "anychip.cli", "parity", *args], capture_output=True, text=True, env=env, timeout=600)


def table_rows(stdout: str) -> dict[int, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    return rows


# -- the comparison itself -----------------------------------------------------------------------


def test_compare_finds_the_first_step_out_of_tolerance():
    ref = [4.0, 3.0, 2.0, 1.0]
    got = compare({"a": ref, "b": [4.0, 3.0 * (1 + 1e-6), 2.0 * (1 + 1e-4), 1.0]}, "a", 1e-5)
    assert got["b"]["first_mismatch"] == 3 and got["b"]["mismatches"] == 1
    assert got["b"]["rel_diff"][1] == pytest.approx(1e-6) and got["b"]["rel_diff"][0] == 0.0
    nan = compare({"a": ref, "b": [4.0, math.nan, 2.0, 1.0]}, "a", 1e-5)
    assert nan["b"]["first_mismatch"] == 2  # a non-finite loss never matches
    short = compare({"a": ref, "b": ref[:2]}, "a", 1e-5)
    assert short["b"]["first_mismatch"] == 3  # a run that stopped early does not match either


# -- end to end, one subprocess per backend ------------------------------------------------------


def test_perturbed_backend_is_caught_at_step_7(plugin_dir, tmp_path):
    report = tmp_path / "parity.json"
    out = parity(plugin_dir, "--workload", WORKLOAD, "--backends", "cpu,cpu-perturbed", "--steps", "10", "--rtol", "1e-5",
                 "--json", str(report))
    assert out.returncode == 1, out.stderr
    assert "cpu-perturbed: first mismatch at step 7 (rel diff 1.00e-03 > rtol 1e-05); 4 of 10 steps outside" in out.stdout
    assert out.stdout.rstrip().endswith("parity: MISMATCH")
    rows = table_rows(out.stdout)
    assert sorted(rows) == list(range(1, 11))
    for step, (ref, other, diff, *flag) in rows.items():
        assert (flag == ["!"]) == (step >= 7), (step, rows[step])
        assert float(diff) == (pytest.approx(1e-3, rel=1e-3) if step >= 7 else 0.0)
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["first_mismatch"] == {"cpu-perturbed": 7} and data["reference"] == "cpu"
    assert data["losses"]["cpu"][:6] == data["losses"]["cpu-perturbed"][:6]
    assert data["workers"]["cpu-perturbed"]["backend"] == "cpu-perturbed"


def test_a_failing_worker_exits_1(plugin_dir):
    out = parity(plugin_dir, "--workload", WORKLOAD, "--backends", "cpu-broken,cpu", "--steps", "5")
    assert out.returncode == 1
    assert "the cpu-broken worker failed" in out.stderr and "fell off the bus" in out.stderr


@requires("jax", "torchax", "optax")
def test_cpu_and_jax_cpu_agree(plugin_dir, tmp_path):
    report = tmp_path / "parity.json"
    out = parity(
        plugin_dir, "--workload", "mlp", "--backends", "cpu,jax:cpu", "--steps", "8", "--batch", "16", "--rtol", "1e-5",
        "--json", str(report), plugins="",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "jax:cpu: all 8 steps within rtol 1e-05 of cpu" in out.stdout
    data = json.loads(report.read_text())
    assert data["ok"] is True and len(data["losses"]["jax:cpu"]) == 8 and data["first_mismatch"] == {"jax:cpu": None}


def test_matching_runs_exit_0_with_cpu_as_reference_and_the_precisions_rtol(plugin_dir, tmp_path):
    """bf16 rounding noise is not a mismatch: the tolerance of bf16 (3e-2, the one table
    anychip bench uses too) passes the 1e-3 difference that --rtol 1e-5 flags above; and cpu is
    the reference although it is listed second."""
    report = tmp_path / "parity.json"
    out = parity(plugin_dir, "--workload", WORKLOAD, "--backends", "cpu-perturbed,cpu", "--steps", "8", "--precision", "bf16",
                 "--json", str(report))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cpu-perturbed: all 8 steps within rtol 0.03 of cpu (max rel diff 1.00e-03)" in out.stdout
    assert out.stdout.rstrip().endswith("parity: OK") and sorted(table_rows(out.stdout)) == list(range(1, 9))
    data = json.loads(report.read_text())
    assert data["reference"] == "cpu" and data["rtol"] == RTOL["bf16"] == 3e-2 and data["first_mismatch"] == {"cpu-perturbed": None}


def test_the_reference_rule_is_one_function():
    assert default_reference(["cuda", "cpu"]) == "cpu" and default_reference(["cuda", "jax:gpu"]) == "cuda"
    assert check_reference(None, ["jax:cpu", "cpu"]) == "cpu" and check_reference(" JAX:CPU ", ["jax:cpu", "cpu"]) == "jax:cpu"
    with pytest.raises(ValueError, match="--reference tpu: not among the backends compared .cuda, cpu."):
        check_reference("tpu", ["cuda", "cpu"])
    assert default_rtol("fp32") == 1e-3 and default_rtol("bf16-pure") == 6e-2


# -- bad input: exit 2, one line, before any worker starts ------------------------------------------


def exit_code(argv) -> int:
    """main()'s status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("args, message", [
    (["--backends", "cpu,jxa:cpu"], "unknown backend 'jxa:cpu'. Did you mean 'jax:cpu' (torch model traced to JAX via torchax, on CPU) or"),
    (["--backends", "cpu"], "needs at least two"),
    (["--backends", "cpu,cpu"], "'cpu' is named twice"),
    (["--backends", "cpu,jax"], "'jax' is an alias"),
    (
        ["--backends", "cpu,cpu-missing"],
        "backend 'cpu-missing' is unavailable: no such device on this machine. Install: pip install imaginary-sdk",
    ),
    (["--workload", "gtp-tiny"], "unknown workload 'gtp-tiny'"),
    (["--workload", "no_such_module_xyz:make"], "cannot load workload 'no_such_module_xyz:make'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--steps", "0"], "must be >= 1"),
    (["--steps", "-3"], "must be >= 1"),
    (["--batch", "0"], "must be >= 1"),
    (["--rtol", "0"], "must be > 0"),
    (["--rtol=-1e-5"], "must be > 0"),
    (["--reference", "jax:cpu"], "--reference jax:cpu: not among the backends compared (cpu, cpu-perturbed)"),
    (["--json", "/no/such/dir/out.json"], "does not exist"),
])
def test_bad_input_exits_2_before_anything_runs(plugin_here, monkeypatch, capsys, args, message):
    def no_workers(*a, **k):
        raise AssertionError("a worker was started despite bad input")

    monkeypatch.setattr(subprocess, "run", no_workers)
    assert exit_code(["parity", "--backends", "cpu,cpu-perturbed", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_unimportable_plugin_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("ANYCHIP_PLUGINS", "no_such_plugin_module_xyz")
    assert exit_code(["parity", "--backends", "cpu,jax:cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot import plug-in 'no_such_plugin_module_xyz' named in $ANYCHIP_PLUGINS" in err and len(err.splitlines()) == 1


def test_parity_is_listed_in_help():
    out = subprocess.run([sys.executable, "-m", "anychip.cli", "parity", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--backends" in out.stdout and "--rtol" in out.stdout
