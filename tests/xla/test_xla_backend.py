"""The `neuron-xla` backend object: the facts it states, its optimizer, placement, process group,
and the errors a user meets (inside the torch_xla venv; the probe itself is tested with faked
facts in tests/test_neuron_xla_probe.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch_xla.runtime as xr

import anychip as ac
from anychip import workloads


def test_backend_facts():
    be = ac.backend("neuron-xla")
    assert be.name == "neuron-xla"
    assert be.device == torch.device("xla", 0) and be.traits.device_type == "xla"  # autocast("xla")
    assert be.traits.dist_backend == "xla"
    assert be.traits.compile_by_default is False and be.traits.lazy_tensors is True
    stats = be.graph_stats()
    assert set(stats) == {"compiles", "cache_hits", "executions"} and all(isinstance(v, int) for v in stats.values())
    if xr.device_type() == "CPU":
        assert be.device_kind == "PJRT CPU" and be.device_count == 1
        mem = be.memory_stats()
        assert (mem.current_bytes, mem.peak_bytes, mem.source) == (None, None, "not reported by the PJRT CPU client")
        assert be.peak_flops("bf16") is None
    else:  # a real device reports its allocator
        assert be.memory_stats().current_bytes is not None


def test_explicit_compile_is_refused_with_the_reason():
    w = workloads.get("mlp")
    with pytest.raises(ValueError, match="does not use torch.compile.*one graph at torch_xla.sync"):
        ac.TrainStep(w.build(), w.loss_fn, backend="neuron-xla", compile=True)


def test_adamw_gets_a_device_lr_and_sgd_a_float():
    be = ac.backend("neuron-xla")
    params = [torch.nn.Parameter(torch.zeros(3, device=be.device))]
    adam = be.make_optimizer(ac.AdamW(lr=3e-4), params)
    group = adam.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].device == be.device and group["lr"].ndim == 0
    assert group["capturable"] is True and adam.defaults["capturable"] is True
    assert isinstance(be.make_optimizer(ac.SGD(lr=0.1), params).param_groups[0]["lr"], float)


def test_tied_weights_stay_tied():
    be = ac.backend("neuron-xla")
    cpu_model = workloads.get("gpt-tiny").build()
    model = be.place(workloads.get("gpt-tiny").build())
    assert model.lm_head.weight is model.wte.weight
    assert len(list(model.parameters())) == len(list(cpu_model.parameters()))


def test_process_group_survives_a_busy_default_port(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("MASTER_PORT", raising=False)
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 12355))  # what a concurrent single-process run holds
        holder.listen()
    except OSError:
        pass  # someone else holds it already: the same situation
    be = ac.backend("neuron-xla")
    try:
        be.init_distributed()
        assert (dist.get_backend(), dist.get_world_size(), dist.get_rank()) == ("xla", 1, 0)
        t = torch.full((3,), 2.0, device=be.device)
        dist.all_reduce(t)
        be.mark_step()
        assert t.cpu().tolist() == [2.0, 2.0, 2.0]
        assert "MASTER_PORT" not in os.environ
    finally:
        holder.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_asked_for_without_pjrt_device_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    with pytest.raises(ac.BackendError, match="backend 'neuron-xla'.*PJRT_DEVICE is not set.*set PJRT_DEVICE=CPU"):
        ac.backend("neuron-xla")


def test_cpu_backward_before_the_device_is_explained():
    code = (
        "import torch; torch.nn.Linear(2, 2)(torch.randn(1, 2)).sum().backward()\n"
        "import anychip as ac\n"
        "try:\n    ac.backend('neuron-xla')\n"
        "except ac.BackendError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "a CPU backward ran before torch_xla.device()" in out.stdout, out.stdout + out.stderr
