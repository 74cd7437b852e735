#!/usr/bin/env bash
# Build (once) and cache the virtualenv for the `tpu` backend's API-surface tests: python3.11 +
# torch 2.13.0 (the CPU wheel) + the real torch-tpu 0.2.0 wheel installed WITHOUT libtpu.
# The venv lives OUTSIDE the clone and is reused across clones and runs.
#
#   PY=$(bash .ci/tpu-env.sh)                      # builds on first use, ~1 min; cached: ~0.2 s
#   TORCH_DEVICE_BACKEND_AUTOLOAD=0 TPU_LIBRARY_PATH="$(dirname "$PY")/../lib/anychip-no-tpu-pjrt.so" \
#       PYTHONPATH=$PWD "$PY" -m pytest -q tests/tpu
#
# stdout carries exactly one line, the venv's python path (progress goes to stderr).
# The venv does not contain anychip itself: put the checkout on PYTHONPATH.
#
# Why the install looks the way it does:
# - torch-tpu registers a `torch.backends` entry point, so every `import torch` in its
#   environment loads it; it therefore never goes into .venv, only into this one.
# - libtpu (a dependency of torch-tpu) is left out on purpose: no TPU runtime may start on a
#   machine without a TPU (libtpu may query the cloud metadata server). torch-tpu is installed
#   with --no-deps, then the dependencies its modules import (all of them but libtpu and
#   tensorboard, which only its profiler adapters use).
# - Every process in this venv runs with TORCH_DEVICE_BACKEND_AUTOLOAD=0: without libtpu the
#   autoloaded backend aborts `import torch` ("TPU_LIBRARY_PATH is not set").
# - That is not enough to import torch_tpu itself: its C++ extensions register the TPU PJRT plugin
#   from $TPU_LIBRARY_PATH when they load and abort without one. The venv therefore gets
#   lib/anychip-no-tpu-pjrt.so, built from .ci/no-tpu-pjrt.c with the C compiler: a plugin entry
#   point with no functions and API version 0.0, which the framework refuses to initialise.
#
# Environment knobs:
#   ANYCHIP_TPU_VENV       venv path                 (default ~/.cache/anychip/tpu-venv)
#   ANYCHIP_TPU_WHEELS     wheelhouse (pip download cache; default ~/.cache/anychip/wheels)
#   ANYCHIP_TPU_PYTHON     interpreter for the venv  (default python3.11: the torch-tpu 0.2.0 wheel is cp311)
#   CC                     C compiler for the PJRT stub (default cc)
#   ANYCHIP_TPU_REBUILD=1  force a rebuild
#   ANYCHIP_TPU_LOCK_TIMEOUT  seconds to wait for a concurrent build (default 3600)
set -euo pipefail

CACHE_ROOT="${HOME:-/root}/.cache/anychip"
VENV="${ANYCHIP_TPU_VENV:-$CACHE_ROOT/tpu-venv}"
WHEELS="${ANYCHIP_TPU_WHEELS:-$CACHE_ROOT/wheels}"
PYTHON="${ANYCHIP_TPU_PYTHON:-python3.11}"
VENV="${VENV%/}"
STAMP="$VENV/.anychip-tpu-stamp"
STUB_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/no-tpu-pjrt.c"
STUB="$VENV/lib/anychip-no-tpu-pjrt.so"

log() { printf '[tpu-env +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[tpu-env] ERROR: %s\n' "$*" >&2; exit 1; }

TORCH_PIN="torch==2.13.0"
TPU_PIN="torch-tpu==0.2.0"
# torch-tpu 0.2.0's requirements without libtpu and tensorboard (see above).
TPU_REQS=("numpy>=2" "absl-py>=2" "portpicker>=1.6" "frozendict>=2" "immutabledict>=4" "pyzmq>=27")
# What anychip and its tests import.
TEST_REQS=("rich>=13" "pytest>=8" "pytest-timeout>=2")

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set ANYCHIP_TPU_PYTHON)"
[[ -f "$STUB_SRC" ]] || die "$STUB_SRC is missing"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')" \
  || die "$PYTHON does not run"

# The stamp's content is the whole recipe: change any pin and the venv is rebuilt.
EXPECTED_STAMP="anychip-tpu-venv v1
python=$PYVER
$TORCH_PIN $TPU_PIN --no-deps
${TPU_REQS[*]}
${TEST_REQS[*]}
stub=$(sha256sum "$STUB_SRC" | cut -d' ' -f1)"

# Cheap integrity check (no torch import): the pinned dists are there, libtpu is not.
venv_ok() {
  [[ -x "$VENV/bin/python" && -f "$STAMP" && -f "$STUB" ]] || return 1
  [[ "$(cat "$STAMP")" == "$EXPECTED_STAMP" ]] || return 1
  "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1 || return 1
import importlib.metadata as md, importlib.util as u
assert md.version("torch").split("+")[0] == "2.13.0" and md.version("torch-tpu") == "0.2.0"
assert u.find_spec("libtpu") is None and u.find_spec("pytest")
EOF
}

REBUILD="${ANYCHIP_TPU_REBUILD:-0}" LOCK_TIMEOUT="${ANYCHIP_TPU_LOCK_TIMEOUT:-3600}" VENV_KNOB=ANYCHIP_TPU_VENV
# shellcheck source=.ci/cached-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/cached-venv.sh"
venv_reuse_or_lock
venv_create
log "fetching $TORCH_PIN, $TPU_PIN (~96 MB, without libtpu) and their Python dependencies into $WHEELS unless cached"
"${DL[@]}" --no-deps "$TPU_PIN" >&2
"${DL[@]}" "$TORCH_PIN" "${TPU_REQS[@]}" "${TEST_REQS[@]}" >&2
log "installing"
"${INST[@]}" "$TORCH_PIN" "${TPU_REQS[@]}" "${TEST_REQS[@]}" >&2
"${INST[@]}" --no-deps "$TPU_PIN" >&2

CC="${CC:-cc}"
command -v "$CC" >/dev/null 2>&1 || die "no C compiler ($CC) for the PJRT stub; set CC"
log "building the PJRT stub $STUB"
"$CC" -shared -fPIC -O2 -o "$STUB" "$STUB_SRC" >&2

# The smoke test imports the package as the tests do; it starts no TPU runtime. Where this user may
# create a network namespace it runs in one, with no network at all.
NET=()
if unshare -n true 2>/dev/null; then NET=(unshare -n); fi
log "smoke test (TORCH_DEVICE_BACKEND_AUTOLOAD=0, no libtpu, the PJRT stub${NET:+, no network})"
TORCH_DEVICE_BACKEND_AUTOLOAD=0 TPU_LIBRARY_PATH="$STUB" "${NET[@]}" "$VENV/bin/python" - <<'EOF' >&2
import importlib.util, torch, torch_tpu
assert importlib.util.find_spec("libtpu") is None, "libtpu must not be installed here"
print("torch", torch.__version__, "torch_tpu imported from", torch_tpu.__file__)
EOF

venv_finish
