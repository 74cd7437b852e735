"""jax:gpu on a real NVIDIA GPU (skipped, with the reason, where there is none)."""

from __future__ import annotations

import pytest

from support import requires

pytestmark = requires("cuda", "jax", "torchax")


def test_cudnn_causal_attention_matches_xla():
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (4, 256, 12, 64)  # (B, T, N, H)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in (kq, kk, kv))
    outs = {
        impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).astype(jnp.float32)
        for impl in ("cudnn", "xla")
    }
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True, implementation="xla")
    for impl, out in outs.items():
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        assert err < 1e-2, (impl, err)


@pytest.mark.parametrize("precision, rtol", [("fp32", 5e-3), ("bf16", 3e-2)])
def test_jax_gpu_tracks_cuda(precision, rtol):
    """Through `anychip parity` (one process per backend: torch and JAX do not share a CUDA
    context here, as in a real run). Exit 0 = every step within rtol."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "anychip.cli", "parity", "--workload", "gpt-tiny", "--backends", "cuda,jax:gpu",
         "--steps", "15", "--batch", "16", "--seq", "128", "--lr", "1e-3", "--precision", precision, "--rtol", str(rtol)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
