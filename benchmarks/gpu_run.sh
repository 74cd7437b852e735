#!/usr/bin/env bash
# The GPU session in a few calls (device machine: python3 with torch, jax[cuda], triton, optax;
# torchax carried as a wheel in .whl/). Usage: bash benchmarks/gpu_run.sh STAGE OUTDIR
#   tests  - the CUDA tests and the kernel tests on the GPU
#   step   - TrainStep vs hand-written loop, and jax:gpu (GPT-2 small, bf16, 16 x 1024)
#   kernels- per-op kernel timings and the end-to-end step with kernels on
#   bench  - anychip bench --workload gpt-small --backends cuda,jax:gpu --precision bf16
set -uo pipefail
stage=$1 out=$2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
case $stage in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_jax_gpu.py tests/kernels 2>&1 | tail -25 ;;
  step)
    python3 benchmarks/gpu_jax_vs_torch.py "$out/step.json" --steps 40 --warmup 8 2>&1 | tail -25 ;;
  kernels)
    python3 benchmarks/gpu_kernels.py "$out/kernels.json" 2>&1 | tail -30
    for w in gpt-small llama-small; do
      python3 benchmarks/gpu_step.py "$out/e2e_$w.json" --workload $w --kernels auto --steps 30 --warmup 8 --rounds 1 2>&1 | tail -4
    done ;;
  bench)
    python3 -m anychip.cli bench --workload gpt-small --backends cuda,jax:gpu --precision bf16 --steps 40 --warmup 8 \
      --json "$out/bench.json" --md "$out/bench.md" --plot "$out/bench.png" --csv "$out/bench.csv" 2>&1 | tail -30 ;;
esac
