"""The estimator's terms: bytes of each memory term, as pure functions of shape and settings.

Every function here is arithmetic on `Architecture` (core/models.py) and `Settings`: no torch.
The constants say where they come from; tests/test_memory.py checks each term against a hand
computation for Llama-3.1-8B, Qwen3-8B and Qwen3-14B, and the 4-bit weights against bitsandbytes
itself.

What the terms follow in the trainer (swallowctl/ppo/policy.py and algo.py; tell whoever
changes them, and rerun benchmarks/memory_validation.py):
- peft's `prepare_model_for_kbit_training` upcasts every weight that is not 4-bit (embeddings,
  lm_head, norms) to fp32, and nothing runs under autocast, so the residual stream, the norms'
  outputs, every activation and the KV cache are fp32 (bitsandbytes computes each 4-bit matmul
  in bf16 and casts the result back to the input's dtype: bnb/nn/modules.py, Linear4bit.forward).
  `Settings.upcast=False` models a bf16 stream instead (then peft casts each LoRA input to the
  adapter's fp32: peft/tuners/lora/bnb.py, Linear4bit.forward);
- log-probs: `chunked_logprobs` applies the (fp32) lm_head to `logits_chunk_size` response
  tokens at a time inside torch.utils.checkpoint: no logits are kept for backward, each chunk is
  recomputed there; top-p filtering (when top_p < 1) sorts the vocabulary of every chunk;
- attention is SDPA with the padding mask (PPO left-pads), which makes transformers repeat the
  KV heads before the kernel (transformers/integrations/sdpa_attention.py, `use_gqa_in_sdpa` is
  False with a mask) and build a boolean (batch, 1, seq, seq) mask; the memory-efficient SDPA
  kernel keeps no seq x seq scores.

Left out (each below 1% of the 8B totals): rollout buffers (ids, masks, log-probs, values,
advantages of one update: about 16 B x seq + 24 B x response per sample), RoPE cos/sin tables,
loss scalars, cuBLAS workspaces beyond the CUDA context constant.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal

from swallowctl.core.models import Architecture

GIB = 1024**3
MIB = 1024**2

BF16 = 2
FP32 = 4
BOOL = 1
INT64 = 8

# ---- constants, each with its source ------------------------------------------------------

# NF4 with double quantization (QLoRA paper, Dettmers et al. 2023, sec. 3 "Double Quantization":
# 4-bit values, one 8-bit constant per block of 64, one fp32 constant per 256 of those, i.e.
# 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter). bitsandbytes 0.50 `quantize_4bit` stores
# exactly that plus, per Linear, the fp32 offset (the mean subtracted before the second
# quantization), a private copy of the 256-entry fp32 dynamic map (`quantize_blockwise`) and of the
# 16-entry fp32 NF4 code (`get_4bit_type`). tests/test_memory.py measures this to the byte.
NF4_BLOCK = 64
NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * FP32
NESTED_CODE_BYTES = 256 * FP32
NESTED_OFFSET_BYTES = FP32
ABSMAX_FP32_BYTES = FP32  # without double quant: one fp32 absmax per block of 64

ADAM_STATES = 2  # torch.optim.AdamW: exp_avg and exp_avg_sq, in the parameter's dtype (fp32)
REWARD_BATCH = 8  # swallowctl/ppo/rewards.py RewardModel's default batch_size

# Logits, bytes per vocab entry of each token of the chunk being worked on (lm_head and stream
# fp32, see above). Plain (top_p = 1): the chunk's logits, kept by the log-prob and entropy
# functions 4, the fp32 block they work in 4, softmax probabilities 4, and in backward the two
# grads 4 + 4 and their sum 4. Top-p adds `top_p_filter`: the temperature-scaled copy 4, sorted
# values 4 and int64 indices 8, softmax 4 and cumsum 4, two bool masks 2, the filtered copy 4.
# No grad (scoring): logits 4, block 4, probabilities 4, p * z 4, plus the same filter.
LOGITS_PLAIN_GRAD = 4 + 4 + 4 + 4 + 4 + 4
LOGITS_PLAIN_NOGRAD = 4 + 4 + 4 + 4
LOGITS_TOP_P_EXTRA = 4 + 4 + INT64 + 4 + 4 + 2 * BOOL + 4

# Sampling, per vocab entry of each sequence in the generate batch (transformers generate:
# `outputs.logits[:, -1].to(copy=True, dtype=torch.float32)`, a warped copy per logits processor,
# then TopPLogitsWarper sorts: values 4 + int64 indices 8, softmax 4 + cumsum 4, masks 2, and the
# final softmax 4).
SAMPLING_BYTES = 4 + 4 + (4 + INT64 + 4 + 4 + 2 * BOOL) + 4
SAMPLING_BYTES_NO_TOP_P = 4 + 4 + 4

# TRL's fused LM head (GRPO / RLOO; trl/trainer/utils.py `add_fused_lm_head`, trl/kernels/
# chunked_logprob.py): log-probs come from [TOKEN_CHUNK_SIZE = 4096 tokens x 32768 vocab] tiles of
# the projection in the compute dtype, folded into running statistics by a Triton kernel on CUDA
# (only the completion positions); backward recomputes each tile and accumulates an fp32 grad of
# the hidden states. No logits chunk of the whole vocabulary is ever held.
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768

# The CUDA context outside PyTorch's allocator: PyTorch PR #86509 (lazy module loading, on by
# default since 1.13) measured a bare context at 287 MB vs 667 MB eager; kernels of torch and
# bitsandbytes loaded on first use and cuBLAS workspaces add to it: 512 MiB.
CUDA_CONTEXT_BYTES = 512 * MIB
# The caching allocator rounds blocks (2 MiB segments for large tensors) and fragments as KV
# caches grow and activations come and go: reserved exceeds allocated. 5% of the tensors, at
# least 256 MiB (DESIGN.md: context + slack ~0.5-1 GB); benchmarks/memory_validation.py
# reports max_memory_reserved beside max_memory_allocated to check it.
SLACK_FRACTION = 0.05
SLACK_MIN_BYTES = 256 * MIB

# The seven Linear kinds of a Llama/Qwen3 decoder layer, with the module path peft matches.
ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
LINEAR_KINDS = ATTN_KINDS + MLP_KINDS
# Linears that read the same tensor: without dropout their adapters keep one copy of it.
SHARED_INPUTS = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)


@dataclass(frozen=True)
class RewardModel:
    """A separate sequence-classification reward model: its shape and scoring batch."""

    architecture: Architecture
    batch: int = REWARD_BATCH
    name: str = ""


@dataclass(frozen=True)
class Settings:
    """Everything the estimate depends on besides the architecture (defaults: the seed's config).

    The rollout is generated and scored `rollout_batch` sequences at a time. `upcast`: the
    trainer runs peft's prepare_model_for_kbit_training (fp32 non-4-bit weights and activations).

    `algorithm` grpo / rloo (TRL's trainers): no value head; `rollout_batch` is the whole local
    generation batch, `num_generations` answers to each of its prompts, generated in one call;
    scoring runs `micro_batch` sequences at a time; log-probs through TRL's fused LM head; the
    LoRA weights, grads and AdamW states are bf16 on a 4-bit base (`lora_bytes`: TRL casts them).
    """

    micro_batch: int = 4
    grad_accum: int = 2
    rollout_batch: int = 4
    prompt_tokens: int = 512
    response_tokens: int = 512
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: bool = True
    critic_adapter: bool = False
    critic_r: int = 0  # the critic adapter's rank; 0 = lora_r
    reference_adapter: bool = False
    value_head: bool = True
    gradient_checkpointing: bool = True
    logits_chunk: int = 1024
    quantized: bool = True
    double_quant: bool = True
    top_p: bool = True
    attention: Literal["sdpa", "flash"] = "sdpa"
    upcast: bool = True
    reward_models: tuple[RewardModel, ...] = ()
    logits_bytes: int | None = None  # per vocab entry of a chunk token: another framework's loss
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    num_generations: int = 1  # answers per prompt inside the rollout batch (grpo / rloo)
    lora_bytes: int = FP32  # per LoRA weight, grad and AdamW state

    @property
    def critic_free(self) -> bool:
        """GRPO / RLOO through TRL: no value model, groups of answers per prompt."""
        return self.algorithm != "ppo"

    @property
    def seq_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def act(self) -> int:
        """Bytes of one activation value: fp32 when upcast, else bf16."""
        return FP32 if self.upcast else BF16

    def but(self, **changes: object) -> Settings:
        """A copy with some fields changed (dataclasses.replace, typed loosely for brevity)."""
        return replace(self, **changes)  # type: ignore[arg-type]


# ---- shapes and LoRA ----------------------------------------------------------------------


def linear_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Linear kind of one decoder layer."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    inter = arch.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def _module_name(layer: int, kind: str) -> str:
    block = "self_attn" if kind in ATTN_KINDS else "mlp"
    return f"model.layers.{layer}.{block}.{kind}"


def _matches(target: str | tuple[str, ...], name: str) -> bool:
    """peft's rule (tuners_utils.check_target_module_exists): a string is a full-match regex,
    a list matches a module whose name equals an item or ends with '.' + item; 'all-linear' is
    every Linear but the output layer."""
    if target == "all-linear":
        return True
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def lora_targets(arch: Architecture, target: str | tuple[str, ...]) -> list[tuple[int, str]]:
    """(layer, kind) of every Linear that gets an adapter under peft's `target_modules`."""
    return [
        (layer, kind)
        for layer in range(arch.num_hidden_layers)
        for kind in LINEAR_KINDS
        if _matches(target, _module_name(layer, kind))
    ]


def lora_param_count(arch: Architecture, r: int, target: str | tuple[str, ...]) -> int:
    """Trainable LoRA parameters as peft creates them: A is r x in, B is out x r, no bias."""
    shapes = linear_shapes(arch)
    return sum(r * sum(shapes[kind]) for _, kind in lora_targets(arch, target))


def target_kinds(arch: Architecture, target: str | tuple[str, ...]) -> frozenset[str]:
    """The Linear kinds with an adapter in at least one layer."""
    return frozenset(kind for _, kind in lora_targets(arch, target))


def adapter_param_count(arch: Architecture, s: Settings) -> int:
    """LoRA parameters trained: the policy's, and the critic's own adapter if configured."""
    n = lora_param_count(arch, s.lora_r, s.lora_targets)
    critic = lora_param_count(arch, s.critic_r or s.lora_r, s.lora_targets)
    return n + (critic if s.critic_adapter else 0)


# ---- persistent terms ---------------------------------------------------------------------


def nf4_linear_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps for one 4-bit Linear weight of `numel` values (see NF4_BLOCK)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + blocks * ABSMAX_FP32_BYTES + NF4_CODE_BYTES
    nested = math.ceil(blocks / NESTED_BLOCK) * FP32
    return packed + blocks + nested + NESTED_OFFSET_BYTES + NESTED_CODE_BYTES + NF4_CODE_BYTES


def base_weight_bytes(arch: Architecture, s: Settings) -> int:
    """The decoder's Linear weights: NF4 per module, or bf16 when not quantized."""
    per_layer = [i * o for i, o in linear_shapes(arch).values()]
    if not s.quantized:
        return arch.num_hidden_layers * sum(per_layer) * BF16
    return arch.num_hidden_layers * sum(nf4_linear_bytes(n, s.double_quant) for n in per_layer)


def _kept_dtype(s: Settings) -> int:
    """Weights that are not 4-bit: fp32 after prepare_model_for_kbit_training, else bf16."""
    return FP32 if s.upcast and s.quantized else BF16


def embedding_bytes(arch: Architecture, s: Settings) -> int:
    """embed_tokens and (untied) lm_head: never quantized (transformers' bitsandbytes
    integration keeps the output embeddings out of 4-bit)."""
    tables = 1 if arch.tie_word_embeddings else 2
    return tables * arch.vocab_size * arch.hidden_size * _kept_dtype(s)


def norm_bytes(arch: Architecture, s: Settings) -> int:
    """RMSNorm weights (2 per layer + final; Qwen3 adds q/k norms of head_dim) plus the rotary
    `inv_freq` and `original_inv_freq` buffers (fp32, head_dim / 2 each)."""
    h, d = arch.hidden_size, arch.head_dim
    per_layer = 2 * h + (2 * d if arch.model_type == "qwen3" else 0)
    return (arch.num_hidden_layers * per_layer + h) * _kept_dtype(s) + 2 * (d // 2) * FP32


def value_head_bytes(arch: Architecture, s: Settings) -> int:
    """fp32 Linear(hidden, 1) with bias: weight, grad, AdamW m and v (16 B a parameter); one
    head, on the policy's backbone or on the critic adapter's."""
    if not s.value_head:
        return 0
    return (arch.hidden_size + 1) * FP32 * (2 + ADAM_STATES)


def dequant_buffer_bytes(arch: Architecture, s: Settings) -> int:
    """bitsandbytes dequantizes a weight to bf16 for matmuls of many tokens and in backward
    (MatMul4Bit.backward: `dequantize_4bit(B)`); the largest weight bounds the buffer."""
    if not s.quantized:
        return 0
    return max(i * o for i, o in linear_shapes(arch).values()) * BF16


def reward_model_bytes(rm: RewardModel) -> int:
    """A sequence-classification reward model as swallowctl/ppo/rewards.py loads it with the
    policy in 4-bit: NF4 linears, bf16 embeddings and norms (no prepare_model_for_kbit_training);
    its score head (hidden x 1) is negligible."""
    plain = Settings(upcast=False)
    arch = rm.architecture
    return (
        base_weight_bytes(arch, plain)
        + arch.vocab_size * arch.hidden_size * BF16
        + norm_bytes(arch, plain)
    )


# ---- per-token activation terms -----------------------------------------------------------


def kv_width(arch: Architecture, s: Settings) -> int:
    """Width of K (and of V) as the attention kernel sees them: repeated to every query head
    when SDPA gets a padding mask, native GQA with flash attention."""
    heads = arch.num_attention_heads if s.attention == "sdpa" else arch.num_key_value_heads
    return heads * arch.head_dim


def kv_cache_bytes_per_token(arch: Architecture, s: Settings) -> int:
    """K and V of every layer for one token, in the stream's dtype (fp32 when upcast: the k/v
    projections return the input's dtype)."""
    return arch.kv_cache_bytes_per_token(bytes_per_value=s.act)


def layer_activation_bytes(arch: Architecture, s: Settings) -> int:
    """Bytes one decoder layer saves for backward, per token (HF Llama/Qwen3, QLoRA via peft).

    RMSNorm keeps its fp32 input (twice); SDPA keeps q, k, v, output and an fp32 logsumexp per
    head; the SwiGLU MLP keeps gate output, silu(gate) and up output; frozen 4-bit matmuls keep
    nothing (bitsandbytes MatMul4Bit saves no input when the weight needs no grad); adapters keep
    their inputs (see `lora_saved_bytes`). Same bookkeeping as Korthikanti et al. 2022
    ("Reducing Activation Recomputation", 34 h per token per layer for a GPT layer in 16-bit
    without flash attention), for this layer shape.
    """
    d, q, inter = arch.head_dim, arch.num_attention_heads * arch.head_dim, arch.intermediate_size
    norms = 2 * arch.hidden_size * FP32
    if arch.model_type == "qwen3":  # per-head q_norm and k_norm keep their fp32 inputs too
        norms += (q + arch.num_key_value_heads * d) * FP32
    attention = s.act * (2 * q + 2 * kv_width(arch, s)) + FP32 * arch.num_attention_heads
    mlp = s.act * 3 * inter
    return norms + attention + mlp + lora_saved_bytes(arch, s)


def lora_saved_bytes(arch: Architecture, s: Settings) -> int:
    """Per token and layer, what the adapters keep for their weight grads: the input of lora_A
    (with dropout: each module's dropout output and bool mask; without, and in the adapter's
    dtype: one copy per shared input; else each module's fp32 cast) and lora_A's r outputs."""
    kinds = target_kinds(arch, s.lora_targets)
    width = {k: v[0] for k, v in linear_shapes(arch).items()}
    outputs = sum(FP32 * s.lora_r for _ in kinds)
    if s.lora_dropout:
        return outputs + sum((s.act + BOOL) * width[k] for k in kinds)
    if not s.upcast:
        return outputs + sum(FP32 * width[k] for k in kinds)
    shared = [group for group in SHARED_INPUTS if kinds.intersection(group)]
    return outputs + sum(s.act * width[group[0]] for group in shared)


def forward_working_bytes(arch: Architecture, s: Settings) -> int:
    """Live bytes per token inside one layer of a no-grad forward (prefill, scoring): residual
    and normed input, the fp32 RMSNorm temporary, the fp32 cast of an adapter's input when the
    stream is bf16, and the larger of attention (q, k, v, output) and the MLP (three
    intermediates alive at the multiply). The trainer puts the model in eval mode for rollout
    and scoring (trainer.py), so LoRA dropout makes no copy here."""
    h, inter = arch.hidden_size, arch.intermediate_size
    q = arch.num_attention_heads * arch.head_dim
    attention = s.act * (2 * q + 2 * kv_width(arch, s))
    mlp = s.act * 3 * inter
    copies = target_kinds(arch, s.lora_targets) and not s.upcast
    lora_copy = FP32 * max(h, inter) if copies else 0
    return 2 * s.act * h + FP32 * h + lora_copy + max(attention, mlp)


def backward_working_bytes(arch: Architecture, s: Settings) -> int:
    """Live gradient buffers per token while one layer runs backward: grads of the layer output
    and of the residual, of the three MLP intermediates, and of an adapter's (fp32) input."""
    h, inter = arch.hidden_size, arch.intermediate_size
    return 2 * s.act * h + 3 * s.act * inter + FP32 * max(h, inter)


def final_bytes(arch: Architecture, s: Settings) -> int:
    """Per token after the last layer: the final RMSNorm's fp32 input and its output, the last
    hidden state that the lm_head chunks and the value head read."""
    return arch.hidden_size * (FP32 + s.act)


def logits_bytes_per_vocab(s: Settings, grad: bool) -> int:
    """Bytes per vocab entry of one chunk token (see LOGITS_PLAIN_GRAD)."""
    if s.logits_bytes is not None:
        return s.logits_bytes
    base = LOGITS_PLAIN_GRAD if grad else LOGITS_PLAIN_NOGRAD
    return base + (LOGITS_TOP_P_EXTRA if s.top_p else 0)


def fused_logits_bytes(arch: Architecture, s: Settings, tokens: int, grad: bool) -> int:
    """TRL's fused LM head over `tokens` completion positions (see TRL_TOKEN_TILE): one tile of
    the projection in the stream's dtype, plus in backward the fp32 grad of the hidden states."""
    tile = min(tokens, TRL_TOKEN_TILE) * min(arch.vocab_size, TRL_VOCAB_TILE) * s.act
    return tile + (tokens * arch.hidden_size * FP32 if grad else 0)


def mask_bytes(batch: int, q_len: int, kv_len: int, s: Settings) -> int:
    """transformers' boolean SDPA mask, (batch, 1, q, kv); flash attention takes none."""
    return batch * q_len * kv_len * BOOL if s.attention == "sdpa" else 0
