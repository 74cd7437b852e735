"""``parallel="ddp"`` / ``"fsdp"`` under ``torchrun --nproc-per-node 2`` on the CPU (gloo).

One torchrun launch runs every case of tests/torchrun_worker.py; the references are the same
steps in this process without ``parallel`` on the same global batches (fp32: the ranks' mean of
two half-batch gradients is the full-batch gradient up to float summation order).
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

import anychip as ac

import support
from support import requires
from torchrun_worker import CASES, STEPS, USER_CASES, batches, make_step, make_user_step

WORKER = pathlib.Path(__file__).parent / "torchrun_worker.py"
RTOL = 1e-5
LAUNCH_TIMEOUT_S = 300


def torchrun(*args: str, env_extra: dict | None = None, monitor_s: float = 0.1) -> tuple[subprocess.CompletedProcess, float]:
    return support.torchrun(WORKER, *args, env_extra=env_extra, monitor_s=monitor_s, timeout_s=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    done, _ = torchrun("train", str(tmp / "report.json"), str(tmp / "ckpt"))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp / "report.json").read_text())


def close(a, b, rtol=RTOL):
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


def single_process(workload, accumulate, start=0, stop=STEPS):
    w, step = make_step(workload, None, accumulate)
    outs = [step(b) for b in batches(w, start, stop)]
    return outs, step


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_losses_equal_the_single_process_run_on_the_same_global_batch(report, case):
    name, workload, parallel, accumulate, _, _ = case
    got = report["cases"][name]
    ref, step = single_process(workload, accumulate)
    assert close(got["losses"], [o.loss for o in ref]), (got["losses"], [o.loss for o in ref])
    assert close(got["grad_norms"], [o.grad_norm for o in ref]), (got["grad_norms"], [o.grad_norm for o in ref])
    # tokens are counted over the global batch, whichever way the ranks received it
    assert got["tokens"] == [o.tokens for o in ref]
    checksum = float(sum(v.double().sum() for v in step.state_dict()["model"].values()))
    assert got["checksum"] == pytest.approx(checksum, rel=1e-6)


@pytest.mark.parametrize("case", USER_CASES, ids=[c[0] for c in USER_CASES])
def test_the_users_torch_optimizer_and_scheduler_train_as_on_one_process(report, case):
    name, recipe, parallel = case
    got = report["user_optimizer"][name]
    w, step = make_user_step(recipe, None)
    ref = [step(b) for b in batches(w, 0, STEPS)]
    assert close(got["losses"], [o.loss for o in ref]), (got["losses"], [o.loss for o in ref])
    assert got["lrs"] == [list(o.lrs) for o in ref]  # the scheduler stepped once per update on every rank
    state = step.state_dict()
    assert got["checksum"] == pytest.approx(float(sum(v.double().sum() for v in state["model"].values())), rel=1e-6)
    slots = float(sum(t.double().sum() for by_name in state["optimizer"]["slots"].values() for t in by_name.values()))
    assert got["slots"] == pytest.approx(slots, rel=1e-5)  # the optimizer state, gathered whole
    # FSDP: the user's optimizer now holds the sharded parameters; "auto" under torchrun is DDP
    assert got["param_types"] == (["DTensor"] if parallel == "fsdp" else ["Parameter"])
    assert got["parallel"] == ("ddp" if parallel == "auto" else parallel)


def test_fsdp_shards_parameters_and_ddp_does_not(report):
    assert report["cases"]["gpt-tiny-fsdp"]["param_types"] == ["DTensor"]
    assert report["cases"]["gpt-tiny-ddp-acc2"]["param_types"] == ["Parameter"]


def test_layout_and_main_process(report):
    lay = report["layout"]
    assert (lay["engine"], lay["world_size"], lay["rank"], lay["local_world_size"], lay["nodes"]) == ("torchrun", 2, 0, 2, 1)
    assert report["is_main"] is True  # only rank 0 wrote the report


def test_a_global_batch_the_ranks_cannot_split_is_refused(report):
    msg = report["indivisible"]
    assert msg is not None and "2 processes x accumulate=2" in msg and "divisible by 4 (world size x accumulate)" in msg


@requires("safetensors")
def test_sharded_checkpoint_is_portable_and_resumes(report):
    saved = pathlib.Path(report["saved"])
    assert saved.is_dir() and saved.name == "step-000000002"
    assert close(report["resumed"], report["after_save"])  # resumed under FSDP in the same run
    # ... and on a single process: the gathered files are the ordinary portable format.
    w, step = make_step("gpt-tiny", None)
    ac.load(saved, step)
    single = [step(b).loss for b in batches(w, 2, 4)]
    assert close(single, report["after_save"])
    ref, _ = single_process("gpt-tiny", 1, 0, 4)
    assert close(single, [o.loss for o in ref][2:])


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_lost_rank_makes_the_others_fail_fast_with_a_clear_error(how):
    # The agent's monitor interval is stretched so that rank 0's own error is what ends the run
    # (by default torchrun would SIGTERM rank 0 as soon as it saw rank 1 die).
    done, seconds = torchrun(how, env_extra={"ANYCHIP_DIST_TIMEOUT": "5"}, monitor_s=3)
    assert done.returncode != 0
    assert "DistributedError: rank 0/2: step 4: a collective failed" in done.stderr, done.stderr[-3000:]
    assert "another rank probably died or hung (timeout 5 s" in done.stderr
    assert seconds < 90, seconds  # start-up + 3 steps + the 5 s timeout, not a hang
