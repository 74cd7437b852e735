"""`anychip bench` argument checking: bad input is one line on stderr, exit status 2, and no
backend process is ever started."""

from __future__ import annotations

import pytest
from bench_support import one_line, run_cli

from anychip.bench import cli as bench_cli
from anychip.bench import plan, supervise
from anychip.cli import UsageError


@pytest.fixture
def no_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backend was started although the input was bad")

    monkeypatch.setattr(supervise, "run_backend", refuse)


BAD = [
    (["--workload", "gpt-huge"], "unknown workload 'gpt-huge'"),
    (["--workload", "no_such_module_xyz:factory"], "cannot load workload"),
    (["--backends", "cdua"], "unknown backend 'cdua'. Did you mean 'cuda' (PyTorch on NVIDIA GPUs)?"),
    (["--backends", "cpu,cpu"], "'cpu' is named twice"),
    (["--backends", "cpu,,jax:cpu"], "empty name"),
    (["--backends", "auto,cpu"], "cannot be combined"),
    (["--steps", "0"], "must be >= 1"),
    (["--steps", "-3"], "must be >= 1"),
    (["--warmup", "0"], "must be >= 1"),
    (["--batch", "0"], "must be >= 1"),
    (["--seq", "ten"], "expected a whole number"),
    (["--timeout", "0"], "must be > 0"),
    (["--timeout", "-5"], "must be > 0"),
    (["--timeout", "inf"], "must be a finite number > 0"),
    (["--parity-tol", "0"], "must be > 0"),
    (["--peak-tflops", "0"], "peak must be a finite number > 0"),
    (["--peak-tflops", "cuda=fast"], "expected X or NAME=X"),
    (["--precision", "fp64"], "unknown precision 'fp64'"),
    (["--kernels", "fast"], "invalid choice"),
    (["--price", "cuda"], "NAME=USD_PER_HOUR"),
    (["--price", "cuda=cheap"], "is not a number"),
    (["--price", "=2"], "NAME=USD_PER_HOUR"),
    (["--price", "cuda=-1"], "must be a finite number >= 0"),
    (["--json", "/no/such/dir/out.json"], "does not exist"),
    (["--csv", "."], "is a directory"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--nproc", "0"], "process counts must be >= 1, got 0"),
    (["--nproc", "1,-2"], "process counts must be >= 1, got -2"),
    (["--nproc", "a"], "expected whole numbers such as 1,2,4, got 'a'"),
    (["--nproc", "1.5"], "expected whole numbers such as 1,2,4, got '1.5'"),
    (["--nproc", "1,,2"], "empty count in '1,,2'"),
    (["--nproc", ""], "empty count in ''"),
    (["--nproc", "2,1,2"], "2 is listed twice in '2,1,2'"),
    (["--parallel", "fsdp"], "--parallel fsdp applies to --nproc counts > 1"),
    (["--nproc", "2", "--parallel", "tp"], "invalid choice: 'tp'"),
    (["--backends", "jax:cpu", "--nproc", "2"], "jax:cpu runs in one process"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(argv, message, no_runs):
    code, out, err = run_cli("bench", *argv)
    assert code == 2
    assert out == ""
    line = one_line(err)
    # unknown options are reported by the top-level parser ("anychip: error: ...")
    assert line.startswith(("anychip bench: error: ", "anychip: error: "))
    assert message in line


def test_nproc_parses_to_ascending_counts():
    from anychip.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench"]).nproc == [1]
    assert parser.parse_args(["bench", "--nproc", " 4, 1,2"]).nproc == [1, 2, 4]


def test_bench_refuses_to_run_inside_a_launch(monkeypatch, no_runs):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli("bench", "--nproc", "1,2")
    assert code == 2 and "anychip bench starts its own processes" in one_line(err)


def test_rows_per_process_count_with_jax_at_one_process_only(fakes):
    planned, chosen_by = plan.plan_backends("cpu,jax:cpu,fake-accel,fake-missing")
    assert chosen_by == "named"
    rows, left = plan.plan_rows(planned, [1, 2, 4], explicit=True)
    # an unavailable backend is one row (at the first count), not one per count
    assert [(name, n) for name, _, n in rows] == [("cpu", 1), ("cpu", 2), ("cpu", 4), ("jax:cpu", 1), ("fake-accel", 1), ("fake-accel", 2),
                                                  ("fake-accel", 4), ("fake-missing", 1)]
    assert left == ["jax:cpu"]
    rows, left = plan.plan_rows(planned, [1], explicit=True)  # the default: one row per backend, nothing left out
    assert [(name, n) for name, _, n in rows] == [("cpu", 1), ("jax:cpu", 1), ("fake-accel", 1), ("fake-missing", 1)] and left == []
    # picked by auto/all, a jax backend without a 1 in --nproc is left out with a note, not an error
    rows, left = plan.plan_rows(planned, [2, 4], explicit=False)
    assert [(name, n) for name, _, n in rows] == [("cpu", 2), ("cpu", 4), ("fake-accel", 2), ("fake-accel", 4), ("fake-missing", 2)]
    assert left == ["jax:cpu"]
    with pytest.raises(UsageError, match="none of the selected backends runs under torchrun"):
        plan.plan_rows(plan.plan_backends("jax:cpu")[0], [2], explicit=False)


def test_a_plugin_registered_with_jax_distributed_runs_in_one_process(fakes):
    from anychip.backends import Registration, register, unregister

    register(Registration("fake-mesh", "anychip.backends.torch.cpu", 1, auto=False, launcher="jax.distributed"))
    try:
        rows, left = plan.plan_rows(plan.plan_backends("cpu,fake-mesh")[0], [1, 2], explicit=True)
    finally:
        unregister("fake-mesh")
    assert [(name, n) for name, _, n in rows] == [("cpu", 1), ("cpu", 2), ("fake-mesh", 1)] and left == ["fake-mesh"]
    with pytest.raises(ValueError, match="launcher of 'x' must be one of"):
        Registration("x", "anychip.backends.torch.cpu", 1, launcher="mpirun")


def test_unwritable_output_path(tmp_path, no_runs):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli("bench", "--md", str(blocker / "out.md"))  # a file used as a directory
    assert code == 2 and "does not exist" in one_line(err)


def test_bad_plugin_module_is_bad_input(monkeypatch, no_runs):
    monkeypatch.setenv("ANYCHIP_PLUGINS", "no_such_plugin_xyz")
    code, _, err = run_cli("bench")
    assert code == 2 and "cannot import plug-in 'no_such_plugin_xyz' named in $ANYCHIP_PLUGINS" in one_line(err)


def test_defaults_without_arguments():
    from anychip.cli import build_parser

    args = build_parser().parse_args(["bench"])
    assert (args.workload, args.backends, args.steps, args.warmup, args.precision) == ("gpt-tiny", "auto", 50, 5, None)
    planned, chosen_by = plan.plan_backends("auto")
    assert chosen_by == "auto" and "cpu" in [n for n, _ in planned] and all(a.available for _, a in planned)


def test_auto_all_and_explicit_selection(fakes):
    auto = [n for n, _ in plan.plan_backends("auto")[0]]
    assert not any(n.startswith("fake-") for n in auto)  # test fakes are never auto-selected
    every, chosen_by = plan.plan_backends(" ALL ")
    every = dict(every)
    assert chosen_by == "all"
    assert every["fake-missing"].available is False and "cpu" in every
    explicit, chosen_by = plan.plan_backends("fake-accel, CPU")
    assert [n for n, _ in explicit] == ["fake-accel", "cpu"] and chosen_by == "named"


def test_default_precision(fakes):
    assert plan.default_precision(plan.plan_backends("cpu")[0]) == "fp32"
    assert plan.default_precision(plan.plan_backends("cpu,fake-accel")[0]) == "bf16"


def test_print_schema():
    import json

    code, out, _ = run_cli("bench", "--print-schema")
    assert code == 0 and json.loads(out)["properties"]["schema_version"] == {"const": 2}


def test_the_reproducing_command_names_nproc_only_for_several_processes():
    from anychip.cli import build_parser

    config = {"batch": 64, "seq": 1, "precision": "fp32", "parity_tolerance": 1e-3, "nproc": [1], "parallel": None, "repeat": 5,
              "reference": "cpu"}
    plain = bench_cli._command(build_parser().parse_args(["bench"]), config)
    assert "--nproc" not in plain and "--parallel" not in plain
    scaled = bench_cli._command(build_parser().parse_args(["bench", "--nproc", "2,1"]), {**config, "nproc": [1, 2], "parallel": "ddp"})
    assert scaled[-4:] == ["--nproc", "1,2", "--parallel", "ddp"]
