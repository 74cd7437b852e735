#!/usr/bin/env bash
# Build (once) and cache the virtualenv for the legacy `neuron-xla` backend tests:
# python3.11 + torch 2.9.0 + torch_xla 2.9.0 (torch_xla 2.9 needs torch 2.9.0 exactly: ABI),
# run with PJRT_DEVICE=CPU. The venv lives OUTSIDE the clone and is reused across clones/runs.
#
#   PY=$(bash .ci/xla-env.sh)                      # builds on first use, ~2-3 min; cached: ~0.3 s
#   PJRT_DEVICE=CPU PYTHONPATH=$PWD "$PY" -m pytest -q tests
#
# stdout carries exactly one line, the venv's python path (progress goes to stderr).
# The venv does not contain anychip itself: put the checkout on PYTHONPATH.
#
# Why the install looks the way it does (see docs/torch_xla_on_cpu.md):
# - The only torch 2.9.0 wheel reachable here is PyPI's (CUDA 12.8 build, ~900 MB); no +cpu build.
# - libtorch.so has DT_NEEDED entries on 11 CUDA libraries (cudart, cupti, cublas/cublasLt, cudnn,
#   cufft, cufile, curand, cusparse(+nvJitLink), cusparseLt, nccl, nvshmem), so `import torch` fails
#   without those nvidia-*-cu12 wheels even on a CPU-only machine. triton, nvrtc, cusolver and nvtx
#   are NOT needed to import torch/torch_xla or train on PJRT_DEVICE=CPU, so by default torch is
#   installed with --no-deps plus exactly the needed wheels (~3.3 GB download instead of ~3.8 GB,
#   ~5.9 GB installed instead of ~7.1 GB). ANYCHIP_XLA_FULL=1 installs torch with all its deps.
#
# Environment knobs:
#   ANYCHIP_XLA_VENV       venv path                 (default ~/.cache/anychip/xla-venv)
#   ANYCHIP_XLA_WHEELS     wheelhouse (pip download cache; default ~/.cache/anychip/wheels)
#   ANYCHIP_XLA_PYTHON     interpreter for the venv  (default python3.11)
#   ANYCHIP_XLA_FULL=1     install torch's full dependency set (triton, all nvidia-*-cu12)
#   ANYCHIP_XLA_REBUILD=1  force a rebuild
#   ANYCHIP_XLA_LOCK_TIMEOUT  seconds to wait for a concurrent build (default 3600)
set -euo pipefail

CACHE_ROOT="${HOME:-/root}/.cache/anychip"
VENV="${ANYCHIP_XLA_VENV:-$CACHE_ROOT/xla-venv}"
WHEELS="${ANYCHIP_XLA_WHEELS:-$CACHE_ROOT/wheels}"
PYTHON="${ANYCHIP_XLA_PYTHON:-python3.11}"
FULL="${ANYCHIP_XLA_FULL:-0}"
VENV="${VENV%/}"
STAMP="$VENV/.anychip-xla-stamp"

log() { printf '[xla-env +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[xla-env] ERROR: %s\n' "$*" >&2; exit 1; }

# Exact pins. The nvidia versions are the ones torch 2.9.0's metadata requires.
TORCH_PINS=(torch==2.9.0 torch_xla==2.9.0)
NVIDIA_PINS=(
  nvidia-cuda-runtime-cu12==12.8.90
  nvidia-cuda-cupti-cu12==12.8.90
  nvidia-cublas-cu12==12.8.4.1
  nvidia-cudnn-cu12==9.10.2.21
  nvidia-cufft-cu12==11.3.3.83
  nvidia-cufile-cu12==1.13.1.3
  nvidia-curand-cu12==10.3.9.90
  nvidia-cusparse-cu12==12.5.8.93
  nvidia-nvjitlink-cu12==12.8.93
  nvidia-cusparselt-cu12==0.7.1
  nvidia-nccl-cu12==2.27.5
  nvidia-nvshmem-cu12==3.3.20
)
# torch's and torch_xla's pure-Python requirements, then the project's own runtime/test deps.
OTHER_REQS=(
  filelock "typing-extensions>=4.10.0" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5"
  "absl-py>=1.0.0" pyyaml requests
  numpy "rich>=13" "safetensors>=0.4" "pytest>=8" "pytest-timeout>=2"
  # anychip[hf], for the bf16 tests on Hugging Face models (tests/xla/test_xla_bf16.py); the
  # main venv's pin (constraints.txt), whose metadata asks for torch>=2.6: torch 2.9 qualifies.
  "transformers==5.24.0"
)

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set ANYCHIP_XLA_PYTHON)"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')" \
  || die "$PYTHON does not run"
