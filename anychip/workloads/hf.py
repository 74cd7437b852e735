"""Hugging Face ``transformers`` architectures as workloads, built from their config classes:
random weights, no download, no network.

``hf_workload("llama", "tiny")`` is a :class:`~anychip.workloads.Workload` whose model is
``LlamaForCausalLM(LlamaConfig(...))`` initialised under ``torch.manual_seed(seed)``. The decoders
(llama, gpt2, qwen2, mistral) train on the causal-LM loss the model computes itself (the batch's
``labels`` are its ``input_ids``; the model shifts them); ``bert`` is ``BertForMaskedLM`` trained on
15 % masked tokens. Every batch is a dict, ``loss_fn`` is ``model(**batch).loss``, as a Hugging Face
training loop writes it.

Two settings are fixed so that every backend computes the same function: attention is
``attn_implementation="sdpa"`` (one ``scaled_dot_product_attention`` call: torch's fused kernels
on the torch backends, anychip's JAX attention on the jax ones; "eager" would materialise the
scores everywhere), and every dropout probability is 0 (a random mask would differ between
backends' RNGs). ``use_cache`` is off: a training forward has no use for a key/value cache.

Sizes: ``tiny`` (2 layers, hidden 64, vocabulary 1024, under 0.5 M parameters) for CI; ``small``
(12 layers, hidden 768, 12 heads) has the shapes of anychip's own ``gpt-small`` / ``llama-small``
for the decoders, so a bench against those compares implementations, not sizes, and is BERT-base
for ``bert``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util

from anychip.errors import InvalidArgumentError, MissingDependencyError
from anychip.workloads.base import Workload
from anychip.workloads.data import generator, seeded, synthetic_tokens

INSTALL = "pip install 'anychip[hf]'"


@dataclasses.dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    heads: int
    ffn: int  # MLP width: 4 x hidden for GELU MLPs, about 8/3 x hidden for SwiGLU ones
    vocab: int
    ctx: int  # max positions: the longest sequence a batch may have
    batch: int  # default batch and sequence length of the workload
    seq: int


def _sizes(*, ffn_tiny: int, ffn_small: int, vocab_small: int, ctx_small: int, batch_small: int = 16) -> dict[str, Size]:
    return {
        "tiny": Size(layers=2, hidden=64, heads=4, ffn=ffn_tiny, vocab=1024, ctx=512, batch=4, seq=64),
        "small": Size(layers=12, hidden=768, heads=12, ffn=ffn_small, vocab=vocab_small, ctx=ctx_small,
                      batch=batch_small, seq=ctx_small),
    }


_GELU_MLP = dict(ffn_tiny=256, ffn_small=3072)
_SWIGLU_MLP = dict(ffn_tiny=176, ffn_small=2048)  # llama-tiny / llama-small's widths


def _llama(s: Size) -> dict:
    return dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.heads, head_dim=s.hidden // s.heads,
                max_position_embeddings=s.ctx, attention_dropout=0.0, tie_word_embeddings=False)


def _grouped_query(s: Size) -> dict:
    # Mistral and Qwen2 share key/value heads between query heads (grouped-query attention):
    # 2 query heads per key/value head in tiny, 3 in small.
    return {**_llama(s), "num_key_value_heads": s.heads // (2 if s.heads < 12 else 3)}


def _mistral(s: Size) -> dict:
    # A sliding window shorter than the sequence, as Mistral 7B's 4096 of its 8192-token training
    # context: tiny's 32 of 64 makes the banded mask take part in the tests.
    return {**_grouped_query(s), "sliding_window": s.seq // 2}


def _gpt2(s: Size) -> dict:
    return dict(vocab_size=s.vocab, n_embd=s.hidden, n_inner=s.ffn, n_layer=s.layers, n_head=s.heads,
                n_positions=s.ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                bos_token_id=s.vocab - 1, eos_token_id=s.vocab - 1)  # GPT-2's end of text is its last id


def _bert(s: Size) -> dict:
    return dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, max_position_embeddings=s.ctx, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


@dataclasses.dataclass(frozen=True)
class Architecture:
    config: str  # the transformers config class
    model: str  # the transformers model class with its training head
    masked: bool  # masked-LM objective (BERT) rather than causal LM
    options: object  # Size -> the config class's own keyword arguments
    sizes: dict


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaConfig", "LlamaForCausalLM", False, _llama,
                          _sizes(**_SWIGLU_MLP, vocab_small=32000, ctx_small=1024)),
    # gpt-small's vocabulary: GPT-2's 50257 padded to a multiple of 64 so the LM head tiles evenly
    "gpt2": Architecture("GPT2Config", "GPT2LMHeadModel", False, _gpt2,
                         _sizes(**_GELU_MLP, vocab_small=50304, ctx_small=1024)),
    # llama-small's vocabulary: Qwen2's own 151936 would put a third of the FLOPs in the LM head
    "qwen2": Architecture("Qwen2Config", "Qwen2ForCausalLM", False, _grouped_query,
                          _sizes(**_SWIGLU_MLP, vocab_small=32000, ctx_small=1024)),
    "mistral": Architecture("MistralConfig", "MistralForCausalLM", False, _mistral,
                            _sizes(**_SWIGLU_MLP, vocab_small=32000, ctx_small=1024)),
    # BERT-base; batch 32 x 512 keeps the decoders' 16 x 1024 tokens per step
    "bert": Architecture("BertConfig", "BertForMaskedLM", True, _bert,
                         _sizes(**_GELU_MLP, vocab_small=30522, ctx_small=512, batch_small=32)),
}
MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)
SIZES: tuple[str, ...] = ("tiny", "small")

MASK_FRACTION = 0.15


def _architecture(model_type: str, size: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise InvalidArgumentError(
            f"unknown Hugging Face model type {model_type!r}; supported: {', '.join(MODEL_TYPES)} (as 'hf:<model_type>')"
        )
    if size not in SIZES:
        raise InvalidArgumentError(f"unknown size {size!r} for hf:{model_type}; supported: {', '.join(SIZES)}")
    return ARCHITECTURES[model_type]


def _transformers():
    if importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(f"Hugging Face workloads need transformers: {INSTALL}")
    return importlib.import_module("transformers")


def hf_config(model_type: str, size: str = "tiny"):
    """The transformers config of ``hf:<model_type>`` at ``size`` (float32, SDPA, no dropout)."""
    arch = _architecture(model_type, size)
    config_class = getattr(_transformers(), arch.config)
    return config_class(**arch.options(arch.sizes[size]), use_cache=False, attn_implementation="sdpa", dtype="float32")


def build(model_type: str, size: str = "tiny", seed: int = 0):
    """A freshly initialised model: the same seed gives the same weights on every backend."""
    arch = _architecture(model_type, size)
    config = hf_config(model_type, size)
    model = seeded(lambda: getattr(_transformers(), arch.model)(config), seed)
    if not arch.masked:
        # transformers picks the loss by class name; GPT2LMHeadModel's does not name one (and warns)
        model.loss_type = "ForCausalLM"
    return model


def loss_fn(model, batch):
    """The loss the model computes from its own ``labels`` (shifted inside for causal LMs)."""
    return model(**batch).loss


def causal_lm_batch(step: int, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """``input_ids`` of anychip's synthetic token stream; ``labels`` the same ids."""
    ids, _ = synthetic_tokens(step, batch, seq, vocab, seed)
    return {"input_ids": ids, "labels": ids.clone()}


