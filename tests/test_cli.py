"""The anychip command: devices, train, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from anychip.cli import main

DESIGN_BACKENDS = {"cpu", "cuda", "neuron", "neuron-xla", "jax:tpu", "jax:gpu", "jax:cpu"}


def run(*args):
    return subprocess.run([sys.executable, "-m", "anychip.cli", *args], capture_output=True, text=True, timeout=300)


def test_devices_json_lists_every_backend_truthfully():
    out = run("devices", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert DESIGN_BACKENDS <= set(rows)
    assert rows["cpu"]["available"] is True
    for name, row in rows.items():
        assert row["reason"], name
        if not row["available"]:
            assert not row["reason"].startswith("probe failed"), f"{name}: {row['reason']}"


def test_devices_table_names_every_backend():
    out = run("devices")
    assert out.returncode == 0, out.stderr
    for name in DESIGN_BACKENDS:
        assert name in out.stdout


def test_train_shows_falling_loss(capsys):
    assert main(["train", "--workload", "mlp", "--backend", "cpu", "--steps", "30", "--log-every", "10"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    first, last = (float(v) for v in summary.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--backend", "cdua"], "unknown backend 'cdua'. Did you mean 'cuda'?"),
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
