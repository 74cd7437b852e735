"""The `tpu` backend against the real torch-tpu 0.2.0 package, in its own virtualenv (`make test-tpu`):

    PY="$(bash .ci/tpu-env.sh)"
    TORCH_DEVICE_BACKEND_AUTOLOAD=0 TPU_LIBRARY_PATH="$(dirname "$PY")/../lib/anychip-no-tpu-pjrt.so" \\
        PYTHONPATH=$PWD "$PY" -m pytest -q tests/tpu

That venv has no libtpu, so no TPU runtime can start: torch-tpu's autoload is off and its PJRT
plugin slot holds a stub that refuses to initialise (see .ci/no-tpu-pjrt.c). Elsewhere (no
torch-tpu installed, as in the main .venv) nothing here is collected.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

STUB = "anychip-no-tpu-pjrt.so"

if importlib.util.find_spec("torch_tpu") is None:
    collect_ignore_glob = ["test_*.py"]
elif importlib.util.find_spec("libtpu") is None:
    # Checked before anything here imports torch: with autoload on, that import would load
    # torch-tpu, and without a PJRT plugin its extensions abort the interpreter.
    missing = []
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") != "0":
        missing.append("TORCH_DEVICE_BACKEND_AUTOLOAD=0")
    if os.path.basename(os.environ.get("TPU_LIBRARY_PATH", "")) != STUB or not os.path.isfile(os.environ["TPU_LIBRARY_PATH"]):
        missing.append(f"TPU_LIBRARY_PATH=<the venv's lib/{STUB}>")
    if missing:
        raise pytest.UsageError(f"tests/tpu without libtpu need {' and '.join(missing)}: run them with `make test-tpu`")
