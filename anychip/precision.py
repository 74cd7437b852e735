"""Precision policies, one name each:

- ``fp32``: parameters, optimizer state and compute in float32.
- ``bf16``: float32 master parameters and optimizer state; forward and backward compute in
  bfloat16 where torch autocast runs an op in bfloat16 (torch.autocast on torch backends; the same
  op policy applied to the traced ops on JAX, see ``AUTOCAST_OPS``).
- ``bf16-pure``: parameters, gradients and optimizer state all in bfloat16 (half the memory,
  no master copy; what most TPU/Trainium recipes call "pure bf16").

Lightning Fabric's spellings are accepted as aliases with the same meaning (``ALIASES``):
``bf16-mixed`` is ``bf16``, ``bf16-true`` is ``bf16-pure``, ``32`` and ``32-true`` are ``fp32``.
The policy's ``name`` is always the canonical one, so results and checkpoints record one name
per policy. float16 (``fp16``, ``16``, ``16-mixed``, ``16-true``) is refused (``REFUSED``): its
narrow range needs a loss scaler, which anychip does not have; bfloat16 has float32's range and
trains without one.
"""

from __future__ import annotations

import dataclasses
import difflib

from anychip.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: str  # dtype of the stored parameters and optimizer state
    compute_dtype: str  # dtype of matmuls/activations in forward and backward

    @property
    def autocast(self) -> bool:
        """True when compute runs in a lower precision than the stored parameters."""
        return self.compute_dtype != self.param_dtype

    def torch_dtype(self, which: str = "param"):
        import torch

        return getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[getattr(self, f"{which}_dtype")])


POLICIES = {
    "fp32": Policy("fp32", "fp32", "fp32"),
    "bf16": Policy("bf16", "fp32", "bf16"),
    "bf16-pure": Policy("bf16-pure", "bf16", "bf16"),
}


# Lightning Fabric's names for the same policies (its "bf16-mixed" is torch autocast with float32
# weights, its "-true" variants keep everything in one dtype).
ALIASES = {"bf16-mixed": "bf16", "bf16-true": "bf16-pure", "32": "fp32", "32-true": "fp32"}
_NO_SCALER = (
    "is float16, whose narrow range needs a loss scaler and anychip has none; "
    "use 'bf16' (autocast, float32 master weights) or 'bf16-pure': bfloat16 has float32's range and needs no scaling"
)
REFUSED = dict.fromkeys(("fp16", "16", "16-mixed", "16-true"), _NO_SCALER)


def policy(name: str | Policy) -> Policy:
    """The policy called ``name`` (a canonical name or an alias in ``ALIASES``); a one-line
    InvalidArgumentError saying why and listing the valid names otherwise."""
    if isinstance(name, Policy):
        return name
    text = str(name)
    if text in POLICIES:
        return POLICIES[text]
    if text in ALIASES:
        return POLICIES[ALIASES[text]]
    if text in REFUSED or ("16" in text and "bf" not in text.lower()):  # fp16-mixed, float16, ...
        raise InvalidArgumentError(f"precision {text!r} {REFUSED.get(text, _NO_SCALER)}")
    close = _suggestion(text)
    hint = f" Did you mean {close!r}?" if close else ""
    raise InvalidArgumentError(
        f"unknown precision {name!r}.{hint} Choose one of: {', '.join(POLICIES)} (or {', '.join(ALIASES)})."
    )


def _suggestion(text: str) -> str | None:
    """The closest valid name that means what ``text`` seems to mean: a name saying "mixed" is
    never answered with a single-dtype policy, "true"/"pure" never with a mixed one, and a
    dtype in the name (bf16 or 32) is kept."""
    lowered = text.lower()
    mode = "mixed" if "mix" in lowered else "pure" if ("true" in lowered or "pure" in lowered) else None
    dtype = "bf16" if "bf" in lowered else "fp32" if "32" in lowered else None

    def fits(candidate: str) -> bool:
        pol = POLICIES[ALIASES.get(candidate, candidate)]
        return (mode is None or mode == ("mixed" if pol.autocast else "pure")) and (dtype is None or dtype == pol.compute_dtype)

    candidates = [c for c in (*POLICIES, *ALIASES) if fits(c)]
    close = difflib.get_close_matches(lowered, candidates, n=1)
    return close[0] if close else None


