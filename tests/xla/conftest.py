"""The neuron-xla tests run inside the torch 2.9 + torch_xla 2.9 virtualenv (`make test-xla`),
together with the TrainStep conformance suite restricted to neuron-xla:

    PJRT_DEVICE=CPU ANYCHIP_TEST_BACKENDS=neuron-xla PYTHONPATH=$PWD "$(bash .ci/xla-env.sh)" \
        -m pytest -q tests/xla tests/conformance

Elsewhere (the main .venv has torch 2.13, which torch_xla 2.9 cannot load) nothing here is collected.
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("torch_xla") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    if os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
        # Before torch_xla is imported: XLA's CPU backend compiles ~2.5x faster at O0 and the
        # steps here are too small for the optimisations to matter (docs/torch_xla_on_cpu.md).
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    import anychip as ac

    # torch_xla.device() before any backward in this process (create() calls it, after the
    # Neuron set-up on Trainium): the cpu-backend runs these tests compare against happen here
    # too, and a CPU backward first would leave autograd without the XLA device. An unavailable
    # backend (PJRT_DEVICE unset off Trainium) stops the session here, with the reason.
    ac.backend("neuron-xla")
    ac.reset()
