"""The tuner: the fastest batch settings whose estimated peak fits the GPU, or what to give up.

Search space (DESIGN.md "Memory model"; the seed's rule: halve per_device_train_batch_size,
double grad_accum_steps, so their product, the effective batch, stays what the user asked):
- micro-batch: the user's per_device_train_batch_size, then smaller powers of two dividing the
  effective batch; grad_accum_steps = effective batch / micro-batch;
- rollout batch (local_rollout_forward_batch_size): the user's (default: the micro-batch), then
  halved; it is its own knob because rollout memory does not shrink with grad accumulation;
- gradient checkpointing: off only if the estimate fits with GC_OFF_MARGIN to spare;
- logits_chunk_size: the user's, then halved down to MIN_LOGITS_CHUNK.
Candidates are tried fastest first (micro-batch, then rollout batch, then checkpointing off, then
chunk size, each largest first) and the first that fits wins. More memory can only let an earlier
candidate fit, so the suggested micro-batch never shrinks as the budget grows.

GRPO / RLOO (TRL) generate a whole update at once: their rollout batch is the samples per update
(prompts x num_generations) whatever the micro-batch, so it is not a knob there, nor is the
logits chunk (TRL's fused LM head has none); when nothing fits, fewer samples per update come
first in what to give up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from swallowctl.core.config import SwallowConfig
from swallowctl.core.errors import SwallowError, UsageError
from swallowctl.core.models import Architecture, ResolvedModel, resolve
from swallowctl.memory.phases import Estimate, estimate
from swallowctl.memory.terms import BF16, FP32, GIB, REWARD_BATCH, RewardModel, Settings

log = logging.getLogger(__name__)

GC_OFF_MARGIN = 0.10  # checkpointing off costs a layer's activations per layer: keep 10% spare
DETECTED_MARGIN = 0.05  # of a detected GPU's total: other processes and the driver move a bit
MIN_LOGITS_CHUNK = 64

# The config keys the tuner writes, in the order they are shown.
KNOB_KEYS = (
    "ppo.per_device_train_batch_size",
    "ppo.grad_accum_steps",
    "ppo.local_rollout_forward_batch_size",
    "ppo.gradient_checkpointing",
    "ppo.logits_chunk_size",
)


@dataclass(frozen=True)
class Budget:
    """Bytes the estimate must fit in, and where the number came from."""

    bytes: int
    source: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class Advice:
    """One thing to give up: set `key` to `value` (from `current`) and the run fits."""

    key: str
    current: Any
    value: Any
    text: str


@dataclass(frozen=True)
class TuneResult:
    """What tune-memory found. `suggested` is None when nothing fits; `minimal` is then the
    smallest configuration tried, and `advice` says what to give up."""

    model: str
    architecture: Architecture
    budget: Budget
    current: Settings
    current_estimate: Estimate
    suggested: Settings | None
    suggested_estimate: Estimate | None
    minimal_estimate: Estimate
    changes: dict[str, Any]
    advice: tuple[Advice, ...]
    not_counted: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.suggested is not None

    @property
    def set_line(self) -> str:
        """The suggestion as `--set` options to paste."""
        return " ".join(f"--set {k}={_yaml_scalar(v)}" for k, v in self.changes.items())


# ---- budget -------------------------------------------------------------------------------


def resolve_budget(
    vram_gib: float | None,
    config_gib: float | None,
    detect: Callable[[], list[tuple[str, int, int]]] | None = None,
) -> Budget:
    """--vram, else model.max_memory_per_device_gib, else the free memory of this machine's
    smallest GPU minus DETECTED_MARGIN of its total.

    `detect` returns (name, free, total) per GPU (tests inject one); by default torch is asked.
    Raises UsageError when there is no number to use: no GPU here and no --vram.
    """
    if vram_gib is not None:
        if vram_gib <= 0:
            raise UsageError(f"--vram {vram_gib:g}: must be a positive number of GiB")
        return Budget(round(vram_gib * GIB), f"--vram {vram_gib:g} GiB")
    if config_gib is not None:
        return Budget(round(config_gib * GIB), f"model.max_memory_per_device_gib: {config_gib:g}")
    gpus = (detect or _detect_gpus)()
    if not gpus:
        raise UsageError(
            "no CUDA GPU found here to size against",
            hint="pass --vram GiB (the memory of the GPU you will train on), e.g. --vram 24, "
            "or set model.max_memory_per_device_gib in the config",
        )
    name, free, total = min(gpus, key=lambda g: g[1])
    usable = free - round(total * DETECTED_MARGIN)
    return Budget(
        usable,
        f"detected {name}: {free / GIB:.1f} GiB free of {total / GIB:.1f}, "
        f"minus {DETECTED_MARGIN:.0%} margin",
    )


def _detect_gpus() -> list[tuple[str, int, int]]:
    from swallowctl.core.env import probe

    torch_info = probe(with_torch=True).torch
    return [
        (g.name or f"GPU {g.index}", g.free_bytes, g.total_bytes)
        for g in torch_info.gpus
        if g.free_bytes is not None and g.total_bytes is not None
    ]


# ---- from the config ----------------------------------------------------------------------


def settings_from_config(
    cfg: SwallowConfig, reward_models: tuple[RewardModel, ...] = ()
) -> Settings:
    """The estimator's view of a config (tune-memory sizes a CUDA run: load_in_4bit 'auto' is
    on there)."""
    p, lora = cfg.ppo, cfg.lora
    targets = lora.target_modules
    critic_free = p.algorithm != "ppo"
    quantized = cfg.quantization.load_in_4bit is not False
    # TRL generates the local generation batch (every answer of its prompts) in one call.
    generation_batch = p.per_device_train_batch_size * p.grad_accum_steps * p.num_mini_batches
    return Settings(
        micro_batch=p.per_device_train_batch_size,
        grad_accum=p.grad_accum_steps,
        rollout_batch=generation_batch
        if critic_free
        else p.local_rollout_forward_batch_size or p.per_device_train_batch_size,
        prompt_tokens=cfg.data.max_prompt_tokens,
        response_tokens=cfg.generation.max_new_tokens,
        lora_r=lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=lora.dropout > 0,
        critic_adapter=lora.critic == "adapter",
        critic_r=lora.critic_r or 0,
        # TRL copies a starting adapter as the reference only when the KL term is on.
        reference_adapter=lora.init_adapter is not None and not (critic_free and p.kl_coef == 0),
        value_head=not critic_free,
        gradient_checkpointing=p.gradient_checkpointing,
        logits_chunk=p.logits_chunk_size,
        quantized=cfg.quantization.load_in_4bit is not False,
        double_quant=cfg.quantization.double_quant,
        top_p=cfg.generation.top_p < 1,
        reward_models=reward_models,
        algorithm=p.algorithm,
        num_generations=p.num_generations if critic_free else 1,
        # TRL casts a QLoRA adapter to bf16 (its GRPOTrainer / RLOOTrainer __init__).
        lora_bytes=BF16 if critic_free and quantized else FP32,
    )


def resolve_reward_models(cfg: SwallowConfig) -> tuple[tuple[RewardModel, ...], tuple[str, ...]]:
    """The config's reward models whose config.json is at hand offline (registry, local folder,
    Hugging Face cache), and a line for each that is not (it is then not counted)."""
    found: list[RewardModel] = []
    missing: list[str] = []
    for spec in cfg.rewards:
        if not spec.model:
            continue
        try:
            arch = resolve(spec.model, local_files_only=True).architecture
        except SwallowError as e:
            missing.append(f"reward model {spec.model}: not counted ({e.message})")
            continue
        batch = spec.kwargs.get("batch_size", REWARD_BATCH)
        found.append(RewardModel(arch, int(batch), spec.model))
    return tuple(found), tuple(missing)


def tune_config(
    cfg: SwallowConfig,
    *,
    model: str | None = None,
    vram_gib: float | None = None,
    detect: Callable[[], list[tuple[str, int, int]]] | None = None,
) -> TuneResult:
    """Size `cfg` (its model, or `model`) for the budget; see the module docstring."""
    budget = resolve_budget(vram_gib, cfg.model.max_memory_per_device_gib, detect)
    resolved: ResolvedModel = resolve(
        model or cfg.model.name_or_path, None if model else cfg.model.revision
    )
    rewards, not_counted = resolve_reward_models(cfg)
    user_rollout = cfg.ppo.local_rollout_forward_batch_size
    return tune(
        resolved.architecture,
        settings_from_config(cfg, rewards),
        budget,
        model=resolved.name,
        rollout_set=user_rollout is not None,
        not_counted=not_counted,
    )


# ---- the search ---------------------------------------------------------------------------


def tune(
    arch: Architecture,
    current: Settings,
    budget: Budget,
    *,
    model: str = "",
    rollout_set: bool = True,
    not_counted: tuple[str, ...] = (),
) -> TuneResult:
    """Search the fastest fitting settings; when none fits, compute what to give up.

    `rollout_set`: the user set local_rollout_forward_batch_size (else it follows the
    micro-batch, and is only written when the suggestion differs from that default).
    """
    found = next((s for s in candidates(current, rollout_set) if _fits(arch, s, budget)), None)
    minimal = _minimal(current)
    return TuneResult(
        model=model,
        architecture=arch,
        budget=budget,
        current=current,
        current_estimate=estimate(arch, current),
        suggested=found,
        suggested_estimate=estimate(arch, found) if found else None,
        minimal_estimate=estimate(arch, minimal),
        changes=changes(current, found, rollout_set) if found else {},
        advice=() if found else tuple(give_up(arch, minimal, budget)),
        not_counted=not_counted,
    )


def _fits(arch: Architecture, s: Settings, budget: Budget) -> bool:
    limit = budget.bytes if s.gradient_checkpointing else budget.bytes * (1 - GC_OFF_MARGIN)
    return estimate(arch, s).peak_bytes <= limit


def micro_batches(per_device: int, grad_accum: int) -> list[int]:
    """The user's micro-batch, then the powers of two below it that divide the effective batch."""
    effective = per_device * grad_accum
    smaller = [2**k for k in range(per_device.bit_length()) if 2**k < per_device]
    return [per_device] + [m for m in reversed(smaller) if effective % m == 0]


