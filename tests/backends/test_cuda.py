"""The cuda backend on a real NVIDIA GPU (skipped, with the reason, where there is none)."""

from __future__ import annotations

import copy

import pytest

from support import hand_written_loop, requires

pytestmark = requires("cuda")


def test_probe_sees_the_gpu():
    import anychip as ac

    avail = {a.name: a for a in ac.backends()}["cuda"]
    assert avail.available and avail.devices >= 1 and avail.device_kind.startswith("NVIDIA")
    assert ac.backend().name == "cuda"  # first in auto-detect order


def test_fp32_eager_matches_hand_written_loop_on_gpu():

    import anychip as ac
    from anychip import workloads

    w = workloads.get("gpt-tiny")
    schedule = ac.WarmupCosine(warmup=2, total=6)
    spec = ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=schedule)
    data = [w.batch(i, 8, 32) for i in range(6)]
    ref_model = w.build(seed=1).cuda()
    ours = ac.TrainStep(copy.deepcopy(ref_model), w.loss_fn, spec, backend="cuda", compile=False, max_grad_norm=0.5)
    expected = hand_written_loop(ref_model, w.loss_fn, [tuple(t.cuda() for t in b) for b in data], lr=spec.lr,
                                 weight_decay=spec.weight_decay, schedule=schedule, max_grad_norm=0.5)
    got = [ours(b).loss for b in data]
    # fused AdamW (ours) vs the default foreach AdamW: same math, different kernels
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(p.device.type == "cuda" for p in ours.model.parameters())


def test_compiled_bf16_trains_and_reports_memory_and_peak():
    import torch

    import anychip as ac
    from anychip import workloads

    w = workloads.get("gpt-tiny")
    be = ac.backend("cuda")
    step = ac.TrainStep(w.build(), w.loss_fn, ac.AdamW(lr=3e-3), backend=be, precision="bf16")
    losses = [step(w.batch(i, 16, 64)).loss for i in range(30)]
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0]
    assert all(p.dtype == torch.float32 for p in step.model.parameters())
    mem = be.memory_stats()
    assert mem.peak_bytes > 0 and mem.source == "device allocator"
    if "H100" in torch.cuda.get_device_name():
        assert be.peak_flops("bf16") == pytest.approx(989.4e12)


def test_cpu_state_moves_to_gpu_and_continues_identically():
    import anychip as ac
    from anychip import workloads

    w = workloads.get("mlp")
    data = [w.batch(i, 32) for i in range(6)]
    cpu = ac.TrainStep(w.build(seed=2), w.loss_fn, ac.SGD(lr=0.1, momentum=0.9), backend="cpu")
    for b in data[:3]:
        cpu(b)
    gpu = ac.TrainStep(w.build(seed=9), w.loss_fn, ac.SGD(lr=0.1, momentum=0.9), backend="cuda", compile=False)
    gpu.load_state_dict(cpu.state_dict())
    rest_cpu = [cpu(b).loss for b in data[3:]]
    rest_gpu = [gpu(b).loss for b in data[3:]]
    assert rest_gpu == pytest.approx(rest_cpu, rel=1e-4)
