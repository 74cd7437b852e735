#!/usr/bin/env bash
# The GPU session in a few calls (device machine: python3 with torch, jax[cuda], triton, optax;
# torchax carried as a wheel in .whl/). Usage: bash benchmarks/gpu_run.sh STAGE OUTDIR
#   step    - TrainStep on cuda and jax:gpu vs the hand-written loop (GPT-2 small, bf16, 16 x 1024)
#   kernels - per-op kernel checks and timings, then the end-to-end step with kernels on
#   tests   - the CUDA, jax:gpu and kernel tests on the GPU, then anychip bench cuda,jax:gpu
set -uo pipefail
stage=$1 out=$2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
case $stage in
  step)
    python3 benchmarks/gpu_jax_vs_torch.py "$out/step.json" --steps 40 --warmup 8 2>&1 | tail -25 ;;
  kernels)
    timeout 150 python3 benchmarks/gpu_kernels.py "$out/kernels.json" 2>&1 | tail -30
    for w in gpt-small llama-small; do
      timeout 200 python3 benchmarks/gpu_step.py "$out/e2e_$w.json" --workload $w --kernels auto --steps 30 --warmup 6 --rounds 1 2>&1 | tail -4
    done ;;
  tests)
    timeout 330 python3 -m pytest -q -p no:cacheprovider -x tests/backends/test_cuda.py tests/backends/test_jax_gpu.py \
      tests/test_kernel_training_parity.py tests/kernels 2>&1 | tail -20
    timeout 240 python3 -m anychip.cli bench --workload gpt-small --backends cuda,jax:gpu --precision bf16 --steps 30 --warmup 5 \
      --json "$out/bench.json" --md "$out/bench.md" --plot "$out/bench.png" --csv "$out/bench.csv" 2>&1 | tail -30 ;;
esac