def _halvings(start: int, floor: int = 1) -> list[int]:
    """start, then the powers of two below it down to `floor` (start itself kept as given)."""
    below = [2**k for k in range(start.bit_length()) if floor <= 2**k < start]
    return [start, *reversed(below)]


def candidates(current: Settings, rollout_set: bool = True) -> Iterator[Settings]:
    """Every setting the tuner may suggest, fastest first."""
    effective = current.micro_batch * current.grad_accum
    for m in micro_batches(current.micro_batch, current.grad_accum):
        rollout_start = current.rollout_batch if rollout_set else m
        # GRPO / RLOO: the rollout is the whole generation batch, fixed by the samples per update.
        rollouts = [current.rollout_batch] if current.critic_free else _halvings(rollout_start)
        # ... and TRL's fused LM head has no logits chunk to set.
        chunks = (
            [current.logits_chunk]
            if current.critic_free
            else _halvings(current.logits_chunk, MIN_LOGITS_CHUNK)
        )
        for f in rollouts:
            for gc in (False, True):
                for chunk in chunks:
                    yield current.but(
                        micro_batch=m,
                        grad_accum=effective // m,
                        rollout_batch=f,
                        gradient_checkpointing=gc,
                        logits_chunk=chunk,
                    )


def _minimal(current: Settings) -> Settings:
    """The least memory the knobs allow: the last candidate."""
    *_, last = candidates(current)
    return last


