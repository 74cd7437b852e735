"""`anychip bench` argument checking: bad input is one line on stderr, exit status 2, and no
backend process is ever started."""

from __future__ import annotations

import pytest
from bench_support import one_line, run_cli

from anychip.bench import cli as bench_cli
from anychip.bench import runner


@pytest.fixture
def no_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backend was started although the input was bad")

    monkeypatch.setattr(runner, "run_backend", refuse)


BAD = [
    (["--workload", "gpt-huge"], "unknown workload 'gpt-huge'"),
    (["--workload", "no_such_module_xyz:factory"], "cannot load workload"),
    (["--backends", "cdua"], "unknown backend 'cdua'. Did you mean 'cuda'?"),
    (["--backends", "cpu,cpu"], "'cpu' is listed twice"),
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
    planned = bench_cli.plan_backends("auto")
    assert "cpu" in [n for n, _ in planned] and all(a.available for _, a in planned)


def test_auto_all_and_explicit_selection(fakes):
    auto = [n for n, _ in bench_cli.plan_backends("auto")]
    assert not any(n.startswith("fake-") for n in auto)  # test fakes are never auto-selected
    every = dict(bench_cli.plan_backends("all"))
    assert every["fake-missing"].available is False and "cpu" in every
    explicit = bench_cli.plan_backends("fake-accel, CPU")
    assert [n for n, _ in explicit] == ["fake-accel", "cpu"]


def test_default_precision(fakes):
    assert bench_cli._default_precision(bench_cli.plan_backends("cpu")) == "fp32"
    assert bench_cli._default_precision(bench_cli.plan_backends("cpu,fake-accel")) == "bf16"


def test_print_schema():
    import json

    code, out, _ = run_cli("bench", "--print-schema")
    assert code == 0 and json.loads(out)["properties"]["schema_version"] == {"const": 1}
