"""TrainStep on `neuron-xla` (torch_xla lazy tensors, PJRT_DEVICE=CPU in CI): what is particular
to lazy tensors, the graph counts read from torch_xla's metrics, and state moving between `cpu`
and `neuron-xla`. The semantics every backend shares (parity with a hand-written loop,
accumulation, clipping, non-finite policies, state_dict, recompile warnings) are
tests/conformance, run on neuron-xla by `make test-xla`.

Compiled graphs are cached per process by hash, so the counts below are deltas, and each exact
count is taken by a session fixture that runs its configuration first (the other tests reuse
its shapes, which also keeps this file within its time budget on two cores).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import anychip as ac
from anychip import workloads
from anychip.recompile import RecompileError, pad_to_bucket

STEPS = 10
SHAPES = {"mlp": (8, 1), "gpt-tiny": (4, 16)}  # (batch, seq): tiny, reused by every test


def adamw(total: int = STEPS) -> ac.AdamW:
    # A schedule that changes the lr every step: with the lr on the device it never recompiles.
    return ac.AdamW(lr=1e-2, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=3, total=total))


def data(name: str, n: int, start: int = 0, seq: int | None = None) -> list:
    batch, default_seq = SHAPES[name]
    return [workloads.get(name).batch(start + i, batch, seq or default_seq) for i in range(n)]


def make(name: str, backend: str, optimizer=None, **kw) -> ac.TrainStep:
    w = workloads.get(name)
    return ac.TrainStep(w.build(seed=0), w.loss_fn, optimizer or adamw(), backend=backend, max_grad_norm=1.0, **kw)


@dataclasses.dataclass
class Run:
    """Per step: loss, and compiles / executions counted from before the TrainStep was built."""

    losses: list[float]
    compiles: list[int]
    executions: list[int]
    compiles_building: int


def run_xla(name: str, batches: list, optimizer=None, **kw) -> Run:
    be = ac.backend("neuron-xla")
    start = be.graph_stats()
    step = make(name, "neuron-xla", optimizer, **kw)
    built = be.graph_stats()["compiles"] - start["compiles"]
    losses, compiles, executions = [], [], []
    for b in batches:
        losses.append(step(b).loss)  # read after the step's sync: a copy, not a graph
        be.synchronize()  # executions are counted when they finish
        now = be.graph_stats()
        compiles.append(now["compiles"] - start["compiles"])
        executions.append(now["executions"] - start["executions"])
    return Run(losses, compiles, executions, built)


def run_cpu(name: str, batches: list, optimizer=None, **kw) -> list[float]:
    step = make(name, "cpu", optimizer, **kw)
    return [step(b).loss for b in batches]


def assert_close_per_step(got, expected, rtol):
    for i, (g, e) in enumerate(zip(got, expected, strict=True), start=1):
        assert math.isfinite(g) and abs(g - e) <= rtol * abs(e), f"step {i}: neuron-xla {g!r} vs cpu {e!r}"


@pytest.fixture(scope="session")
def fresh_runs():
    """The first run of each workload's configuration in this process (exact compile counts)."""
    return {name: run_xla(name, data(name, STEPS)) for name in SHAPES}


# -- graph counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_one_graph_per_step_from_step_two(fresh_runs, name):
    xla = fresh_runs[name]
    # Building the step compiles nothing (the device lr is set after AdamW.__init__).
    assert xla.compiles_building == 0
    # Step 1 has its own graph (AdamW creates its state there); steps 2..10 reuse one graph.
    assert xla.compiles == [1] + [2] * (STEPS - 1)
    # One execution per step: the loss, grad norm and non-finite flag are read after the sync.
    assert xla.executions == list(range(1, STEPS + 1))


def test_accumulate_two_adds_no_graph():
    batches = data("mlp", 6, start=100)
    xla = run_xla("mlp", batches, accumulate=2)
    assert xla.compiles == [1] + [2] * 5  # both micro-batches are in the step's one graph
    assert xla.executions == list(range(1, 7))
    assert_close_per_step(xla.losses, run_cpu("mlp", batches, accumulate=2), rtol=1e-5)


def test_sgd_float_lr_changing_every_step_does_not_recompile():
    spec = lambda: ac.SGD(lr=5e-2, momentum=0.9, weight_decay=0.01, schedule=ac.WarmupCosine(warmup=2, total=8))  # noqa: E731
    batches = data("mlp", 6, start=200)
    xla = run_xla("mlp", batches, spec())
    assert xla.compiles == [1] + [2] * 5  # step 1 creates the momentum buffer
    assert_close_per_step(xla.losses, run_cpu("mlp", batches, spec()), rtol=1e-5)


def test_bf16_autocast_runs_in_bf16_without_extra_graphs():
    be = ac.backend("neuron-xla")
    batches = data("gpt-tiny", 5, start=300)
    start = be.graph_stats()["compiles"]
    step = make("gpt-tiny", "neuron-xla", precision="bf16")
    seen = []
    step.model.blocks[0].attn.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))  # an nn.Linear
    losses, compiles = [], []
    for b in batches:
        losses.append(step(b).loss)
        compiles.append(be.graph_stats()["compiles"] - start)
    assert seen == [torch.bfloat16] * 5  # torch.autocast("xla") is on
    assert all(p.dtype == torch.float32 for p in step.model.parameters())  # fp32 master weights
    assert compiles == [1, 2, 2, 2, 2]  # the same graph count as fp32
    assert_close_per_step(losses, run_cpu("gpt-tiny", batches, precision="bf16"), rtol=1e-2)


