"""The arithmetic behind a bench row, against values worked out by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from anychip.backends.facts import peaks
from anychip.bench import metrics


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 51):
        values = [rng.uniform(0.001, 0.2) for _ in range(n)]
        for q in (0, 10, 50, 90, 100):
            assert metrics.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_step_time_summary_by_hand():
    s = metrics.step_time_summary([0.5, 0.1, 0.3, 0.2, 0.4])
    # sorted 0.1 .. 0.5: median = 0.3; p10 at position 0.4 -> 0.1 + 0.4*0.1; p90 at 3.6 -> 0.4 + 0.6*0.1
    assert s == pytest.approx({"median": 0.3, "p10": 0.14, "p90": 0.46, "mean": 0.3, "min": 0.1, "max": 0.5})


def test_mfu_by_hand_gpt2_small_on_one_h100():
    # 124M parameters -> 6N = 7.44e8 FLOPs per token; 400k tokens/s -> 2.976e14 FLOP/s;
    # H100 SXM dense bf16 peak 989.4 TFLOP/s -> MFU = 2.976e14 / 9.894e14 = 2976 / 9894 = 0.30079
    peak = peaks.peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989.4e12
    assert metrics.mfu(400_000, 6 * 124e6, peak) == pytest.approx(2976 / 9894, rel=1e-12)
    assert peaks.peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None  # no fp32 tensor-core figure
    assert metrics.mfu(400_000, 6 * 124e6, None) is None  # CPU: no peak, no MFU


def test_trainium_per_core_peaks_add_up_to_the_chip():
    assert peaks.peak_flops("trn1 NeuronCore") == 95e12
    assert 2 * peaks.peak_flops("trn1 NeuronCore") == peaks.peak_flops("Trainium1")
    assert peaks.peak_flops("trn2 NeuronCore") == pytest.approx(166.75e12)  # logical core, default LNC=2
    assert 4 * peaks.peak_flops("trn2 NeuronCore") == pytest.approx(peaks.peak_flops("Trainium2"))
    assert 8 * peaks.peak_flops("trn2 NeuronCore (LNC=1)") == pytest.approx(peaks.peak_flops("trn2"))
    assert 4 * peaks.peak_flops("Trainium3 NeuronCore") == pytest.approx(peaks.peak_flops("trn3"))
    assert peaks.peak_flops("AMD EPYC") is None


def _measured(**over):
    m = {
        "device_kind": "AMD EPYC", "devices": 1, "devices_used": 1, "versions": {"torch": "2.13.0"},
        "setup_s": 1.0, "first_step_s": 2.0, "warmup_s": 2.5, "window_step_s": [0.5, 0.1, 0.3, 0.2, 0.4], "window_steps": 10,
        "tokens_per_step": 3000, "samples_per_step": 6, "batch": 6, "seq": 500, "flops_per_token": 1e6,
        "peak_flops": None, "memory": {"peak_bytes": 10, "current_bytes": 5, "source": "process RSS"},
        "losses": [3.0, 2.5, 2.0, 1.5, 1.25, 1.0],
    }
    m.update(over)
    return m


def test_finish_row_by_hand():
    row = metrics.empty_row("cpu", "ok", None, "fp32")
    metrics.finish_row(row, _measured(), warmup=1, price_overrides={"cpu": 3.6}, peak_tflops={"*": 0.05})
    # median window 0.3 s per step -> 10,000 tokens/s and 20 samples/s; p10 0.14 s, p90 0.46 s
    assert row["tokens_per_s"] == pytest.approx(10_000)
    assert row["samples_per_s"] == pytest.approx(20)
    assert row["tokens_per_s_interval"] == pytest.approx([3000 / 0.46, 3000 / 0.14])
    assert row["samples_per_s_interval"] == pytest.approx([6 / 0.46, 6 / 0.14])
    # 1e6 FLOPs/token x 1e4 tokens/s = 1e10 FLOP/s over a 0.05 TFLOP/s peak = 0.2
    assert row["peak_flops"] == pytest.approx(5e10) and row["mfu"] == pytest.approx(0.2)
    assert row["peak_flops_source"] == "--peak-tflops 0.05"
    # USD 3.6/h over 3.6e7 tokens/h = 1e-7 USD/token = 0.1 USD per million tokens
    assert row["usd_per_hour"] == 3.6 and row["usd_per_million_tokens"] == pytest.approx(0.1)
    # 5 windows of 10 steps
    assert row["final_loss"] == 1.0 and row["steps"] == 50 and row["repeat"] == 5 and row["warmup_steps"] == 1
    assert row["window_step_s"] == [0.5, 0.1, 0.3, 0.2, 0.4]


def test_finish_row_named_peak_and_devices_used_scale_cost():
    row = metrics.empty_row("neuron", "ok", None, "bf16")
    measured = _measured(device_kind="trn2 NeuronCore", devices=64, devices_used=4, peak_flops=4 * 166.75e12)
    metrics.finish_row(row, measured, warmup=1, peak_tflops={"other": 1.0})
    assert row["peak_flops"] == 4 * 166.75e12  # the backend's own figure; the override names another backend
    assert row["peak_flops_source"].startswith("AWS Neuron docs")
    assert row["mfu"] == pytest.approx(1e10 / (4 * 166.75e12))
    assert row["usd_per_hour"] == pytest.approx(4 * 44.70 / 64)
    metrics.finish_row(row, measured, warmup=1, peak_tflops={"TRN2 NeuronCore": 100.0})
    assert row["peak_flops"] == 100e12 and row["peak_flops_source"] == "--peak-tflops TRN2 NeuronCore=100"


def test_cpu_row_has_no_mfu_and_no_cost_without_overrides():
    row = metrics.finish_row(metrics.empty_row("cpu", "ok", None, "fp32"), _measured(), warmup=1)
    assert row["mfu"] is None and row["price"] is None and row["usd_per_million_tokens"] is None


def test_loss_parity():
    ref = [3.0, 2.0, 1.0, 0.5]
    same = metrics.loss_parity(ref, ref, 1e-3, "cpu")
    assert (same.max_rel_diff, same.first_step_over, same.steps_compared) == (0.0, None, 4)
    off = metrics.loss_parity([3.0, 2.001, 1.01, 0.5], ref, 1e-3, "cpu")
    # step 2: 0.001/2 = 5e-4 (within); step 3: 0.01/1 = 1e-2 (first over)
    assert off.max_rel_diff == pytest.approx(1e-2) and off.first_step_over == 3
    broken = metrics.loss_parity([3.0, None, 1.0, 0.5], ref, 1e-3, "cpu")
    assert broken.first_step_over == 2 and math.isinf(broken.max_rel_diff)
    assert broken.as_dict()["max_rel_diff"] is None
    short = metrics.loss_parity([3.0, 2.0], ref, 1e-3, "cpu")
    assert short.first_step_over == 3
    with pytest.raises(ValueError):
        metrics.loss_parity(ref, ref, 0, "cpu")


def test_add_parity_is_against_the_reference_backend():
    failed = metrics.empty_row("cuda", "crashed", "boom", "fp32")
    a = metrics.finish_row(metrics.empty_row("jax:cpu", "ok", None, "fp32"), _measured(), warmup=1)
    b = metrics.finish_row(metrics.empty_row("cpu", "ok", None, "fp32"), _measured(losses=[3.0, 2.5, 2.0, 1.5, 1.25, 1.1]), warmup=1)
    assert metrics.add_parity([failed, a, b], 1e-3, "cpu") == []
    assert failed["parity"] is None
    # cpu finished last, and is the reference all the same
    assert b["parity"]["reference"] == "cpu" and b["parity"]["max_rel_diff"] == 0.0
    assert a["parity"]["reference"] == "cpu" and a["parity"]["first_step_over"] == 6
    assert a["parity"]["max_rel_diff"] == pytest.approx(0.1 / 1.1)
    # a reference that did not finish: no figure for its world size, and a line that says why
    notes = metrics.add_parity([failed, a, b], 1e-3, "cuda")
    assert a["parity"] is None and b["parity"] is None
    assert notes == ["parity: no figure for the rows of 1 process(es): the reference cuda has no losses (it is crashed)"]
    # documents from before --reference: the first finished row of each world size
    metrics.add_parity([failed, a, b], 1e-3)
    assert a["parity"]["reference"] == "jax:cpu" and b["parity"]["reference"] == "jax:cpu"


def test_a_non_finite_loss_never_matches_as_in_anychip_parity():
    from anychip.parity import compare

    both_nan = metrics.loss_parity([3.0, None], [3.0, None], 1e-3, "cpu")
    assert both_nan.first_step_over == 2 and both_nan.as_dict()["max_rel_diff"] is None
    assert compare({"cpu": [3.0, math.nan], "x": [3.0, math.nan]}, "cpu", 1e-3)["x"]["first_mismatch"] == 2


def test_step_ms_and_tokens_per_second_come_from_the_same_windows():
    # 4 windows: 0.10, 0.11, 0.12, 0.20 s per step; median 0.115, p10 0.103, p90 0.176
    stats = metrics.window_statistics([0.12, 0.10, 0.20, 0.11], tokens_per_step=1150, samples_per_step=23)
    st = stats["step_time_s"]
    assert st == pytest.approx({"median": 0.115, "p10": 0.103, "p90": 0.176, "mean": 0.1325, "min": 0.10, "max": 0.20})
    assert stats["tokens_per_s"] == pytest.approx(10_000) and stats["tokens_per_s"] == pytest.approx(1150 / st["median"])
    assert stats["tokens_per_s_interval"] == pytest.approx([1150 / 0.176, 1150 / 0.103])
    assert stats["samples_per_s"] == pytest.approx(200)
    assert metrics.spread(st) == pytest.approx((0.176 - 0.103) / 0.115)


# -- several processes (--nproc) ------------------------------------------------------------------


def _row(backend, world, tokens_per_step, step_s, status="ok", losses=None, **measured):
    row = metrics.empty_row(backend, status, None if status == "ok" else "boom", "fp32", world_size=world,
                            parallel="ddp" if world > 1 else None)
    if status == "ok":
        m = _measured(window_step_s=[step_s], tokens_per_step=tokens_per_step, samples_per_step=6 * world, **measured)
        m["losses"] = losses or m["losses"]
        metrics.finish_row(row, m, warmup=1)
    return row


def test_scaling_efficiency_by_hand():
    one = _row("cpu", 1, 3000, 0.3)  # 10,000 tokens/s
    two = _row("cpu", 2, 6000, 0.4)  # 15,000 tokens/s: 15,000 / (2 x 10,000) = 0.75
    four = _row("cpu", 4, 12000, 1.2)  # 10,000 tokens/s: 10,000 / (4 x 10,000) = 0.25
    other = _row("fake-accel", 2, 6000, 0.1)  # no 1-process row of its own: no efficiency
    metrics.add_scaling([one, two, four, other])
    assert two["scaling_efficiency"] == pytest.approx(0.75)
    assert four["scaling_efficiency"] == pytest.approx(0.25)
    assert one["scaling_efficiency"] is None and other["scaling_efficiency"] is None
    failed_base = _row("cpu", 1, 0, 0, status="crashed")
    metrics.add_scaling([failed_base, two])
    assert two["scaling_efficiency"] is None


def test_parity_compares_rows_of_the_same_process_count_only():
    # N processes train on N x batch samples per step: their losses differ from one process's
    # by design, and must not be reported as a parity failure.
    one = _row("cpu", 1, 3000, 0.3, losses=[3.0, 2.0])
    jax_one = _row("jax:cpu", 1, 3000, 0.3, losses=[3.0, 2.1])
    two = _row("cpu", 2, 6000, 0.4, losses=[3.0, 1.0])
    accel_two = _row("fake-accel", 2, 6000, 0.4, losses=[3.0, 1.0])
    metrics.add_parity([one, jax_one, two, accel_two], 1e-3, "cpu")
    assert one["parity"]["reference"] == "cpu" and jax_one["parity"]["reference"] == "cpu"
    assert jax_one["parity"]["max_rel_diff"] == pytest.approx(0.05)
    assert two["parity"]["reference"] == "cpu (nproc 2)" and two["parity"]["first_step_over"] is None
    assert accel_two["parity"] == {
        "reference": "cpu (nproc 2)",
        "tolerance": 1e-3,
        "steps_compared": 2,
        "max_rel_diff": 0.0,
        "first_step_over": None,
    }


def test_several_processes_count_their_devices_for_mfu_and_cost():
    # 4 ranks on 4 of 8 GPUs, one each: 4 devices, 4 x the per-process --peak-tflops, 4 x the price
    row = metrics.empty_row("cuda", "ok", None, "bf16", world_size=4, parallel="ddp")
    metrics.finish_row(row, _measured(device_kind="NVIDIA H100 80GB HBM3", devices=8, devices_used=4, devices_per_process=1),
                       warmup=1, peak_tflops={"*": 0.01})  # median step 0.3 s: 10,000 tokens/s, 1e10 FLOP/s
    assert row["peak_flops"] == pytest.approx(4e10)
    assert row["mfu"] == pytest.approx(1e10 / 4e10)
    assert row["usd_per_hour"] == pytest.approx(4 * 6.88)
    # the backend's own peak arrives as that of one process and is scaled the same way, once
    row = metrics.empty_row("cuda", "ok", None, "bf16", world_size=4, parallel="ddp")
    metrics.finish_row(row, _measured(device_kind="NVIDIA H100 80GB HBM3", devices=8, devices_used=4, devices_per_process=1,
                                      peak_flops=989.4e12), warmup=1)
    assert row["peak_flops"] == pytest.approx(4 * 989.4e12) and row["mfu"] == pytest.approx(1e10 / (4 * 989.4e12))
    # 2 ranks sharing the one CPU: the child reports 1 device used, so the peak is counted once
    shared = metrics.finish_row(metrics.empty_row("cpu", "ok", None, "fp32", world_size=2, parallel="ddp"),
                                _measured(devices_used=1, devices_per_process=1), warmup=1, peak_tflops={"*": 0.05})
    assert shared["peak_flops"] == pytest.approx(5e10)


def test_a_row_label_names_its_process_count():
    assert metrics.row_label(metrics.empty_row("cpu", "skipped", None, "fp32")) == "cpu"
    assert metrics.row_label(metrics.empty_row("cpu", "skipped", None, "fp32", world_size=2, parallel="fsdp")) == "cpu (nproc 2)"
    assert metrics.row_label({"backend": "cpu"}) == "cpu"  # a document from before --nproc
    with pytest.raises(ValueError, match="parallel"):
        metrics.empty_row("cpu", "skipped", None, "fp32", world_size=2)
