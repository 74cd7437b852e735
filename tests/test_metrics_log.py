"""Per-step run logs: MetricsLogger's JSONL and TensorBoard files, TrainStep(logger=) reading each
step one step late, `anychip train --log-dir / --profile`, and the bad inputs they refuse."""

from __future__ import annotations

import glob
import json
import math
import os
import types

import numpy as np
import pytest
import torch
from support import requires
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import anychip as ac
from anychip import metrics_log, workloads
from anychip import step as step_module
from anychip.cli import main
from anychip.engine import StepOutput

MLP = ["train", "--workload", "mlp", "--backend", "cpu", "--no-compile"]


def jsonl(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, metrics_log.JSONL)) as f:
        return [json.loads(line) for line in f]


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def cli_run(args, capsys) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- anychip train --log-dir ------------------------------------------------------------------------


def test_train_log_dir_writes_each_step_once_as_trainstep_computes_it(tmp_path, capsys):
    rc, _, err = cli_run([*MLP, "--steps", "5", "--log-dir", str(tmp_path)], capsys)
    assert rc == 0, err
    run = tmp_path / "version_0"
    rows = jsonl(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]

    # The same run by hand, as `anychip train` builds it (seed 0, its schedule and clipping).
    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=1, total=5)),
                        backend="cpu", max_grad_norm=1.0, compile=False)
    data = w.batches(w.default_batch, w.default_seq, seed=0)
    outs = [step(next(data)) for _ in range(5)]
    assert [r["loss"] for r in rows] == [o.loss for o in outs]
    assert [(r["grad_norm"], r["lr"], r["tokens"], r["skipped"]) for r in rows] == [(o.grad_norm, o.lr, o.tokens, False) for o in outs]
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] == r["tokens"] / r["step_time_s"] for r in rows)

    # TensorBoard's own reader sees the same five losses (stored as float32).
    assert scalars(run, "loss") == [(r["step"], float(torch.tensor(r["loss"], dtype=torch.float32))) for r in rows]

    # A second run into the same directory gets its own version; the first one's file is untouched.
    before = (run / metrics_log.JSONL).read_bytes()
    rc, out, err = cli_run([*MLP, "--steps", "2", "--log-dir", str(tmp_path)], capsys)
    assert rc == 0, err
    assert f"run logs: {tmp_path / 'version_1'}" in out
    assert (run / metrics_log.JSONL).read_bytes() == before
    assert [r["step"] for r in jsonl(tmp_path / "version_1")] == [1, 2]


def test_train_profile_leaves_a_chrome_trace(tmp_path, capsys):
    rc, out, err = cli_run([*MLP, "--steps", "4", "--log-dir", str(tmp_path), "--profile", "2"], capsys)
    assert rc == 0, err
    assert "trace of steps 3-4" in out
    traces = glob.glob(str(tmp_path / "version_0" / "*.pt.trace.json"))
    assert len(traces) == 1
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)  # the traced steps' ops, not an empty trace
    assert len(jsonl(tmp_path / "version_0")) == 4


