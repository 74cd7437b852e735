"""torch autocast on the xla device, completed where torch_xla 2.9's op list falls short.

``torch.autocast("xla")`` runs torch_xla's own list (the AutocastXLA dispatch key; 70 aten ops),
which has no ``scaled_dot_product_attention`` and no RNN cells. torch's CPU and CUDA lists run
both in the autocast dtype, and models rely on it: Hugging Face Llama's rotary embedding turns
query and key into float32 while value comes out of a bf16 linear, and SDPA then refuses the
mix ("Expected query, key, and value to have the same dtype"). ``install`` registers torch's
"lower precision" rule for those ops on AutocastXLA (cast floating inputs, run the op with
autocast off below), so bf16 on ``neuron-xla`` follows the policy of ``cpu`` and ``cuda``.
Only active inside ``torch.autocast("xla")``; idempotent.
"""

from __future__ import annotations

# op -> overloads; the ones torch's CUDA list (AT_FORALL_LOWER_PRECISION_FP) runs in the
# autocast dtype and torch_xla 2.9's list lacks.
_LOWER = {
    "scaled_dot_product_attention": ("default",),
    "gru_cell": ("default",),
    "lstm_cell": ("default",),
    "rnn_tanh_cell": ("default",),
    "rnn_relu_cell": ("default",),
}
_library = None  # the torch.library registration, kept alive for the process


def _lower_precision(op):
    import torch
    from torch.utils import _pytree as pytree

    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype("xla")

        def cast(t):
            eligible = t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "xla"
            return t.to(dtype) if eligible and t.dtype != dtype else t

        args, kwargs = pytree.tree_map_only(torch.Tensor, cast, (args, kwargs))
        with torch.autocast("xla", enabled=False):  # the op itself runs below autocast
            return op(*args, **kwargs)

    return kernel


def install() -> None:
    """Register the missing AutocastXLA kernels (once per process)."""
    global _library
    if _library is not None:
        return
    import torch

    library = torch.library.Library("aten", "IMPL")
    for name, overloads in _LOWER.items():
        packet = getattr(torch.ops.aten, name, None)
        for overload in overloads:
            op = getattr(packet, overload, None) if packet is not None else None
            if op is None or torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastXLA"):
                continue  # a torch_xla that lists it already keeps its own
            library.impl(f"{name}" if overload == "default" else f"{name}.{overload}", _lower_precision(op), "AutocastXLA")
    _library = library
