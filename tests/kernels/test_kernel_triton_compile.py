"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, on this CPU machine.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so type
errors of the compiled path (loop-carried types, pointer dtypes, constexpr misuse) would only
show on a GPU. Triton can compile for a GPU target without one. It must run in a process
without TRITON_INTERPRET, so the test runs this file as a script.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import requires

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _kernels():
    """(module, kernel, signature, constexprs, num_warps) with bf16 data, the GPU's dtype."""
    i32 = "i32"
    rms = {"M": i32, "N": i32, "eps": "fp32"}
    return [
        ("rms_norm", "_rms_norm_forward_kernel",
         {"x_ptr": "*bf16", "w_ptr": "*fp32", "y_ptr": "*bf16", **rms, "stride_x": i32, "stride_y": i32},
         {"BLOCK_M": 4, "BLOCK_N": 1024}, 8),
        ("rms_norm", "_rms_norm_backward_kernel",
         {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "dx_ptr": "*bf16", "dw_partial_ptr": "*fp32",
          **rms, "stride_dy": i32, "stride_x": i32, "stride_dx": i32, "rows_per_program": i32},
         {"BLOCK_M": 4, "BLOCK_N": 1024}, 8),
        ("swiglu", "_swiglu_forward_kernel",
         {"gate_ptr": "*bf16", "up_ptr": "*bf16", "y_ptr": "*bf16", "numel": i32}, {"BLOCK": 1024}, 4),
        ("swiglu", "_swiglu_backward_kernel",
         {"dy_ptr": "*bf16", "gate_ptr": "*bf16", "up_ptr": "*bf16", "dgate_ptr": "*bf16", "dup_ptr": "*bf16",
          "numel": i32}, {"BLOCK": 1024}, 4),
        ("rotary", "_rotary_kernel",
         {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "rows_total": i32,
          "H": i32, "T": i32, "HALF": i32, "stride_b": i32, "stride_h": i32, "stride_t": i32,
          "stride_cos": i32, "stride_sin": i32},
         {"BACKWARD": True, "BLOCK_R": 64, "BLOCK_HALF": 32}, 8),
        ("linear_cross_entropy", "_cross_entropy_forward_kernel",
         {"logits_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32", "loss_ptr": "*fp32", "V": i32,
          "stride_row": i32, "ignore_index": i32}, {"BLOCK_V": 8192}, 16),
        ("linear_cross_entropy", "_cross_entropy_backward_kernel",
         {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32",
          "scale_ptr": "*fp32", "V": i32, "stride_logits": i32, "stride_grad": i32}, {"BLOCK_V": 8192}, 16),
    ]


def compile_all(capability: int = 90) -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for op, name, signature, constexprs, warps in _kernels():
        kernel = getattr(importlib.import_module(f"anychip.kernels.{op}.triton"), name)
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        missing = set(kernel.arg_names) ^ set(signature)
        assert not missing, f"{name}: signature out of date: {sorted(missing)}"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
        assert compiled.asm.get("cubin"), name
        print(f"compiled {op}.{name} for sm_{capability}")


@requires("triton")
@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("compiled ") == len(_kernels())


if __name__ == "__main__":
    compile_all()