def masked_lm_batch(step: int, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """BERT's objective on the synthetic stream: 15 % of each row's positions (at least one) are
    predicted, of which 80 % show the mask token (id ``vocab - 1``, which the data never uses),
    10 % a random token and 10 % the original; ``labels`` are -100 elsewhere. Every row has the
    same number of predicted tokens, so the mean over micro-batches (``accumulate``) equals the
    mean over the whole batch."""
    import torch

    mask_id = vocab - 1
    ids, _ = synthetic_tokens(step, batch, seq, mask_id, seed)
    # its own stream, so the choice of positions does not repeat the token stream's draws
    g = torch.Generator().manual_seed(generator(step, seed).initial_seed() ^ 0x6D61736B)
    k = max(1, round(MASK_FRACTION * seq))
    chosen = torch.rand(batch, seq, generator=g).argsort(dim=1)[:, :k]
    predicted = torch.zeros(batch, seq, dtype=torch.bool).scatter_(1, chosen, True)
    action = torch.rand(batch, seq, generator=g)
    random_ids = torch.randint(0, mask_id, (batch, seq), generator=g)
    inputs = torch.where(predicted & (action < 0.8), mask_id, ids)
    inputs = torch.where(predicted & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "labels": torch.where(predicted, ids, -100)}


def flops_per_token(model, seq: int) -> float:
    """6 N + 12 L d T, as the gpt and llama workloads count: N is every parameter that takes
    part in a matmul, so the embedding tables (lookups) are left out and the LM head is counted
    whether or not it shares its weight with the token table; d is heads x head_dim. A sliding
    window (mistral) is not discounted, as causal masking is not: the convention of the
    published MFU figures."""
    from torch import nn

    c = model.config
    total = sum(p.numel() for p in model.parameters())
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings().weight
    n = total - sum(w.numel() for w in tables) + (head.numel() if any(head is w for w in tables) else 0)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 6.0 * n + 12.0 * c.num_hidden_layers * heads * head_dim * seq


def hf_workload(model_type: str, size: str = "tiny"):
    """``hf:<model_type>`` at ``size`` ('tiny' or 'small') as a Workload. Unknown names fail here,
    in one line; a missing transformers fails here too, not at the first build."""
    arch = _architecture(model_type, size)
    _transformers()
    s = arch.sizes[size]
    make_batch = masked_lm_batch if arch.masked else causal_lm_batch
    name = f"hf:{model_type}-{size}"

    def batch(step: int, batch_size: int, seq: int, seed: int = 0) -> dict:
        if seq > s.ctx:
            raise InvalidArgumentError(f"{name}: sequence length {seq} exceeds the model's {s.ctx} positions; use --seq {s.ctx} or less")
        return make_batch(step, batch_size, seq, s.vocab, seed)

    return Workload(
        name,
        build=lambda seed=0: build(model_type, size, seed),
        batch=batch,
        loss_fn=loss_fn,
        flops_per_token=flops_per_token,
        default_batch=s.batch,
        default_seq=s.seq,
        max_seq=s.ctx,
        batch_bytes_per_token=16,  # int64 input_ids and labels
        # as anychip's own transformers: q, k, v, attention output and two normalised inputs per
        # block and token at least (the MLP's hidden activations come on top)
        activation_bytes_per_token=4 * 8 * s.hidden * s.layers,
    )