@requires("jax", "torchax", "optax")
def test_train_profile_on_jax_uses_the_jax_profiler(tmp_path, capsys):
    rc, _, err = cli_run(["train", "--workload", "mlp", "--backend", "jax:cpu", "--steps", "3", "--log-dir", str(tmp_path),
                          "--profile", "1"], capsys)
    assert rc == 0, err
    assert glob.glob(str(tmp_path / "version_0" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert not glob.glob(str(tmp_path / "version_0" / "*.pt.trace.json"))
    assert [r["step"] for r in jsonl(tmp_path / "version_0")] == [1, 2, 3]


@pytest.mark.parametrize(("extra", "message"), [
    (["--profile", "2"], "anychip train: error: --profile 2 needs --log-dir DIR"),
    (["--profile", "3", "--log-dir", "{dir}"], "--profile 3 traces 3 steps after 2 warm-up steps; use --steps 5 or more"),
    (["--log-dir", "{file}"], "is an existing file, not a directory"),
    (["--log-dir", "{file}/sub"], "cannot create log_dir"),
    (["--profile", "0", "--log-dir", "{dir}"], "must be >= 1"),
])
def test_train_refuses_bad_log_options_in_one_line_before_training(tmp_path, capsys, extra, message):
    keep = tmp_path / "notes.txt"
    keep.write_text("the user's own file")
    args = [a.format(dir=tmp_path / "logs", file=keep) for a in extra]
    try:
        rc = main([*MLP, "--steps", "4", *args])
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    out = capsys.readouterr()
    assert rc == 2
    assert message in out.err and len(out.err.strip().splitlines()) == 1
    assert "mlp on cpu" not in out.out  # nothing trained
    assert keep.read_text() == "the user's own file"
    assert not (tmp_path / "logs").exists()


# -- TrainStep(logger=): one step late ----------------------------------------------------------------


class Probe:
    """A device value whose host read is recorded: (the call running then, the call it came from)."""

    def __init__(self, value, call, reads, clock):
        self.value, self.call, self.reads, self.clock = value, call, reads, clock

    def __float__(self):
        self.reads.append((self.clock.phase, self.call))
        return float(self.value)


class FakeEngine:
    """Stands in for the backend's engine: call n's loss is 1/n; call 3's is NaN and skipped, so
    (as on every backend) it reports the updates applied before it, and call 4 is update 3."""

    def __init__(self, clock):
        self.updates, self.calls, self.reads, self.clock = 0, 0, [], clock

    def step(self, batch, tokens):
        self.calls += 1
        n, skipped = self.calls, self.calls == 3
        self.updates += 0 if skipped else 1
        loss = math.nan if skipped else 1 / n
        return StepOutput(self.updates, Probe(loss, n, self.reads, self.clock), Probe(2.0, n, [], self.clock), (0.1 * n, 0.2 * n),
                          tokens, skipped=skipped)

    def synchronize(self):
        pass


class FakeClock:
    """perf_counter() for the step module: deterministic, so no test measures real time."""

    def __init__(self):
        self.now, self.phase = 100.0, None

    def perf_counter(self):
        return self.now

    def time(self):
        return 1.7e9 + self.now


class Recorder:
    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def log(self, record):
        self.calls.append((self.clock.phase, dict(record)))


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    for module in (step_module, metrics_log):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=fake.perf_counter, time=fake.time))
    return fake


def mlp_step(logger):
    w = workloads.get("mlp")
    return ac.TrainStep(w.build(seed=0), w.loss_fn, backend="cpu", compile=False, logger=logger), w


def test_step_n_is_logged_during_call_n_plus_1_and_its_loss_not_read_before(clock):
    recorder = Recorder(clock)
    step, w = mlp_step(recorder)
    step.engine = engine = FakeEngine(clock)
    batch = next(w.batches(8, 1))
    for n, seconds in zip(range(1, 5), (2.0, 0.5, 0.25, 1.0)):
        clock.phase = n
        step(batch)
        assert all(phase != n or call != n for phase, call in engine.reads)  # a step's loss is never read in its own call
        clock.now += seconds
    clock.phase = "synchronize"
    step.synchronize()

    assert engine.reads == [(2, 1), (3, 2), (4, 3), ("synchronize", 4)]
    assert [phase for phase, _ in recorder.calls] == [2, 3, 4, "synchronize"]
    records = [r for _, r in recorder.calls]
    assert [r["step"] for r in records] == [1, 2, 2, 3]  # the skipped call applied no update
    assert records[2]["loss"] != records[2]["loss"]  # NaN, handed on as it is; the logger decides how to write it
    assert [r["step_time_s"] for r in records] == [2.0, 0.5, 0.25, 1.0]  # start of one call to the start of the next
    assert [r["tokens_per_s"] for r in records] == [8 / 2.0, 8 / 0.5, 8 / 0.25, 8 / 1.0]
    assert [r["lrs"] for r in records] == [[0.1 * n, 0.2 * n] for n in range(1, 5)]
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert records[0]["time"] == 1.7e9 + 100.0


def test_metrics_logger_writes_strict_json_and_tensorboard_per_group(tmp_path, clock):
    with ac.MetricsLogger(tmp_path, flush_every=1) as logger:
        step, w = mlp_step(logger)
        step.engine = FakeEngine(clock)
        batch = next(w.batches(8, 1))
        for _ in range(3):
            step(batch)
            clock.now += 1.0
        rows = jsonl(logger.run_dir)
        assert [r["loss"] for r in rows] == [1.0, 0.5]  # the third is still held, not yet read
    rows = jsonl(logger.run_dir)  # close() wrote it
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, False), (2, True)]
    assert rows[2]["loss"] is None  # NaN is not JSON: null, and the record says the update was skipped
    assert [v for _, v in scalars(logger.run_dir, "lrs/1")] == pytest.approx([0.2, 0.4, 0.6])
    assert math.isnan(scalars(logger.run_dir, "loss")[2][1])
    logger.close()  # a second close does nothing
    assert len(jsonl(logger.run_dir)) == 3


