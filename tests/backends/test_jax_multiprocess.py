"""JAX over two processes joined by ``jax.distributed`` on localhost, two fake CPU devices each
(tests/backends/jax_multidevice/multiprocess_check.py): losses, gradient norms and the trained state
equal a single-device run, for data parallel and FSDP, with the global batch passed to every
process (``split_batches=True``) or a part per process, with gradient accumulation.

One reference process, then one pair of workers running every case in turn: each launch costs
seconds of imports and compiles on a 2-core CI machine, and three processes at once made the
workers' collectives several times slower than running them one after the other."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

from support import requires

pytestmark = requires("jax", "torchax", "optax")

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "jax_multidevice" / "multiprocess_check.py"
CASES = ["mlp-ddp", "mlp-fsdp-parts-acc2", "gpt-ddp-acc2", "gpt-fsdp-parts"]
FSDP = [c for c in CASES if "fsdp" in c]
# The same fp32 math summed in another order (4 devices, an all-reduce across processes).
RTOL = 1e-5
# AdamW divides each gradient element by its own running size, so an element whose gradient is
# mostly rounding moves by an amount that depends on the summation order: a 4-device and a
# 1-device run in one process differ as much (up to ~5e-4 of a gpt-tiny tensor's largest value).
STATE_RTOL = 2e-3
TIMEOUT_S = 240  # per launch; a hang fails the test instead of blocking CI
LAUNCH_VARS = (
    "XLA_FLAGS",
    "ANYCHIP_BACKEND",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_BIND_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_together(out: pathlib.Path, launches: list[tuple[str, dict]]) -> None:
    """Start ``launches`` (role, extra env) and wait for all; the first failure or the timeout
    kills the others (a worker whose peer died would wait in a collective)."""
    procs = []
    try:
        for role, extra in launches:
            log = out / f"{role}{extra.get('JAX_PROCESS_ID', '')}.log"
            with open(log, "w") as fh:
                cmd = [sys.executable, str(SCRIPT), str(out), role]
                procs.append((subprocess.Popen(cmd, env=_env(**extra), stdout=fh, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p, _ in procs):
            failed = [log for p, log in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"{failed[0].name} failed" if failed else f"timed out after {TIMEOUT_S} s"
                pytest.fail(f"{why}:\n" + "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in procs))
            time.sleep(0.2)
        failed = [log for p, log in procs if p.returncode != 0]
        if failed:
            pytest.fail(f"{failed[0].name} failed:\n{failed[0].read_text()[-4000:]}")
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax-multiprocess")
    _run_together(out, [("reference", {})])
    address = f"127.0.0.1:{_free_port()}"
    # bound on loopback only (JAX binds every interface by default, IPv6 included)
    launch = {"JAX_COORDINATOR_ADDRESS": address, "JAX_COORDINATOR_BIND_ADDRESS": address, "JAX_NUM_PROCESSES": "2"}
    _run_together(out, [("worker", {**launch, "JAX_PROCESS_ID": str(i)}) for i in (0, 1)])
    reports = {role: json.loads((out / f"{role}.json").read_text()) for role in ("reference", "worker-0", "worker-1")}
    assert sorted(reports["worker-0"]["cases"]) == sorted(CASES) == sorted(reports["reference"]["cases"])
    return out, reports


def _state(out: pathlib.Path, role: str, case: str) -> dict:
    state = torch.load(out / f"{role}-{case}.pt")
    tensors = {f"model/{k}": v for k, v in state["model"].items()}
    tensors |= {f"{slot}/{n}": v for slot, by_name in state["optimizer"]["slots"].items() for n, v in by_name.items()}
    return {"step": state["step"], "tensors": tensors}


def _close(values, reference, rtol=RTOL) -> bool:
    return len(values) == len(reference) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(values, reference))


def test_two_processes_join_one_mesh_of_four_devices(runs):
    _, reports = runs
    for rank in (0, 1):
        facts = reports[f"worker-{rank}"]["facts"]
        assert (facts["devices"], facts["local_devices"], facts["devices_in_use"], facts["processes"]) == (4, 2, 2, 2), facts
        layout = facts["layout"]
        assert (layout["engine"], layout["world_size"], layout["rank"]) == ("jax.distributed", 2, rank), layout
        assert facts["is_main_process"] is (rank == 0)
        assert facts["main_outcome"] is not None  # process 0's failure reaches every process
        assert facts["memory_source"] == "process RSS" and facts["peak_flops"] is None  # local, as on one process
    assert reports["reference"]["facts"]["devices"] == 1


@pytest.mark.parametrize("case", CASES)
def test_each_step_sees_the_global_batch_of_the_single_device_run(runs, case):
    # shapes and bytes of the placed batch, gathered whole (a batch every process placed whole
    # would be twice as long, with the same mean loss)
    _, reports = runs
    want = reports["reference"]["cases"][case]["placed_batch"]
    for rank in (0, 1):
        assert reports[f"worker-{rank}"]["cases"][case]["placed_batch"] == want


@pytest.mark.parametrize("case", CASES)
def test_losses_and_grad_norms_equal_the_single_device_run(runs, case):
    _, reports = runs
    ref = reports["reference"]["cases"][case]
    for rank in (0, 1):  # both processes read the same replicated values
        got = reports[f"worker-{rank}"]["cases"][case]
        assert _close(got["losses"], ref["losses"]), (rank, got["losses"], ref["losses"])
        assert _close(got["grad_norms"], ref["grad_norms"]), (rank, got["grad_norms"], ref["grad_norms"])
        assert got["tokens"] == ref["tokens"]  # split_batches=False counts every process's part
    assert reports["worker-0"]["cases"][case]["losses"] == reports["worker-1"]["cases"][case]["losses"]


@pytest.mark.parametrize("case", CASES)
def test_state_dict_is_whole_and_the_same_on_both_processes(runs, case):
    out, reports = runs
    first, second = _state(out, "worker-0", case), _state(out, "worker-1", case)
    assert first["step"] == second["step"] == 3
    assert first["tensors"].keys() == second["tensors"].keys()
    for name, t in first["tensors"].items():
        assert torch.equal(t, second["tensors"][name]), name
    for rank in (0, 1):  # engine.model is refreshed from the devices too
        assert reports[f"worker-{rank}"]["cases"][case]["model_matches_state"]


@pytest.mark.parametrize("case", CASES)
def test_trained_state_equals_the_single_device_run(runs, case):
    out, _ = runs
    got, ref = _state(out, "worker-0", case), _state(out, "reference", case)
    assert got["tensors"].keys() == ref["tensors"].keys() and got["step"] == ref["step"]
    for name, want in ref["tensors"].items():
        have = got["tensors"][name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        diff = float((have.double() - want.double()).abs().max())
        assert diff <= STATE_RTOL * float(want.double().abs().max()) + 1e-12, (name, diff)


def test_fsdp_shards_parameters_across_processes_and_ddp_replicates_them(runs):
    _, reports = runs
    for case in CASES:
        got = reports["worker-0"]["cases"][case]
        if case in FSDP:
            assert got["params_span_processes"] and any("data" in s for s in got["param_specs"]), got["param_specs"]
        else:
            assert got["param_specs"] == ["P()"], got["param_specs"]


def test_processes_that_built_different_weights_train_process_0s(runs):
    # mlp-ddp: process 1 built its model from another seed; the losses equal the reference only
    # if process 0's weights were broadcast (a replica with other weights would change them).
    _, reports = runs
    assert _close(reports["worker-1"]["cases"]["mlp-ddp"]["losses"], reports["reference"]["cases"]["mlp-ddp"]["losses"])


def test_a_nonfinite_step_is_skipped_on_every_process(runs):
    _, reports = runs
    for rank in (0, 1):
        assert reports[f"worker-{rank}"]["cases"]["mlp-ddp"]["nan_step"] == {"skipped": True, "step_count": 3}


@pytest.mark.parametrize("case", FSDP)
def test_loaded_state_repeats_the_last_step_exactly(runs, case):
    # load_state_dict places whole host tensors onto shardings that span both processes
    _, reports = runs
    for rank in (0, 1):
        got = reports[f"worker-{rank}"]["cases"][case]
        again = got["reloaded_last_step"]
        assert (again["loss"], again["grad_norm"], again["step_count"]) == (got["losses"][-1], got["grad_norms"][-1], 3)


def test_a_batch_that_does_not_split_over_the_devices_is_one_clear_error(runs):
    _, reports = runs
    cases = reports["worker-0"]["cases"]
    whole = cases["gpt-ddp-acc2"]["batch_too_small"]  # the global batch of 4 over 4 devices x accumulate 2
    assert whole.startswith("a (micro-)batch of 2 samples does not split over 4 devices of 2 processes"), whole
    assert "global batch size divisible by 8 (devices x accumulate)" in whole
    part = cases["mlp-fsdp-parts-acc2"]["batch_too_small"]  # this process's 6 rows over its 2 devices x 2
    assert "this process's (micro-)batch of 3 samples does not split over its 2 devices" in part, part
    assert "split_batches=False" in part and "divisible by 4 (local devices x accumulate)" in part
    assert "\n" not in whole + part


def test_an_unreachable_coordinator_is_a_distributed_error_within_the_timeout():
    # Process 1 of a run whose coordinator never starts: XLA's client would abort the process at
    # its timeout; anychip checks the address first and raises instead.
    code = (
        "import anychip as ac\n"
        "try:\n    ac.init_distributed('jax:cpu')\n"
        "except ac.DistributedError as exc:\n    print('DistributedError:', exc)\n"
    )
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1", ANYCHIP_DIST_TIMEOUT="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip()
    assert line.startswith("DistributedError: no JAX coordinator reachable at JAX_COORDINATOR_ADDRESS=127.0.0.1:"), line
    assert "within 1 s (ANYCHIP_DIST_TIMEOUT)" in line and "\n" not in line


def test_a_malformed_launch_variable_is_a_distributed_error(monkeypatch):
    from anychip.backends.jax import probe
    from anychip.backends.jax.backend import JaxBackend
    from anychip.distributed import DistributedError

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(DistributedError, match=r"JAX_NUM_PROCESSES='two' must be a non-negative integer"):
        JaxBackend(probe("jax:cpu")).init_distributed()  # refused before jax.distributed is touched
