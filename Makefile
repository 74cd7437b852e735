# Two commands matter: `make demo` and `make test`. Both set up .venv first (idempotent:
# the stamp is only rebuilt when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.anychip-installed
EXTRAS := jax,bench,checkpoint,kernels,hf,logs,dev

.PHONY: setup demo test test-xla test-tpu bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# The run's table on the terminal, and its JSON, Markdown and plot under demo/ (git ignores it).
demo: setup
	mkdir -p demo
	$(BIN)/anychip bench --json demo/bench.json --md demo/bench.md --plot demo/bench.png

# Lint, the main suite, then the neuron-xla and tpu subsets; any failing fails `make test`.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 --ignore=tests/xla --ignore=tests/tpu
	$(MAKE) --no-print-directory test-xla
	$(MAKE) --no-print-directory test-tpu

# neuron-xla needs torch 2.9 + torch_xla 2.9 (an ABI pair that cannot share .venv's torch 2.13).
# .ci/xla-env.sh builds that venv once outside the clone (~2-3 min, ~6 GB; cached: ~0.3 s) and
# prints its python; anychip itself comes from this checkout through PYTHONPATH. The TrainStep
# conformance suite runs there on neuron-xla only (cpu already ran it in the main suite);
# tests/xla comes first: its conftest sets XLA's flags and starts the device.
test-xla:
	PY="$$(bash .ci/xla-env.sh)" && PJRT_DEVICE=CPU ANYCHIP_TEST_BACKENDS=neuron-xla PYTHONPATH="$(CURDIR)" \
		"$$PY" -m pytest -q tests/xla tests/conformance

# tpu against the real torch-tpu 0.2.0 wheel, which loads into every `import torch` of its environment:
# .ci/tpu-env.sh builds that venv once outside the clone, without libtpu (~1.3 min, 1.3 GB; cached:
# ~0.3 s) and prints its python. No TPU runtime can start there: autoload is off and the PJRT
# plugin is a stub that refuses to initialise; where `unshare -n` is allowed the tests also run
# with no network at all. The conformance suite runs on tpu only where a TPU is (skipped here).
test-tpu:
	PY="$$(bash .ci/tpu-env.sh)" && NET="$$(unshare -n true 2>/dev/null && echo unshare -n || true)" && \
		TORCH_DEVICE_BACKEND_AUTOLOAD=0 TPU_LIBRARY_PATH="$$(dirname "$$PY")/../lib/anychip-no-tpu-pjrt.so" PYTHONPATH="$(CURDIR)" \
		$$NET "$$PY" -m pytest -q -p no:cacheprovider tests/tpu

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