def test_log_values_for_hand_written_rows_and_versions_never_overwrite(tmp_path):
    with ac.MetricsLogger(tmp_path, tensorboard=False) as first:
        first.log_values(3, loss=0.5, tokens_per_s=1.5e5, backend="cpu", lrs=[1e-3, 2e-3], ok=np.bool_(True), n=np.int64(2))
    with ac.MetricsLogger(tmp_path) as second:
        second.log_values(7, loss=0.25)
    assert (first.version, second.version) == (0, 1)
    assert jsonl(first.run_dir) == [{"step": 3, "loss": 0.5, "tokens_per_s": 1.5e5, "backend": "cpu", "lrs": [1e-3, 2e-3], "ok": True,
                                     "n": 2}]
    assert not glob.glob(os.path.join(first.run_dir, "events.out.tfevents.*"))
    assert scalars(second.run_dir, "loss") == [(7, 0.25)]


# -- bad input -----------------------------------------------------------------------------------------


def one_line(exc_info, *needles):
    text = str(exc_info.value)
    assert "\n" not in text and all(n in text for n in needles), text


def test_metrics_logger_refuses_bad_arguments_before_creating_anything(tmp_path, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_text("keep")
    for kwargs, needles in [
        ({"log_dir": a_file}, ("is an existing file, not a directory",)),
        ({"log_dir": a_file / "sub"}, ("cannot create log_dir", "Not a directory")),
        ({"log_dir": 3}, ("log_dir must be a directory path",)),
        ({"log_dir": tmp_path / "new", "tensorboard": False, "jsonl": False}, ("would write nothing",)),
        ({"log_dir": tmp_path / "new", "flush_every": 0}, ("flush_every must be an int >= 1",)),
        ({"log_dir": tmp_path / "new", "tensorboard": "no"}, ("tensorboard must be True or False",)),
    ]:
        with pytest.raises(ac.InvalidArgumentError) as exc:
            ac.MetricsLogger(**kwargs)
        one_line(exc, *needles)
    monkeypatch.setattr(metrics_log, "tensorboard_available", lambda: False)
    with pytest.raises(ac.InvalidArgumentError) as exc:
        ac.MetricsLogger(tmp_path / "new")
    one_line(exc, "pip install 'anychip[logs]'", "tensorboard=False")
    assert a_file.read_text() == "keep" and not (tmp_path / "new").exists()
    with ac.MetricsLogger(tmp_path / "new", tensorboard=False) as logger:  # JSONL alone needs no package
        logger.log_values(0, loss=1.0)
    assert jsonl(logger.run_dir) == [{"step": 0, "loss": 1.0}]


def test_bad_records_and_loggers_are_refused(tmp_path):
    logger = ac.MetricsLogger(tmp_path, tensorboard=False)
    for record, needles in [
        ({"loss": 1.0}, ("record['step'] must be an int >= 0",)),
        ({"step": 1, "loss": torch.tensor(1.0)}, ("record['loss'] must be a number", "float(t)")),
        ([("step", 1)], ("record must be a dict",)),
    ]:
        with pytest.raises(ac.InvalidArgumentError) as exc:
            logger.log(record)
        one_line(exc, *needles)
    for bad, needles in [(object(), ("logger must be an object with a log(record: dict) method",)),
                         (ac.MetricsLogger, ("logger must be",))]:
        with pytest.raises(ac.InvalidArgumentError) as exc:
            mlp_step(bad)
        one_line(exc, *needles)
    step, w = mlp_step(logger)
    logger.close()
    with pytest.raises(ac.InvalidArgumentError) as exc:
        step(next(w.batches(8, 1)))
    one_line(exc, "is closed")
    with pytest.raises(ac.InvalidArgumentError) as exc:
        mlp_step(logger)
    one_line(exc, "is closed")
    with pytest.raises(ac.InvalidArgumentError) as exc:
        logger.log_values(1, loss=1.0)
    one_line(exc, "log() after close()")
    assert jsonl(logger.run_dir) == []
