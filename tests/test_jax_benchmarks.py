"""The GPU comparison script runs end to end on its CPU path (so the H100 run is not its first)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from support import requires

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_jax_vs_torch.py"


@requires("jax", "torchax", "optax")
def test_gpu_comparison_script_cpu_path(tmp_path):
    out = tmp_path / "result.json"
    argv = [sys.executable, str(SCRIPT), str(out), "--workload", "gpt-tiny", "--device", "cpu",
            "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "16", "--distinct-batches", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    configs = report["configs"]
    assert list(configs) == ["a_torch_compile_handwritten", "b_anychip_cpu", "c_anychip_jax_cpu"]
    for name, r in configs.items():
        assert r["ok"] and r["tokens_per_s"] > 0 and len(r["losses"]) == 3, (name, r)
    # same weights, same first batch: the first losses agree across the three (bf16 compute)
    firsts = [r["losses"][0] for r in configs.values()]
    assert max(firsts) - min(firsts) < 0.05 * max(firsts), firsts
    assert set(report["ratios"]) == {"b/a", "c/a"}
    assert configs["c_anychip_jax_cpu"]["kernels_used"] == ["attention:xla"]
    assert "tokens/s ratio c/a" in done.stdout
