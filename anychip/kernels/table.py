"""The kernel table as data: every implementation of every op and the kernel families it runs on.

A kernel *family* is a column of the table. Each backend registration names the family whose
kernels it uses (``Registration.kernel_family``), so a plug-in backend reuses a column by name
and the table never lists backend names. Order inside an op does not matter: priority decides.
"""

from __future__ import annotations

import dataclasses

OPS: tuple[str, ...] = ("rms_norm", "linear_cross_entropy", "swiglu", "rotary", "attention")
FAMILIES: tuple[str, ...] = ("cpu", "cuda", "neuron", "neuron-xla", "jax:cpu", "jax:gpu", "jax:tpu")
JAX_FAMILIES: tuple[str, ...] = ("jax:cpu", "jax:gpu", "jax:tpu")
# The kernel_family of a backend that runs only the reference ops.
REFERENCE_FAMILY = "reference"
# The values of ``kernels=`` that are not an implementation name.
MODES: tuple[str, ...] = ("auto", "reference")
FRAMEWORKS: tuple[str, ...] = ("torch", "jax")


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of one op: where it runs and what it needs. Pure data.

    op, name:     the op and the implementation; the code is ``anychip.kernels.<op>.<name>``.
    framework:    "torch" (takes torch tensors) or "jax" (takes jax arrays; reached from torch
                  through torchax, see ``anychip.kernels.torchax``).
    backends:     kernel families where it runs natively; auto may pick it there.
    requires:     top-level modules it imports, probed with ``find_spec``.
    priority:     auto picks the highest priority that runs; the reference has 0.
    interpreted:  families where it runs only in an interpreter (Triton's TRITON_INTERPRET=1,
                  Pallas' interpret=True): for tests, so only an explicit request gets it.
    interpreter_env: environment variable that must be "1" for ``interpreted`` ("" = none).
    experimental: never picked by auto (not verified on hardware); explicit requests only,
                  like JAX's ``BackendRegistration(experimental=True)``.
    explicit_only: why auto does not pick it although it runs (e.g. it saves memory but was
                  measured slower than the compiled reference); "" = auto may pick it.
    direct:       plain torch code that the public entry calls as is and torch autograd
                  differentiates; otherwise the op goes through its ``anychip::<op>`` custom op.
    note:         one line for ``available()``.
    """

    op: str
    name: str
    framework: str
    backends: tuple[str, ...]
    requires: tuple[str, ...] = ()
    priority: int = 0
    interpreted: tuple[str, ...] = ()
    interpreter_env: str = ""
    explicit_only: str = ""
    experimental: bool = False
    direct: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        where = f"Impl({self.op!r}, {self.name!r})"
        if self.op not in OPS:
            raise ValueError(f"{where}: unknown op; known: {', '.join(OPS)}")
        if not self.name.isidentifier():
            raise ValueError(f"{where}: name must be a Python identifier (it names the file)")
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"{where}: framework must be one of {FRAMEWORKS}")
        for field in ("backends", "requires", "interpreted"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{where}: {field} must be a tuple of str, got {value!r}")
        if not self.backends and not self.interpreted:
            raise ValueError(f"{where}: runs nowhere (no backends, no interpreted backends)")
        unknown = set(self.backends + self.interpreted) - set(FAMILIES)
        if unknown:
            raise ValueError(f"{where}: unknown backends (kernel families) {sorted(unknown)}; known: {FAMILIES}")
        if set(self.backends) & set(self.interpreted):
            raise ValueError(f"{where}: a backend is both native and interpreted")
        if self.name == "reference":
            if self.framework != "torch" or not self.direct or set(self.backends) != set(FAMILIES):
                raise ValueError(f"{where}: the reference is direct torch code on every backend")
            if self.priority != 0 or self.requires or self.experimental:
                raise ValueError(f"{where}: the reference has priority 0 and no requirements")
        elif self.priority <= 0:
            raise ValueError(f"{where}: a kernel needs priority > 0 to beat the reference")
        runs_on = self.backends + self.interpreted
        if self.framework == "jax" and not set(runs_on) <= set(JAX_FAMILIES):
            raise ValueError(f"{where}: a jax implementation runs on jax:* backends only")
        if self.framework == "torch" and self.name != "reference" and set(runs_on) & set(JAX_FAMILIES):
            raise ValueError(f"{where}: a torch kernel cannot run on jax:* (use a jax implementation)")
        if self.direct and self.framework != "torch":
            raise ValueError(f"{where}: only torch code can be called directly")

    @property
    def module(self) -> str:
        return f"anychip.kernels.{self.op}.{self.name}"


def _reference(op: str) -> Impl:
    return Impl(op, "reference", "torch", FAMILIES, direct=True, note="plain PyTorch; the spec")


def _triton(op: str, note: str, explicit_only: str = "") -> Impl:
    return Impl(
        op, "triton", "torch", ("cuda",), requires=("triton",), priority=20,
        interpreted=("cpu",), interpreter_env="TRITON_INTERPRET", note=note, explicit_only=explicit_only,
    )


def _jax(op: str, note: str, explicit_only: str = "") -> Impl:
    return Impl(op, "jax", "jax", JAX_FAMILIES, requires=("jax",), priority=10, note=note, explicit_only=explicit_only)


# Measurements behind the explicit_only entries were taken on an H100 (benchmarks/RESULTS.md).
TABLE: tuple[Impl, ...] = (
    _reference("rms_norm"),
    # Alone 1.09x the compiled reference, but inside a compiled llama-small step Triton
    # rms_norm + rotary made the step 0.92x: an opaque custom op stops inductor fusing the
    # norm with its neighbours.
    _triton(
        "rms_norm", "row-blocked Triton forward/backward, dw reduced per program",
        explicit_only="llama-small step 0.92x with it vs inductor fusing the reference (H100)",
    ),
    _jax("rms_norm", "jnp; XLA fuses it"),
    Impl(
        "rms_norm", "pallas", "jax", ("jax:tpu",), requires=("jax",), priority=20,
        interpreted=("jax:cpu",), experimental=True,
        note="Pallas (Mosaic) kernel with custom_vjp; not verified on a TPU, explicit only",
    ),
    _reference("linear_cross_entropy"),
    # Both chunked heads cut the head's peak memory ~35x (9.4 GB -> 0.27 GB at GPT-2 small,
    # 16 x 1024) but ran 6-10x slower than the inductor-compiled unfused head: worth asking
    # for when memory is the limit, not a default.
    Impl(
        "linear_cross_entropy", "torch_chunked", "torch", ("cpu", "cuda"), priority=10,
        note="token chunks, logits never whole; backward recomputes each chunk",
        explicit_only="saves memory but measured ~10x slower than the compiled unfused head (H100)",
    ),
    _triton(
        "linear_cross_entropy", "token chunks; cuBLAS matmul + Triton softmax/grad in place",
        explicit_only="saves memory but measured ~6x slower than the compiled unfused head (H100)",
    ),
    # GPT-2 small bf16 on jax:gpu went from 435k to 290k tokens/s with it.
    _jax(
        "linear_cross_entropy", "token chunks under lax.map/scan with custom_vjp",
        explicit_only="saves memory but cost a third of jax:gpu's GPT-2-small throughput (H100)",
    ),
    _reference("swiglu"),
    # inductor fuses the reference's silu*up into its neighbours; the opaque op cannot be.
    _triton("swiglu", "elementwise Triton forward/backward", explicit_only="measured 0.63x the inductor-compiled reference on an H100"),
    _jax("swiglu", "jnp; XLA fuses it"),
    _reference("rotary"),
    _triton(
        "rotary", "Triton, strided q/k, rotate-half",
        explicit_only="llama-small step 0.92x with it vs inductor fusing the reference (H100)",
    ),
    _jax("rotary", "jnp; XLA fuses it"),
    _reference("attention"),
    Impl(
        "attention", "sdpa", "torch", ("cpu", "cuda"), priority=10, direct=True,
        note="torch scaled_dot_product_attention (flash / memory-efficient)",
    ),
    _jax(
        "attention",
        "jax.nn.dot_product_attention: cuDNN on jax:gpu for bf16/fp16, else XLA; torch's "
        "scaled_dot_product_attention lowers the same way (with dropout or not 4-D: the reference)",
    ),
)

IMPLS: dict[tuple[str, str], Impl] = {(i.op, i.name): i for i in TABLE}
if len(IMPLS) != len(TABLE):
    raise RuntimeError("anychip.kernels.table.TABLE lists an (op, name) twice")
