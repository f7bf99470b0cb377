"""One base model serves every role: policy (LoRA on), value (a head on the same backbone, or on
the backbone run with a critic adapter of its own) and reference (LoRA off, or a frozen copy of a
starting adapter).

Log-probs are computed on the response slice only, a chunk of positions at a time: a full
batch x tokens x vocab fp32 tensor (128k vocab!) is never held.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swallowctl.core.config import SwallowConfig
from swallowctl.core.errors import MissingDependencyError, RuntimeFailure
from swallowctl.core.models import ResolvedModel

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

POLICY = "default"  # peft's adapter name for the trained policy
REFERENCE = "reference"  # frozen copy of `lora.init_adapter`, when training starts from one
CRITIC = "critic"  # the value's own adapter, with `lora.critic: adapter`
CRITIC_DIR = "critic"  # where checkpoints and final/ keep the critic adapter


@dataclass(frozen=True)
class Precision:
    """Where and how the base is loaded, decided once from the config and the machine."""

    device: str
    load_in_4bit: bool
    dtype: str  # weights that are not quantized: "bfloat16" | "float16" | "float32"
    compute_dtype: str  # 4-bit matmuls compute in this


def decide_precision(cfg: SwallowConfig, device: str) -> Precision:
    """`auto` settings: 4-bit NF4 + bf16 on CUDA (fp16 below sm80), fp32 on CPU."""
    import torch

    cuda = device.startswith("cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    auto_dtype = "bfloat16" if bf16 else "float16" if cuda else "float32"
    q = cfg.quantization
    four_bit = q.load_in_4bit is True or (q.load_in_4bit == "auto" and cuda)
    dtype = auto_dtype if cfg.model.dtype == "auto" else cfg.model.dtype
    compute = auto_dtype if q.compute_dtype == "auto" else q.compute_dtype
    return Precision(device=device, load_in_4bit=four_bit, dtype=dtype, compute_dtype=compute)


def load_tokenizer(resolved: ResolvedModel, cfg: SwallowConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, left-padding with a pad token that is never a stop token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolved.model_id,
        revision=resolved.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if resolved.pad_token_id is None or resolved.pad_token_id in resolved.stop_token_ids:
        raise RuntimeFailure(
            f"{resolved.name}: no pad token distinct from its stop tokens",
            hint="padding must not look like an end of answer; add a pad token to the tokenizer",
        )
    tok.pad_token_id = resolved.pad_token_id
    tok.padding_side = "left"  # generation continues from the right edge of every prompt
    return tok


def load_base(resolved: ResolvedModel, cfg: SwallowConfig, precision: Precision) -> Any:
    """The base causal LM, 4-bit NF4 (double quant) when asked, weights from safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "revision": resolved.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "use_safetensors": True,
        "dtype": getattr(torch, precision.dtype),
        "device_map": {"": precision.device},
    }
    if precision.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization.quant_type,
            bnb_4bit_use_double_quant=cfg.quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, precision.compute_dtype),
        )
    budget = cfg.model.max_memory_per_device_gib
    if budget and precision.device.startswith("cuda"):
        # Honoured, not ignored: loading fails loudly if the model does not fit the cap.
        index = torch.device(precision.device).index or 0
        kwargs["max_memory"] = {index: f"{budget}GiB"}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.model_id, **kwargs)
    except ImportError as e:
        raise MissingDependencyError("bitsandbytes", "train", "4-bit loading") from e
    model.config.use_cache = False  # training forwards; generation turns it on per call
    if precision.load_in_4bit and precision.device == "cpu":
        keep_4bit_differentiable(model)
    return model


def keep_4bit_differentiable(model: Any) -> None:
    """Keep bitsandbytes' CPU 4-bit Linears on their autograd path.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight at its first
    eval-mode, no-grad forward (our rollout) and from then on multiplies through `gemv_4bit`,
    which has no backward: the update's gradient through every frozen base Linear is silently
    dropped (only the residual stream carries any), so LoRA adapters below the top layer train
    on a wrong gradient. The packed kernel also computes in bf16 (errors ~1e-2 where fp32 was
    asked). Off, every forward dequantizes and backpropagates as on CUDA.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_adapters(base: Any, cfg: SwallowConfig, precision: Precision) -> PeftModel:
    """LoRA policy adapter (new, or the starting adapter) and, from one, a frozen reference."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if precision.load_in_4bit:
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=cfg.ppo.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.ppo.gradient_checkpointing:
        # Later transformers 5 releases renamed it; the old name warns there.
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable({"use_reentrant": False})
        base.enable_input_require_grads()
    lora = cfg.lora
    if lora.init_adapter:
        model = PeftModel.from_pretrained(base, lora.init_adapter, is_trainable=True)
        model.load_adapter(lora.init_adapter, adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter(POLICY)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    if lora.critic == "adapter":
        _add_critic(model, cfg)
    return model


def _add_critic(model: PeftModel, cfg: SwallowConfig) -> None:
    """A second trainable adapter for the value: the policy's LoRA settings unless configured."""
    import copy

    config: Any = copy.deepcopy(model.peft_config[POLICY])  # a LoraConfig
    config.r = cfg.lora.critic_r or config.r
    config.lora_alpha = cfg.lora.critic_alpha or config.lora_alpha
    config.inference_mode = False
    model.add_adapter(CRITIC, config)
    # peft leaves only the active adapter trainable: both are.
    for name, p in model.named_parameters():
        if f".{POLICY}." in name or f".{CRITIC}." in name:
            p.requires_grad_(True)


def build_policy_value(peft_model: PeftModel, hidden_size: int) -> Any:
    """The policy (adapter on) and a zero-initialised fp32 value head as one `nn.Module`.

    One module lets Accelerate's DDP wrapper see every trainable parameter. The class is defined
    inside the function so that importing this module does not import torch.
    """
    import torch

    class _PolicyValue(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.peft = peft_model
            # Zero init: every value starts at 0, so early advantages are the rewards themselves.
            self.value_head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            context_length: int,
            temperature: float,
            top_p: float,
            chunk_size: int,
            with_values: bool = True,
            with_logprobs: bool = True,
        ) -> tuple[Any, Any, Any]:
            return response_forward(
                self,
                input_ids,
                attention_mask,
                context_length,
                temperature,
                top_p,
                chunk_size,
                with_values,
                with_logprobs,
            )

    return _PolicyValue()


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_forward(
    module: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
    top_p: float,
    chunk_size: int,
    with_values: bool,
    with_logprobs: bool = True,
) -> tuple[Any, Any, Any]:
    """Log-probs, values and entropies of the response tokens (positions >= context_length).

    Returns ([B, R] log-probs, [B, R] values, [B, R] entropies), float32; None for what was not
    asked (a critic adapter's pass needs only values, the policy's pass then no values).
    """

    backbone = module.peft.get_base_model()
    hidden = backbone.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_of(attention_mask),
        use_cache=False,
    ).last_hidden_state
    # The state before token t predicts token t: positions context-1 .. end-1.
    h = hidden[:, context_length - 1 : -1]
    targets = input_ids[:, context_length:]
    logprobs, entropy = (
        chunked_logprobs(backbone.lm_head, h, targets, temperature, top_p, chunk_size)
        if with_logprobs
        else (None, None)
    )
    values = module.value_head(h.float()).squeeze(-1) if with_values else None
    return logprobs, values, entropy