[[ "$PYVER" == 3.11.* ]] || log "warning: $PYTHON is $PYVER, torch_xla 2.9 was checked with 3.11"

# The stamp's content is the whole recipe: change any pin and the venv is rebuilt.
EXPECTED_STAMP="anychip-xla-venv v1
python=$PYVER
full=$FULL
${TORCH_PINS[*]}
${NVIDIA_PINS[*]}
${OTHER_REQS[*]}"

# Cheap integrity check (no torch import, ~0.1 s): interpreter runs, pinned dists and key files exist.
venv_ok() {
  [[ -x "$VENV/bin/python" && -f "$STAMP" ]] || return 1
  [[ "$(cat "$STAMP")" == "$EXPECTED_STAMP" ]] || return 1
  "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1 || return 1
import importlib.metadata as md, importlib.util as u, os
assert md.version("torch") == "2.9.0" and md.version("torch_xla") == "2.9.0"
t = os.path.dirname(u.find_spec("torch").origin)
assert os.path.isfile(os.path.join(t, "lib", "libtorch_cpu.so"))
assert u.find_spec("torch_xla") and u.find_spec("_XLAC") and u.find_spec("pytest")
EOF
}

REBUILD="${ANYCHIP_XLA_REBUILD:-0}" LOCK_TIMEOUT="${ANYCHIP_XLA_LOCK_TIMEOUT:-3600}" VENV_KNOB=ANYCHIP_XLA_VENV
# shellcheck source=.ci/cached-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/cached-venv.sh"
venv_reuse_or_lock
venv_create
if [[ "$FULL" == 1 ]]; then
  log "fetching ${TORCH_PINS[*]} with all dependencies into $WHEELS (~3.8 GB unless cached)"
  "${DL[@]}" "${TORCH_PINS[@]}" "${OTHER_REQS[@]}" >&2
  log "installing"
  "${INST[@]}" "${TORCH_PINS[@]}" "${OTHER_REQS[@]}" >&2
else
  log "fetching ${TORCH_PINS[*]} + ${#NVIDIA_PINS[@]} nvidia-*-cu12 libraries into $WHEELS (~3.3 GB unless cached)"
  "${DL[@]}" --no-deps "${TORCH_PINS[@]}" "${NVIDIA_PINS[@]}" >&2
  "${DL[@]}" "${OTHER_REQS[@]}" >&2
  log "installing"
  "${INST[@]}" --no-deps "${TORCH_PINS[@]}" "${NVIDIA_PINS[@]}" >&2
  "${INST[@]}" "${OTHER_REQS[@]}" >&2
  log "(pip's complaint that torch's triton/nvrtc/cusolver/nvtx are missing is expected: not needed here)"
fi

log "smoke test (PJRT_DEVICE=CPU)"
PJRT_DEVICE=CPU "$VENV/bin/python" - <<'EOF' >&2
import torch, torch_xla
d = torch_xla.device()
x = torch.arange(6.0, device=d).reshape(2, 3)
y = (x @ x.T).sum()
torch_xla.sync()
assert y.item() == 83.0, y.item()
print("torch", torch.__version__, "torch_xla", torch_xla.__version__, "device", d, "ok")
EOF

venv_finish