# -- torch autocast's op policy, as data --------------------------------------------------------
# What torch.autocast does per op on a device, from aten/src/ATen/autocast_mode.{h,cpp} (torch
# 2.13): "lower" casts floating inputs to the autocast dtype, "fp32" to float32, "fp32_opt_dtype"
# runs in float32 unless the call names a dtype (softmax, sum, ...), "promote" runs in the
# widest floating input dtype. An op not listed runs in its inputs' dtypes. float64 inputs are
# never cast. torch keeps one list per device: the CPU list leaves softmax and the norms to
# their input dtype, the CUDA list runs them in float32. Backends that stand in for a torch
# device (jax:cpu for cpu, jax:gpu and jax:tpu for cuda) apply that device's list.
_CPU_LOWER = """conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm _addmm_activation addbmm linear
_convolution matmul conv_tbc mkldnn_rnn_layer conv_transpose1d conv_transpose2d conv_transpose3d prelu
scaled_dot_product_attention _native_multi_head_attention"""
_CPU_FP32 = """avg_pool3d binary_cross_entropy grid_sampler polar prod quantile nanquantile stft cdist
grid_sampler_2d _grid_sampler_2d_cpu_fallback grid_sampler_3d trace view_as_complex cholesky cholesky_inverse
cholesky_solve inverse lu_solve orgqr ormqr pinverse max_pool3d max_unpool2d max_unpool3d adaptive_avg_pool3d
reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d replication_pad3d mse_loss
cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss poisson_nll_loss smooth_l1_loss
cross_entropy_loss l1_loss huber_loss margin_ranking_loss soft_margin_loss triplet_margin_loss
multi_margin_loss ctc_loss kl_div multilabel_margin_loss binary_cross_entropy_with_logits fft_fft fft_ifft
fft_fft2 fft_ifft2 fft_fftn fft_ifftn fft_rfft fft_irfft fft_rfft2 fft_irfft2 fft_rfftn fft_irfftn fft_hfft
fft_ihfft linalg_cond linalg_matrix_rank linalg_solve linalg_cholesky linalg_svdvals linalg_eigvals
linalg_eigvalsh linalg_inv linalg_householder_product linalg_tensorinv linalg_tensorsolve
fake_quantize_per_tensor_affine geqrf _lu_with_info qr svd triangular_solve fractional_max_pool2d
fractional_max_pool3d adaptive_max_pool3d multilabel_margin_loss_forward linalg_qr linalg_cholesky_ex
linalg_svd linalg_eig linalg_eigh linalg_lstsq linalg_inv_ex"""
_CPU_PROMOTE = "stack cat index_copy"
_CUDA_LOWER = """_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d
convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul
linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
_scaled_dot_product_flash_attention scaled_dot_product_attention cudnn_convolution cudnn_convolution_transpose"""
_CUDA_FP32 = """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus
layer_norm native_layer_norm rms_norm group_norm frobenius_norm nuclear_norm cosine_similarity
poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss
huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss
multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp upsample_nearest1d
_upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d
_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d
upsample_bicubic2d _upsample_bicubic2d_aa"""
_CUDA_FP32_OPT_DTYPE = "prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum norm"
_CUDA_PROMOTE = "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add"


def _table(**lists: str) -> dict[str, str]:
    return {op: cast for cast, names in lists.items() for op in names.split()}


AUTOCAST_OPS: dict[str, dict[str, str]] = {
    "cpu": _table(lower=_CPU_LOWER, fp32=_CPU_FP32, promote=_CPU_PROMOTE),
    "cuda": _table(lower=_CUDA_LOWER, fp32=_CUDA_FP32, fp32_opt_dtype=_CUDA_FP32_OPT_DTYPE, promote=_CUDA_PROMOTE),
}
# Names under which the listed ops reach a tracer that sees torch functions and the aten ops
# they decompose into (torchax): the Python-level function or the decomposed aten op.
AUTOCAST_ALIASES = {
    "cross_entropy": "cross_entropy_loss", "__matmul__": "matmul", "__rmatmul__": "matmul",
    "__pow__": "pow", "__rpow__": "pow", "_softmax": "softmax", "_log_softmax": "log_softmax",
    "nll_loss_forward": "nll_loss", "nll_loss2d_forward": "nll_loss2d", "native_group_norm": "group_norm",
}