def changes(current: Settings, new: Settings, rollout_set: bool) -> dict[str, Any]:
    """Config keys whose value the suggestion changes (the rollout batch only when it is not
    the default, the micro-batch)."""
    out: dict[str, Any] = {}
    pairs = {
        "ppo.per_device_train_batch_size": (current.micro_batch, new.micro_batch),
        "ppo.grad_accum_steps": (current.grad_accum, new.grad_accum),
        "ppo.gradient_checkpointing": (
            current.gradient_checkpointing,
            new.gradient_checkpointing,
        ),
        "ppo.logits_chunk_size": (current.logits_chunk, new.logits_chunk),
    }
    for key, (old, value) in pairs.items():
        if old != value:
            out[key] = value
    # Unset, the rollout batch follows the micro-batch: write it only where it differs.
    rollout_now = current.rollout_batch if rollout_set else new.micro_batch
    if new.rollout_batch != rollout_now and not new.critic_free:
        out["ppo.local_rollout_forward_batch_size"] = new.rollout_batch
    return {k: out[k] for k in KNOB_KEYS if k in out}


# ---- when nothing fits --------------------------------------------------------------------


def give_up(arch: Architecture, minimal: Settings, budget: Budget) -> list[Advice]:
    """For each length or size the user can lower, the largest value at which the minimal
    configuration fits; when no single one suffices, prompt and response shortened together;
    when not even that does, how much memory the model needs at all. GRPO / RLOO first: fewer
    samples per update (their rollout holds every answer of the update at once)."""
    advice: list[Advice] = [a for a in [_fewer_samples(arch, minimal, budget)] if a is not None]
    for key, field_, label in (
        ("generation.max_new_tokens", "response_tokens", "shorter answers"),
        ("data.max_prompt_tokens", "prompt_tokens", "shorter prompts"),
        ("lora.r", "lora_r", "a smaller adapter"),
    ):
        current = getattr(minimal, field_)
        value = _largest_fitting(_varying(minimal, field_), current, arch, budget)
        if value is not None:
            advice.append(Advice(key, current, value, f"{label}: {key}={value} (now {current})"))
    if not advice:
        advice.extend(_shorten_both(arch, minimal, budget))
    return advice


