"""The memory estimate of one PPO update: bytes per term, per phase, and the peak.

One 4-bit base serves policy, value and reference (DESIGN.md, "PPO — the engine"), so the
persistent terms are counted once. An update has four memory shapes; the peak is the largest:

- rollout: `generate` with the adapter on: KV cache, prefill activations, sampling buffers;
- scoring: no-grad forwards (policy + values, reference, reward model) over prompt + response,
  `local_rollout_forward_batch_size` sequences at a time, log-probs in `logits_chunk_size` chunks;
- update, loss: forward with grad to the loss: saved activations plus one logits chunk;
- update, backward: saved activations plus one recomputed layer and the backward buffers.

The AdamW states stay on the GPU between updates, so they count in every phase; the LoRA grads
only in the update (zero_grad(set_to_none=True) frees them). The per-term formulas live in
terms.py.

GRPO and RLOO (`Settings.algorithm`, TRL's trainers) have the same four shapes without a critic:
no value head; the rollout generates the whole local generation batch in one call, every prompt
`num_generations` times (the group whose mean is the baseline), so its KV cache holds all of
them; scoring and the update run `micro_batch` sequences at a time through TRL's fused LM head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from swallowctl.core.models import Architecture
from swallowctl.memory.terms import (
    ADAM_STATES,
    CUDA_CONTEXT_BYTES,
    FP32,
    MIB,
    SAMPLING_BYTES,
    SAMPLING_BYTES_NO_TOP_P,
    SLACK_FRACTION,
    SLACK_MIN_BYTES,
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    Settings,
    adapter_param_count,
    backward_working_bytes,
    base_weight_bytes,
    dequant_buffer_bytes,
    embedding_bytes,
    final_bytes,
    forward_working_bytes,
    fused_logits_bytes,
    kv_cache_bytes_per_token,
    layer_activation_bytes,
    logits_bytes_per_vocab,
    lora_param_count,
    mask_bytes,
    norm_bytes,
    reward_model_bytes,
    value_head_bytes,
)

PHASES = ("rollout", "scoring", "update:loss", "update:backward")
PHASE_TITLES = {
    "rollout": "rollout (generate)",
    "scoring": "scoring (log-probs, values)",
    "update:loss": "update: forward + loss",
    "update:backward": "update: backward",
}


@dataclass(frozen=True)
class Term:
    """One line of the breakdown: a stable key, a label, its bytes, and how they were counted."""

    key: str
    label: str
    bytes: int
    basis: str


@dataclass(frozen=True)
class Phase:
    """One memory shape of the update: its terms add up to its total."""

    name: str
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def title(self) -> str:
        return PHASE_TITLES.get(self.name, self.name)

    def bytes_of(self, key: str) -> int:
        """A term's bytes in this phase (0 when the phase has no such term)."""
        return sum(t.bytes for t in self.terms if t.key == key)


@dataclass(frozen=True)
class Estimate:
    """Per-phase breakdowns; `peak` is the largest phase (what must fit in the GPU)."""

    phases: tuple[Phase, ...]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def estimate(arch: Architecture, s: Settings) -> Estimate:
    """The four phase breakdowns of one PPO update with settings `s` on architecture `arch`."""
    persistent = _persistent_terms(arch, s)
    return Estimate(
        phases=(
            _phase("rollout", persistent + _rollout_terms(arch, s)),
            _phase("scoring", persistent + _scoring_terms(arch, s)),
            _phase("update:loss", persistent + _update_terms(arch, s, "loss")),
            _phase("update:backward", persistent + _update_terms(arch, s, "backward")),
        )
    )


def _phase(name: str, terms: Iterable[Term]) -> Phase:
    kept = tuple(t for t in terms if t.bytes > 0)
    tensors = sum(t.bytes for t in kept)
    slack = Term(
        "allocator_slack",
        "allocator slack",
        max(SLACK_MIN_BYTES, round(tensors * SLACK_FRACTION)),
        f"{SLACK_FRACTION:.0%} of the tensors, at least {SLACK_MIN_BYTES // MIB} MiB",
    )
    context = Term("cuda_context", "CUDA context", CUDA_CONTEXT_BYTES, "constant (lazy loading)")
    return Phase(name, (*kept, slack, context))


def _persistent_terms(arch: Architecture, s: Settings) -> list[Term]:
    n_lora = adapter_param_count(arch, s)
    ref = lora_param_count(arch, s.lora_r, s.lora_targets) * FP32 if s.reference_adapter else 0
    kept = "fp32" if s.upcast and s.quantized else "bf16"
    terms = [
        Term(
            "base_weights",
            f"base weights, {'NF4' if s.quantized else 'bf16'}",
            base_weight_bytes(arch, s),
            _weights_basis(s),
        ),
        Term(
            "embeddings",
            f"embed + lm_head, {kept}" if not arch.tie_word_embeddings else f"embeddings, {kept}",
            embedding_bytes(arch, s),
            f"vocab x hidden x {2 if kept == 'bf16' else 4} B, x2 untied",
        ),
        Term("norms", "norms, rotary", norm_bytes(arch, s), "hidden per norm"),
        Term(
            "lora", "LoRA weights", n_lora * s.lora_bytes, f"{n_lora:,} params x {s.lora_bytes} B"
        ),
        Term(
            "adam",
            "AdamW m + v",
            n_lora * s.lora_bytes * ADAM_STATES,
            f"{n_lora:,} x {s.lora_bytes * ADAM_STATES} B",
        ),
        Term("value_head", "value head", value_head_bytes(arch, s), "16 B/param"),
        Term("reference_adapter", "reference adapter", ref, "LoRA params x 4 B"),
        Term("dequant", "dequantize buffer", dequant_buffer_bytes(arch, s), "largest Linear"),
    ]
    for i, rm in enumerate(s.reward_models):
        label = f"reward model {rm.name}"[:24]
        terms.append(Term(f"reward_model_{i}", label, reward_model_bytes(rm), "4-bit, bf16"))
    return terms


