"""Every ``anychip`` sub-command refuses bad input the same way: exit status 2, exactly one line on
stderr (``anychip <command>: error: ...``) that names what was wrong, no traceback, nothing on
stdout, and no work started. A bug is one line and status 1; ``--debug`` shows the traceback.

The cases run in this process through ``anychip.cli.main``; the plug-ins and workload factories
they name are written to a temporary folder ("{tmp}" in a case is that folder).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import pytest

from anychip.bench.supervise import LAUNCH_ENV
from anychip.cli import main
from anychip.errors import InvalidArgumentError

FILES = {
    "badcli_raises.py": "raise RuntimeError('boom while importing')\n",
    "badcli_exits.py": "import sys\nsys.exit(3)\n",
    "badcli_syntax.py": "def broken(:\n",
    "badcli_needs_sdk.py": "import no_such_sdk_badcli\n",
    "badcli_duplicate.py": (
        "from anychip.backends.registry import Registration, register\n"
        "register(Registration('cpu', __name__, priority=1))\n"
    ),
    "badcli_nochip.py": (
        "from anychip.backends.registry import Availability, Registration, register\n"
        "def probe(name):\n"
        "    return Availability(name, False, 'no nochip board in this machine', install='pip install nochip-sdk')\n"
        "register(Registration('badcli-nochip', __name__, priority=1, auto=False))\n"
    ),
    "badcli_workloads.py": (
        "def raises():\n    raise ZeroDivisionError('no workload today')\n"
        "def returns_none():\n    return None\n"
        "def needs_an_argument(size):\n    return size\n"
    ),
    "not_a_result.json": json.dumps({"kind": "something else"}),
    "not_json.json": "{ this is not json",
    "negative_prices.json": json.dumps({"prices": [{"match": "Xeon", "usd_per_device_hour": -1.0, "source": "https://example.com",
                                                     "source_date": "2026-01-01"}]}),
}
HUGE = "99999999999"
PLUGINS = "ANYCHIP_PLUGINS"

# (id, argv, environment, text the error line must contain: the bad flag or value)
CASES = [
    # the top-level parser
    ("no-command", [], {}, "devices,train,bench,parity"),
    ("unknown-command", ["trian"], {}, "'trian'"),
    ("top-level-unknown-flag", ["--frobnicate", "devices"], {}, "--frobnicate"),
    # devices
    ("devices-unknown-flag", ["devices", "--jsn"], {}, "--jsn"),
    ("devices-extra-argument", ["devices", "everything"], {}, "everything"),
    ("devices-json-with-value", ["devices", "--json=yes"], {}, "--json"),
    ("devices-plugin-not-importable", ["devices"], {PLUGINS: "no_such_plugin_badcli"}, "'no_such_plugin_badcli'"),
    ("devices-plugin-file-missing", ["devices"], {PLUGINS: "{tmp}/badcli_missing.py"}, "badcli_missing.py"),
    ("devices-plugin-raises", ["devices", "--json"], {PLUGINS: "{tmp}/badcli_raises.py"},
     "badcli_raises.py' named in $ANYCHIP_PLUGINS failed on import: RuntimeError: boom"),
    ("devices-plugin-calls-exit", ["devices"], {PLUGINS: "{tmp}/badcli_exits.py"},
     "badcli_exits.py' named in $ANYCHIP_PLUGINS failed on import: SystemExit"),
    ("devices-plugin-syntax-error", ["devices"], {PLUGINS: "{tmp}/badcli_syntax.py"},
     "badcli_syntax.py' named in $ANYCHIP_PLUGINS failed on import: SyntaxError"),
    ("devices-plugin-needs-sdk", ["devices"], {PLUGINS: "{tmp}/badcli_needs_sdk.py"}, "no_such_sdk_badcli"),
    ("devices-plugin-duplicate-name", ["devices"], {PLUGINS: "{tmp}/badcli_duplicate.py"}, "a backend named 'cpu' is already registered"),
    # train: the workload
    ("train-workload-unknown", ["train", "--workload", "gtp-tiny"], {}, "unknown workload 'gtp-tiny'"),
    ("train-workload-empty", ["train", "--workload", ""], {}, "unknown workload ''"),
    ("train-workload-not-a-factory", ["train", "--workload", "os:getcwd"], {}, "'os:getcwd' returned str"),
    ("train-workload-factory-returns-none", ["train", "--workload", "badcli_workloads:returns_none"], {}, "returned NoneType"),
    ("train-workload-factory-raises", ["train", "--workload", "badcli_workloads:raises"], {},
     "raised ZeroDivisionError: no workload today"),
    ("train-workload-factory-needs-arguments", ["train", "--workload", "badcli_workloads:needs_an_argument"], {},
     "'badcli_workloads:needs_an_argument' raised TypeError"),
    ("train-workload-not-callable", ["train", "--workload", "os:sep"], {}, "'os:sep' is a str, not a factory"),
    ("train-workload-module-missing", ["train", "--workload", "no_such_module_badcli:make"], {}, "'no_such_module_badcli:make'"),
    ("train-workload-factory-missing", ["train", "--workload", "os:no_such_factory"], {}, "no_such_factory"),
    ("train-workload-no-module", ["train", "--workload", ":make"], {}, "':make'"),
    ("train-workload-no-factory", ["train", "--workload", "os:"], {}, "'os:'"),
    # train: the batch
    ("train-seq-beyond-gpt-context", ["train", "--workload", "gpt-tiny", "--seq", "100000"], {},
     "--seq 100000 is longer than the context length of workload 'gpt-tiny' (128"),
    ("train-seq-beyond-llama-context", ["train", "--workload", "llama-tiny", "--seq", "129"], {}, "--seq 129"),
    ("train-seq-for-mlp", ["train", "--workload", "mlp", "--seq", "4"], {}, "--seq 4"),
    ("train-batch-beyond-memory", ["train", "--workload", "gpt-tiny", "--batch", HUGE], {}, f"--batch {HUGE}"),
    ("train-batch-beyond-memory-mlp", ["train", "--workload", "mlp", "--batch", HUGE], {}, f"--batch {HUGE}"),
    ("train-batch-zero", ["train", "--batch", "0"], {}, "--batch: must be >= 1"),
    ("train-batch-negative", ["train", "--batch", "-4"], {}, "--batch: must be >= 1, got -4"),
    ("train-batch-fraction", ["train", "--batch", "2.5"], {}, "--batch: expected a whole number, got '2.5'"),
    ("train-seq-zero", ["train", "--seq", "0"], {}, "--seq: must be >= 1"),
    # train: the other numbers
    ("train-steps-zero", ["train", "--steps", "0"], {}, "--steps: must be >= 1"),
    ("train-steps-text", ["train", "--steps", "ten"], {}, "--steps: expected a whole number, got 'ten'"),
    ("train-lr-nan", ["train", "--lr", "nan"], {}, "--lr: must be > 0, got nan"),
    ("train-lr-inf", ["train", "--lr", "inf"], {}, "--lr: must be a finite number > 0, got inf"),
    ("train-lr-negative", ["train", "--lr=-1"], {}, "--lr: must be > 0, got -1"),
    ("train-lr-zero", ["train", "--lr", "0"], {}, "--lr: must be > 0"),
    ("train-lr-text", ["train", "--lr", "fast"], {}, "--lr: expected a number, got 'fast'"),
    ("train-log-every-zero", ["train", "--log-every", "0"], {}, "--log-every: must be >= 1"),
    ("train-seed-negative", ["train", "--seed=-1"], {}, "--seed: must be a whole number from 0"),
    ("train-seed-too-large", ["train", "--seed", str(2**64)], {}, f"--seed: must be a whole number from 0 to {2**63 - 1}, got {2**64}"),
    ("train-seed-text", ["train", "--seed", "lucky"], {}, "'lucky'"),
    ("train-missing-value", ["train", "--steps"], {}, "--steps"),
    ("train-unknown-flag", ["train", "--frobnicate"], {}, "--frobnicate"),
    ("train-compile-with-value", ["train", "--compile=yes"], {}, "--compile"),
    # train: precision and backend
    ("train-precision-unknown", ["train", "--precision", "fp8"], {}, "unknown precision 'fp8'"),
    ("train-precision-empty", ["train", "--precision", ""], {}, "unknown precision ''"),
    ("train-backend-unknown", ["train", "--backend", "cdua"], {}, "unknown backend 'cdua'. Did you mean 'cuda' (PyTorch on NVIDIA GPUs)?"),
    ("train-backend-empty", ["train", "--backend", ""], {}, "unknown backend ''"),
    ("train-backend-list", ["train", "--backend", "cpu,jax:cpu"], {}, "unknown backend 'cpu,jax:cpu'"),
    ("train-backend-unavailable", ["train", "--backend", "badcli-nochip"], {PLUGINS: "{tmp}/badcli_nochip.py"},
     "'badcli-nochip' (asked for by backend()) is unavailable: no nochip board in this machine. Install: pip install nochip-sdk"),
    ("train-env-backend-unknown", ["train"], {"ANYCHIP_BACKEND": "garbage"}, "$ANYCHIP_BACKEND='garbage' names no backend"),
    ("train-env-backend-typo", ["train"], {"ANYCHIP_BACKEND": "jax:cpo"},
     "$ANYCHIP_BACKEND='jax:cpo' names no backend. Did you mean 'jax:cpu' (torch model traced to JAX via torchax, on CPU) or 'cpu'"),
    ("train-env-backend-unavailable", ["train"], {"ANYCHIP_BACKEND": "badcli-nochip", PLUGINS: "{tmp}/badcli_nochip.py"},
     "(asked for by $ANYCHIP_BACKEND) is unavailable"),
    ("train-plugin-raises", ["train", "--workload", "mlp"], {PLUGINS: "{tmp}/badcli_raises.py"},
     "badcli_raises.py' named in $ANYCHIP_PLUGINS failed on import"),
    ("train-plugin-not-importable", ["train"], {PLUGINS: "no_such_plugin_badcli"}, "cannot import plug-in 'no_such_plugin_badcli'"),
    # bench
    ("bench-seq-beyond-context", ["bench", "--seq", "100000"], {}, "--seq 100000 is longer than the context length"),
    ("bench-seq-for-mlp", ["bench", "--workload", "mlp", "--seq", "8"], {}, "--seq 8"),
    ("bench-batch-beyond-memory", ["bench", "--batch", HUGE], {}, f"--batch {HUGE}"),
    ("bench-workload-not-a-factory", ["bench", "--workload", "os:getcwd"], {}, "'os:getcwd'"),
    ("bench-workload-factory-raises", ["bench", "--workload", "badcli_workloads:raises"], {}, "raised ZeroDivisionError"),
    ("bench-seed-negative", ["bench", "--seed=-3"], {}, "--seed: must be a whole number from 0"),
    ("bench-steps-text", ["bench", "--steps", "many"], {}, "--steps: expected a whole number, got 'many'"),
    ("bench-timeout-nan", ["bench", "--timeout", "nan"], {}, "--timeout: must be > 0, got nan"),
    ("bench-backend-unknown", ["bench", "--backends", "cpu,tpux"], {}, "unknown backend 'tpux'"),
    ("bench-precision-unknown", ["bench", "--precision", "int4"], {}, "unknown precision 'int4'"),
    ("bench-nproc-text", ["bench", "--nproc", "two"], {}, "--nproc: expected whole numbers such as 1,2,4, got 'two'"),
    ("bench-plugin-raises", ["bench"], {PLUGINS: "{tmp}/badcli_raises.py"}, "badcli_raises.py' named in $ANYCHIP_PLUGINS failed on import"),
    ("bench-plugin-not-importable", ["bench"], {PLUGINS: "no_such_plugin_badcli"}, "'no_such_plugin_badcli'"),
    ("bench-repeat-zero", ["bench", "--repeat", "0"], {}, "--repeat"),
    ("bench-reference-not-compared", ["bench", "--backends", "cpu", "--reference", "nosuch"], {}, "--reference nosuch"),
    ("bench-log-dir-a-file", ["bench", "--log-dir", "{tmp}/not_json.json"], {}, "--log-dir"),
    ("bench-profile-without-log-dir", ["bench", "--profile", "2"], {}, "--profile 2 needs --log-dir"),
    ("bench-prices-missing", ["bench", "--prices", "{tmp}/no_such_prices.json"], {}, "no_such_prices.json"),
    ("bench-prices-not-json", ["bench", "--prices", "{tmp}/not_json.json"], {}, "not_json.json"),
    ("bench-prices-negative", ["bench", "--prices", "{tmp}/negative_prices.json"], {}, "negative_prices.json"),
    ("show-not-a-result", ["bench", "show", "{tmp}/not_a_result.json"], {}, "not_a_result.json"),
    # bench compare
    ("compare-missing-files", ["bench", "compare", "{tmp}/a.json", "{tmp}/b.json"], {}, "a.json"),
    ("compare-not-json", ["bench", "compare", "{tmp}/not_json.json", "{tmp}/not_json.json"], {}, "not_json.json is not JSON"),
    ("compare-not-a-result", ["bench", "compare", "{tmp}/not_a_result.json", "{tmp}/not_a_result.json"], {},
     "not_a_result.json is not an anychip bench result"),
    ("compare-a-directory", ["bench", "compare", "{tmp}", "{tmp}"], {}, "is a directory, not a bench result"),
    ("compare-one-file", ["bench", "compare", "{tmp}/a.json"], {}, "B.json"),
    ("compare-max-regression-negative", ["bench", "compare", "a.json", "b.json", "--max-regression=-0.1"], {},
     "--max-regression: must be a finite number >= 0"),
    ("compare-max-regression-nan", ["bench", "compare", "a.json", "b.json", "--max-regression", "nan"], {},
     "--max-regression: must be a finite number >= 0, got nan"),
    # parity
    ("parity-one-backend", ["parity", "--backends", "cpu"], {}, "--backends needs at least two"),
    ("parity-backend-unknown", ["parity", "--backends", "cpu,jxa:cpu"], {},
     "unknown backend 'jxa:cpu'. Did you mean 'jax:cpu' (torch model traced to JAX via torchax, on CPU) or 'cpu'"),
    ("parity-backend-alias", ["parity", "--backends", "cpu,jax"], {}, "'jax' is an alias"),
    ("parity-backend-twice", ["parity", "--backends", "cpu,cpu"], {}, "'cpu' is named twice"),
    ("parity-backend-unavailable", ["parity", "--backends", "cpu,badcli-nochip"], {PLUGINS: "{tmp}/badcli_nochip.py"},
     "'badcli-nochip' is unavailable"),
    ("parity-rtol-inf", ["parity", "--rtol", "inf"], {}, "--rtol: must be a finite number > 0, got inf"),
    ("parity-rtol-negative", ["parity", "--rtol=-1e-5"], {}, "--rtol: must be > 0"),
    ("parity-lr-nan", ["parity", "--lr", "nan"], {}, "--lr: must be > 0, got nan"),
    ("parity-seed-negative", ["parity", "--seed=-1"], {}, "--seed: must be a whole number from 0"),
    ("parity-steps-zero", ["parity", "--steps", "0"], {}, "--steps: must be >= 1"),
    ("parity-seq-beyond-context", ["parity", "--seq", "129"], {},
     "--seq 129 is longer than the context length of workload 'gpt-tiny' (128"),
    ("parity-batch-beyond-memory", ["parity", "--batch", HUGE], {}, f"--batch {HUGE}"),
    ("parity-workload-not-a-factory", ["parity", "--workload", "os:getcwd"], {}, "'os:getcwd'"),
    ("parity-precision-unknown", ["parity", "--precision", "fp8"], {}, "unknown precision 'fp8'"),
    ("parity-json-no-such-folder", ["parity", "--json", "/no/such/dir/parity.json"], {}, "--json /no/such/dir/parity.json"),
    ("parity-json-is-a-folder", ["parity", "--json", "{tmp}"], {}, "is a directory"),
    ("parity-plugin-raises", ["parity"], {PLUGINS: "{tmp}/badcli_raises.py"},
     "badcli_raises.py' named in $ANYCHIP_PLUGINS failed on import"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("badcli")
    for name, text in FILES.items():
        (folder / name).write_text(text)
    return str(folder)


@pytest.fixture
def no_work(monkeypatch, files):
    """Refuse to start a backend, a parity worker or a training step: bad input must stop before."""
    from anychip import step
    from anychip.bench import supervise

    def refuse(*args, **kwargs):
        raise AssertionError("work was started although the input was bad")

    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if "anychip.parity" in cmd:
            refuse()
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(supervise, "run_backend", refuse)
    monkeypatch.setattr(step, "TrainStep", refuse)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.syspath_prepend(files)
    for var in (*LAUNCH_ENV, PLUGINS, "ANYCHIP_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    yield
    from anychip.backends import unregister

    unregister("badcli-nochip")
    for name in [m for m in sys.modules if m.startswith("badcli_")]:
        del sys.modules[name]


def run_cli(argv, env, monkeypatch, tmp):
    for key, value in env.items():
        monkeypatch.setenv(key, value.replace("{tmp}", tmp))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([a.replace("{tmp}", tmp) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def test_cases_are_distinct_and_enough():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({(tuple(c[1]), tuple(sorted(c[2].items()))) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, env, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, env, names, no_work, monkeypatch, files):
    code, out, err = run_cli(argv, env, monkeypatch, files)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert code == 2, err
    assert out == ""
    assert lines[0].startswith("anychip")
    assert names.replace("{tmp}", files) in lines[0]


def test_debug_shows_the_traceback(no_work, monkeypatch, files):
    for argv in (["--debug", "train", "--workload", "os:getcwd"], ["train", "--workload", "os:getcwd", "--debug"]):
        with pytest.raises(InvalidArgumentError, match="'os:getcwd' returned str"):
            main(argv)
    monkeypatch.setenv("ANYCHIP_DEBUG", "1")
    with pytest.raises(InvalidArgumentError, match="'os:getcwd' returned str"):
        main(["train", "--workload", "os:getcwd"])
    # A fresh process prints it: a plug-in that fails, seen from `devices` (which imports no torch).
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_ENV, "ANYCHIP_DEBUG")}
    env[PLUGINS] = os.path.join(files, "badcli_raises.py")
    done = subprocess.run([sys.executable, "-m", "anychip.cli", "devices", "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "RuntimeError: boom while importing" in done.stderr


def test_a_bug_is_one_line_and_exit_1(no_work, monkeypatch, files):
    backends = importlib.import_module("anychip.backends")  # the package: `anychip.backends` is also a function

    def broken():
        raise RuntimeError("probe table corrupted\nsecond line")

    monkeypatch.setattr(backends, "list_backends", broken)
    code, out, err = run_cli(["devices"], {}, monkeypatch, files)
    assert code == 1 and out == ""
    assert err.strip() == ("anychip devices: internal error: RuntimeError: probe table corrupted second line "
                           "(run with --debug for the traceback)")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(backends, "list_backends", interrupted)
    assert run_cli(["devices"], {}, monkeypatch, files)[0] == 130


def test_running_out_of_memory_while_training_is_one_line(no_work, monkeypatch, files):
    """Where the up-front estimate lets a batch through and the allocator still gives up."""
    import dataclasses

    from anychip import workloads

    def allocate(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 12800000000 bytes.")

    monkeypatch.setitem(workloads.BUILTIN, "mlp", dataclasses.replace(workloads.BUILTIN["mlp"], build=allocate))
    code, out, err = run_cli(["train", "--workload", "mlp", "--batch", "100"], {}, monkeypatch, files)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().startswith("anychip train: error: --batch 100 x --seq 1: batch too large, out of memory (DefaultCPUAllocator")


def test_devices_warns_about_a_bad_anychip_backend_and_still_lists_every_backend(no_work, monkeypatch, files):
    code, out, err = run_cli(["devices", "--json"], {"ANYCHIP_BACKEND": "garbage"}, monkeypatch, files)
    assert code == 0
    names = {b["name"] for b in json.loads(out)["backends"]}
    assert {"cpu", "cuda", "jax:cpu", "jax:tpu", "neuron", "neuron-xla"} <= names
    (line,) = err.strip().splitlines()
    assert line.startswith("anychip devices: warning: $ANYCHIP_BACKEND='garbage' names no backend.")
    assert all(name in line for name in names)
    # Nothing to warn about when it names an available backend.
    assert run_cli(["devices", "--json"], {"ANYCHIP_BACKEND": "cpu"}, monkeypatch, files)[2] == ""


def test_version():
    from anychip.version import __version__

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and out.getvalue().strip() == f"anychip {__version__}"
