"""The command line where torch-tpu is installed and no TPU is: `anychip devices` lists `tpu` with its
reason and fix without importing torch, torch_tpu or libtpu, and the commands that name `tpu` stop
with that reason in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from anychip.backends.torch import tpu

ENV = {k: v for k, v in os.environ.items() if k not in ("ANYCHIP_BACKEND", "WORLD_SIZE", "RANK", "LOCAL_RANK")}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anychip.cli", *args], capture_output=True, text=True, timeout=300, env=ENV)


def test_devices_lists_tpu_with_its_reason_and_fix_quickly_importing_no_sdk():
    code = (
        "import contextlib, io, json, sys, time; t = time.perf_counter(); from anychip.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out): main(['devices'])\n"
        "heavy = {'torch', 'torch_tpu', 'libtpu', 'jax', 'torchax'}\n"
        "print(json.dumps([out.getvalue(), sorted({m.split('.')[0] for m in sys.modules} & heavy), time.perf_counter() - t]))"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    text, imported, _ = json.loads(done.stdout.splitlines()[-1])
    assert imported == []
    line = next(ln for ln in text.splitlines() if ln.startswith("tpu: "))
    assert line.startswith("tpu: torch-tpu 0.2.0 is installed, but no TPU was found (") and "Cloud TPU VM" in line
    assert wall < 3.0, f"anychip devices took {wall:.2f} s"  # the interpreter's start included


def test_devices_json_reports_tpu_unavailable_with_the_installed_versions():
    out = run("devices", "--json")
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout)["backends"] if r["name"] == "tpu")
    assert row["available"] is False and row["versions"]["torch-tpu"] == "0.2.0" and "libtpu" not in row["versions"]


@pytest.mark.parametrize("args", [["train", "--backend", "tpu", "--steps", "1"], ["parity", "--backends", "tpu,jax:tpu"]])
def test_naming_tpu_on_this_machine_stops_with_the_probe_reason_in_one_line(args):
    out = run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "backend 'tpu'" in out.stderr and tpu.probe().reason in out.stderr