def _weights_basis(s: Settings) -> str:
    if not s.quantized:
        return "2 B per parameter"
    if s.double_quant:
        return "NF4 + double quant: 0.5 + 1/64 + 4/16384 B per parameter"
    return "NF4: 0.5 + 4/64 B per parameter"


def _rollout_terms(arch: Architecture, s: Settings) -> list[Term]:
    """Generation of `rollout_batch` sequences: the KV cache at full length, the prefill's
    working set and mask, and per-step sampling buffers. The prefill peak and the full cache do
    not coexist; summing them over-counts by at most the smaller one."""
    f, p = s.rollout_batch, s.prompt_tokens
    kv = kv_cache_bytes_per_token(arch, s)
    per_vocab = SAMPLING_BYTES if s.top_p else SAMPLING_BYTES_NO_TOP_P
    # GRPO / RLOO: the batch is prompts x their group of answers, all generated at once.
    batch = f"{f} ({f // s.num_generations} prompts x {s.num_generations})" if s.critic_free else f
    return [
        Term(
            "kv_cache",
            "KV cache",
            kv * s.seq_tokens * f,
            f"{kv // 1024} KiB/token x (prompt + response) x {batch}",
        ),
        Term(
            "prefill",
            "prefill",
            forward_working_bytes(arch, s) * f * p,
            "one layer's working set x prompt tokens",
        ),
        Term("attention_mask", "attention mask", mask_bytes(f, p, p, s), "batch x prompt^2 x 1 B"),
        Term(
            "sampling",
            "sampling",
            f * arch.vocab_size * per_vocab,
            f"batch x vocab x {per_vocab} B",
        ),
    ]


def _scoring_terms(arch: Architecture, s: Settings) -> list[Term]:
    """No-grad forwards of `rollout_batch` whole sequences, then log-probs chunk by chunk.
    The reward model runs on its own (after the policy), so the larger working set counts."""
    # TRL scores per_device_train_batch_size sequences at a time, our PPO the rollout batch.
    f, seq = (s.micro_batch if s.critic_free else s.rollout_batch), s.seq_tokens
    forward = forward_working_bytes(arch, s) * f * seq
    for rm in s.reward_models:
        plain = Settings(upcast=False, lora_targets=(), attention=s.attention)
        forward = max(forward, forward_working_bytes(rm.architecture, plain) * rm.batch * seq)
    return [
        Term("forward", "forward (no grad)", forward, "working set x tokens"),
        Term("attention_mask", "attention mask", mask_bytes(f, seq, seq, s), "batch x seq^2 x 1 B"),
        _logits_term(arch, s, f * s.response_tokens, grad=False),
    ]


def _update_terms(arch: Architecture, s: Settings, step: Literal["loss", "backward"]) -> list[Term]:
    """One micro-batch of whole sequences with grad, at the loss or inside backward."""
    m, seq = s.micro_batch, s.seq_tokens
    tokens = m * seq
    n_lora = adapter_param_count(arch, s)
    # A critic adapter adds a forward and backward per micro-batch, run after the policy's
    # backward: one graph is alive at a time, so the activations are one graph's.
    terms = [
        Term("grads", "LoRA grads", n_lora * s.lora_bytes, f"{n_lora:,} params x {s.lora_bytes} B"),
        _saved_activations(arch, s, tokens),
        Term("final", "final hidden", final_bytes(arch, s) * tokens, "x tokens"),
        Term("attention_mask", "attention mask", mask_bytes(m, seq, seq, s), "batch x seq^2 x 1 B"),
    ]
    if step == "loss":
        return [*terms, _logits_term(arch, s, m * s.response_tokens, grad=True)]
    recompute = layer_activation_bytes(arch, s) * tokens if s.gradient_checkpointing else 0
    return [
        *terms,
        Term("recompute", "recomputed layer", recompute, "one layer's saved activations"),
        Term(
            "backward",
            "backward buffers",
            backward_working_bytes(arch, s) * tokens,
            "grads of one layer's tensors x tokens",
        ),
    ]


def _logits_term(arch: Architecture, s: Settings, response_tokens: int, grad: bool) -> Term:
    """Log-probs of `response_tokens` positions: our chunked log-softmax (a chunk of positions x
    the whole vocabulary), or TRL's fused head (a token x vocab tile) for GRPO / RLOO."""
    if s.critic_free:
        return Term(
            "logits",
            "logits tile (TRL)",
            fused_logits_bytes(arch, s, response_tokens, grad),
            f"{min(response_tokens, TRL_TOKEN_TILE)} tokens x {TRL_VOCAB_TILE} vocab x {s.act} B",
        )
    chunk = min(s.logits_chunk, response_tokens)
    per_vocab = logits_bytes_per_vocab(s, grad=grad)
    return Term(
        "logits",
        "logits chunk",
        chunk * arch.vocab_size * per_vocab,
        f"{chunk} tokens x vocab x {per_vocab} B",
    )


def _saved_activations(arch: Architecture, s: Settings, tokens: int) -> Term:
    layers = arch.num_hidden_layers
    if s.gradient_checkpointing:  # each layer keeps only its input (HF checkpointing)
        return Term(
            "activations",
            "saved: layer inputs",
            layers * s.act * arch.hidden_size * tokens,
            f"layers x hidden x {s.act} B x tokens",
        )
    per_layer = layer_activation_bytes(arch, s)
    return Term(
        "activations",
        "saved: all layers",
        layers * per_layer * tokens,
        f"layers x {per_layer:,} B x tokens",
    )