def _fewer_samples(arch: Architecture, minimal: Settings, budget: Budget) -> Advice | None:
    """GRPO / RLOO: the most samples per update (grad_accum_steps at micro-batch 1) that fit,
    keeping whole groups of num_generations answers."""
    if not minimal.critic_free:
        return None
    mini_batches = minimal.rollout_batch // (minimal.micro_batch * minimal.grad_accum)
    for k in range(minimal.grad_accum - 1, 0, -1):
        samples = k * mini_batches
        if samples % minimal.num_generations == 0 and _fits(
            arch, minimal.but(grad_accum=k, rollout_batch=samples), budget
        ):
            return Advice(
                "ppo.grad_accum_steps",
                minimal.grad_accum,
                k,
                f"fewer samples per update: ppo.per_device_train_batch_size=1 and "
                f"ppo.grad_accum_steps={k} ({samples} answers per update, now "
                f"{minimal.rollout_batch})",
            )
    return None


def _varying(base: Settings, name: str) -> Callable[[int], Settings]:
    return lambda value: base.but(**{name: value})


def _largest_fitting(
    make: Callable[[int], Settings], current: int, arch: Architecture, budget: Budget
) -> int | None:
    """Binary search of the largest v in [1, current) whose settings fit (the estimate grows
    with each of these values)."""
    if current <= 1 or not _fits(arch, make(1), budget):
        return None
    lo, hi = 1, current - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(arch, make(mid), budget):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shorten_both(arch: Architecture, minimal: Settings, budget: Budget) -> list[Advice]:
    p, r = minimal.prompt_tokens, minimal.response_tokens
    steps = 1000  # shares of the current lengths, in 0.1% steps

    def at(k: int) -> Settings:
        return minimal.but(
            prompt_tokens=max(1, p * k // steps), response_tokens=max(1, r * k // steps)
        )

    k = _largest_fitting(at, steps, arch, budget)
    if k is not None:
        s = at(k)
        return [
            Advice(
                "data.max_prompt_tokens + generation.max_new_tokens",
                (p, r),
                (s.prompt_tokens, s.response_tokens),
                f"shorter prompts and answers together: data.max_prompt_tokens="
                f"{s.prompt_tokens} and generation.max_new_tokens={s.response_tokens}",
            )
        ]
    need = math.ceil(estimate(arch, at(1)).peak_bytes / GIB * 10) / 10  # GiB, rounded up
    return [
        Advice(
            "vram",
            round(budget.gib, 1),
            need,
            f"this model needs at least {need:.1f} GiB even with the shortest sequences: "
            "a GPU with more memory, or a smaller model (--model)",
        )
    ]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