# -- recompilation ---------------------------------------------------------------------------------


def test_sequence_length_change_compiles_once(fresh_runs):
    be = ac.backend("neuron-xla")
    step = make("gpt-tiny", "neuron-xla")
    counts = []
    for seq in (16, 16, 24, 24, 16):  # 24 is used by no other test in this process
        step(data("gpt-tiny", 1, start=400, seq=seq)[0])
        counts.append(be.graph_stats()["compiles"])
    assert counts[2] - counts[1] == 1  # the new length: exactly one new graph
    assert counts[4] == counts[2]  # seen lengths reuse their graphs


def test_strict_shapes_refuses_before_compiling(fresh_runs):
    be = ac.backend("neuron-xla")
    step = make("gpt-tiny", "neuron-xla", strict_shapes=True)
    for b in data("gpt-tiny", 2, start=500):
        step(b)
    before = be.graph_stats()["compiles"]
    with pytest.raises(RecompileError, match=r"shape \(4, 16\) -> \(4, 20\).*'neuron-xla'.*strict_shapes=True"):
        step(data("gpt-tiny", 1, start=502, seq=20)[0])
    assert be.graph_stats()["compiles"] == before and step.step_count == 2


def test_pad_to_bucket_keeps_one_graph(fresh_runs):
    be = ac.backend("neuron-xla")
    step = make("gpt-tiny", "neuron-xla")
    counts = []
    for i, seq in enumerate((16, 10, 13, 7, 16, 11)):
        out = step(pad_to_bucket(data("gpt-tiny", 1, start=600 + i, seq=seq)[0], buckets=(16,)))
        assert math.isfinite(out.loss)
        counts.append(be.graph_stats()["compiles"])
    assert counts[1:] == [counts[1]] * 5  # nothing compiled after step 2, whatever the length


# -- the non-finite check: masked on the device, read after the sync --------------------------------


def poisoned(batch):
    x, labels = batch
    x = x.clone()
    x[0, 0] = float("nan")
    return x, labels


def test_nonfinite_raise_costs_no_graph_and_no_execution(fresh_runs):
    """The flag is read after the next call's sync (reading it at once would cost a graph), and
    the mask that withholds the update is in the step's graph. What the policy does to the
    training state is tests/conformance."""
    be = ac.backend("neuron-xla")
    good = data("mlp", 3, start=700)
    compiles = be.graph_stats()["compiles"]
    xla = make("mlp", "neuron-xla")
    for b in good[:2]:
        xla(b)
    be.synchronize()
    executions = be.graph_stats()["executions"]
    out = xla(poisoned(good[2]))  # returns: the error comes with the next call
    assert math.isnan(out.loss)
    with pytest.raises(ac.NonFiniteLossError, match="step 3"):
        xla(good[2])
    be.synchronize()
    assert be.graph_stats()["executions"] - executions == 1  # the poisoned step's own graph only
    assert be.graph_stats()["compiles"] == compiles  # the check and the mask add no graph


def test_nonfinite_skip_is_known_at_once_and_adds_no_graph(fresh_runs):
    be = ac.backend("neuron-xla")
    good = data("mlp", 3, start=800)
    compiles = be.graph_stats()["compiles"]
    xla = make("mlp", "neuron-xla", on_nonfinite="skip")
    sequence = [poisoned(good[0]), good[0], good[1], poisoned(good[2]), good[2]]
    assert [xla(b).skipped for b in sequence] == [True, False, False, True, False]  # without waiting a step
    assert be.graph_stats()["compiles"] == compiles


# -- portable training state between `cpu` and `neuron-xla` -------------------------------------
# Last in this file on purpose: the exact graph counts above are taken by the session fixture
# first, and these tests reuse its shapes (cached graphs) instead of compiling their own.

MOVE_STEPS = 6  # 3 before the move, 3 after


OPTIMIZERS = {
    "adamw-warmupcosine": lambda: adamw(MOVE_STEPS),
    "adamw-constant": lambda: ac.AdamW(lr=1e-2, weight_decay=0.1),
    "sgd-nesterov-warmuplinear": lambda: ac.SGD(
        lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=ac.WarmupLinear(1, MOVE_STEPS)
    ),
    "sgd-momentum-constant": lambda: ac.SGD(lr=5e-2, momentum=0.9),
    "sgd-plain-warmupcosine": lambda: ac.SGD(lr=5e-2, schedule=ac.WarmupCosine(2, MOVE_STEPS)),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("first, second", [("cpu", "neuron-xla"), ("neuron-xla", "cpu")])
def test_resume_on_the_other_backend_equals_uninterrupted_cpu(tmp_path, optimizer, first, second):
    batches = data("gpt-tiny", MOVE_STEPS)
    straight = make("gpt-tiny", "cpu", optimizer())
    expected = [straight(b).loss for b in batches]

    opt = optimizer()
    a = make("gpt-tiny", first, opt)
    got = [a(b).loss for b in batches[:3]]
    ac.save(a, tmp_path)
    b = make("gpt-tiny", second, opt)
    ac.load(tmp_path, b)
    assert b.step_count == 3
    got += [b(x).loss for x in batches[3:]]
    # fp32, the tolerance of the parity tests (measured differences are ~1e-6)
    assert got == pytest.approx(expected, rel=1e-5)