def chunked_logprobs(
    lm_head: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    top_p: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the LM head and log-softmax a few positions at a time.

    With grad enabled each chunk is checkpointed: its vocab-sized logits are recomputed in the
    backward pass instead of being kept, so memory holds one chunk of logits, not all of them.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from swallowctl.ppo.algo import entropy_of, logprobs_of

    def one(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = lm_head(h)
        if top_p < 1.0:
            logits = top_p_filter(logits / temperature, top_p, keep=t)
            return logprobs_of(logits, t, 1.0), entropy_of(logits, 1.0)
        return logprobs_of(logits, t, temperature), entropy_of(logits, temperature)

    # Chunk along positions; a chunk covers every row of the micro-batch.
    per_chunk = max(1, chunk_size // max(1, hidden.shape[0]))
    lps, ents = [], []
    for start in range(0, hidden.shape[1], per_chunk):
        h, t = hidden[:, start : start + per_chunk], targets[:, start : start + per_chunk]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(one, h, t, use_reentrant=False)
        else:
            lp, ent = one(h, t)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps, dim=1), torch.cat(ents, dim=1)


def top_p_filter(logits: torch.Tensor, top_p: float, keep: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside the nucleus as transformers' TopPLogitsWarper does, never `keep`.

    Keeps the smallest set of most likely tokens whose probability sums to >= top_p. The sampled
    token (`keep`, [B, T]) was inside the nucleus when it was drawn; a full forward can put it
    just outside (KV-cache vs full-sequence rounding), and excluding it then would give it a
    log-prob of -inf and an infinite ratio one step later. So it always stays in.
    """
    import torch

    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    remove.scatter_(-1, keep.unsqueeze(-1), False)
    # The dtype's lowest finite value, not -inf: probability 0 all the same, but the entropy's
    # p * logit stays 0 instead of 0 * -inf = NaN.
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


@contextlib.contextmanager
def _trainable_flags_kept(peft_model: PeftModel) -> Iterator[None]:
    """peft's set_adapter (also called when disable_adapter ends) leaves only the active adapter
    trainable; with a critic adapter both are. Put the flags back as they were."""
    flags = [(p, p.requires_grad) for n, p in peft_model.named_parameters() if ".lora_" in n]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def adapter_mode(peft_model: PeftModel, name: str) -> Iterator[None]:
    """Passes inside this block run with adapter `name` (then the policy's again).

    With gradient checkpointing the backward pass recomputes the forward, so a backward must run
    inside the same block as its forward.
    """
    with _trainable_flags_kept(peft_model):
        peft_model.set_adapter(name)
        try:
            yield
        finally:
            peft_model.set_adapter(POLICY)


@contextlib.contextmanager
def reference_mode(peft_model: PeftModel) -> Iterator[None]:
    """Forward passes inside this block are the reference model's.

    Without a starting adapter the reference is the base with adapters disabled: no second copy.
    """
    if REFERENCE in peft_model.peft_config:
        with adapter_mode(peft_model, REFERENCE):
            yield
    else:
        with _trainable_flags_kept(peft_model), peft_model.disable_adapter():
            yield


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(peft_model: PeftModel, directory: Path, name: str = POLICY) -> None:
    """Write an adapter (the policy's by default) in PEFT's format, from its LoRA parameters alone.

    peft's own save_pretrained walks the whole state_dict; on the CPU backend bitsandbytes then
    repacks every 4-bit weight and round-trips its absmax, so the base the reference uses would
    drift a little at every checkpoint. Reading only the adapter's parameters avoids that.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    params = {n: p for n, p in peft_model.named_parameters() if f".{name}." in n}
    state = get_peft_model_state_dict(
        peft_model, state_dict=params, adapter_name=name, save_embedding_layers=False
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    directory.mkdir(exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config[name].save_pretrained(str(directory))


def load_adapter_weights(peft_model: PeftModel, directory: Path, name: str, device: str) -> None:
    """Put back the weights `save_adapter` wrote, into the adapter `name`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(directory / ADAPTER_WEIGHTS, device=device)
    set_peft_model_state_dict(peft_model, weights, adapter_name=name)
