"""The config file: schema, loader, `--set` overrides and our users' `ppo:` dialect.

One YAML file drives train, tune-memory and infer. Resolution order: `--set` > file > defaults.
Every error names `FILE:LINE: key.path` and what to do. Sections swallowctl does not own
(`env`, `scorer`, `llm`, ...) are kept as they are and handed to the user's code.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swallowctl.core.errors import ConfigError, UsageError
from swallowctl.core.modes import BUILTIN_MODES, ModeSpec
from swallowctl.core.yamlpos import KeyPath, dotted, load_yaml_with_lines

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.5"

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
PositiveInt = int  # bounds are given per field with Field(gt=0) so errors name the limit


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Which model, and how it is loaded. Shared by every command."""

    name_or_path: str = Field(
        DEFAULT_MODEL, description="alias (swallow-8b), hub id, local dir or builtin:tiny-ja"
    )
    revision: str | None = Field(None, description="branch, tag or commit on the Hub")
    trust_remote_code: bool = Field(False, description="run code from the model repo (off: safer)")
    dtype: Dtype = Field(
        "auto", description="weights not quantized: auto = bf16 on GPU, fp32 on CPU"
    )
    max_memory_per_device_gib: float | None = Field(
        None, gt=0, description="cap per GPU (GiB) for loading, and tune-memory's budget"
    )


class QuantizationSection(_Section):
    """bitsandbytes 4-bit (QLoRA) settings for the shared base."""

    load_in_4bit: bool | Literal["auto"] = Field(
        "auto", description="auto = on when CUDA is present"
    )
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    compute_dtype: Dtype = Field(
        "auto", description="auto = bf16 on sm80+, fp16 below, fp32 on CPU"
    )


class LoraSection(_Section):
    """The policy's LoRA adapter."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(
        0.0, ge=0, lt=1, description="0 for PPO: dropout makes the first ratio differ from 1"
    )
    target_modules: str | list[str] = Field("all-linear", description="peft target_modules")
    init_adapter: str | None = Field(
        None, description="start from this (SFT) adapter; a frozen copy of it is the reference"
    )
    critic: Literal["shared", "adapter"] = Field(
        "shared", description="value head on the policy's backbone, or its own LoRA adapter"
    )
    critic_r: int | None = Field(None, gt=0, description="critic adapter's rank (default: r)")
    critic_alpha: int | None = Field(
        None, gt=0, description="critic adapter's alpha (default: alpha)"
    )


class GenerationSection(_Section):
    """Sampling: used for rollouts in train and by infer (seed defaults: 0.7 / 0.9 / 512)."""

    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    typical_p: float = Field(1.0, gt=0, le=1, description="1 = off")
    min_p: float = Field(0.0, ge=0, lt=1, description="0 = off")
    max_new_tokens: int = Field(512, gt=0)


class DataSection(_Section):
    """Where training prompts come from and how they are laid out."""

    prompts: str = Field(
        "builtin:prompts-ja", description="JSONL file, Hub dataset id, or builtin:prompts-ja"
    )
    mode: str = Field("chat", description="a built-in mode (chat, intervention) or one of modes:")
    max_prompt_tokens: int = Field(
        512,
        gt=0,
        description="longer prompts lose their oldest turns first; the system prompt stays",
    )
    shuffle: bool = True
    eval_prompts: str | None = Field(None, description="prompts for deterministic evaluation")


class RewardSpec(_Section):
    """One reward component: exactly one of function, model or url."""

    function: str | None = Field(None, description="built-in name or package.module:function")
    model: str | None = Field(None, description="sequence-classification reward model")
    url: str | None = Field(None, description="HTTP endpoint receiving POST JSON")
    weight: float = 1.0
    name: str | None = Field(None, description="label in logs; defaults to the function/model")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments")
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> RewardSpec:
        given = [k for k in ("function", "model", "url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "a reward needs exactly one of function, model or url"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.function or self.model or self.url or "reward"


class EnvironmentSection(_Section):
    """User environment code (reset / observe / step) instead of a prompt file."""

    entrypoint: str = Field(..., description="package.module:Class of the user's environment")
    settings: dict[str, Any] = Field(default_factory=dict, description="passed to the class")
    num_envs: int | None = Field(None, gt=0, description="default: one per rollout sample")
    concurrency: int = Field(8, gt=0, description="environment steps in flight at once")
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(2, ge=0)


Algorithm = Literal["ppo", "grpo", "rloo"]
CRITIC_FREE: tuple[Algorithm, ...] = ("grpo", "rloo")


class PPOSection(_Section):
    """The training run. Key names are our users' dialect (TRL PPO + their own controllers)."""

    algorithm: Algorithm = Field(
        "ppo",
        description="ppo (ours, with a value head), or grpo / rloo (TRL's, critic-free)",
    )
    seed: int = 42
    # Optimiser and schedule (computed from the real number of updates).
    lr: float = Field(1e-5, gt=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine", "polynomial"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a share of lr")
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Batches: samples per update = per_device x grad_accum x num_mini_batches x processes.
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    grad_accum_steps: int = Field(2, gt=0)
    num_mini_batches: int = Field(1, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    local_rollout_forward_batch_size: int | None = Field(
        None, gt=0, description="sequences per forward pass in rollout; default the micro-batch"
    )
    total_updates: int | None = Field(None, gt=0, description="PPO updates (default 100)")
    total_episodes: int | None = Field(None, gt=0, description="or: samples in all (TRL's name)")
    gradient_checkpointing: bool = True
    logits_chunk_size: int = Field(
        256, gt=0, description="tokens per log-prob chunk (x 128k vocab x 4 B each for Llama)"
    )
    # PPO objective (TRL 1.12's formulas).
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: float | None = Field(None, gt=0, description="set: adaptive KL coefficient")
    min_kl_coef: float = Field(0.001, ge=0)
    max_kl_coef: float = Field(1.0, gt=0)
    kl_adjust_up: float = Field(1.5, ge=1, description="kl_coef *= this when KL > 1.5 x target")
    kl_adjust_down: float = Field(0.85, gt=0, le=1, description="*= this when KL < target / 1.5")
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(None, description="subtracted from truncated answers")
    # Entropy bonus, optionally steered toward a target entropy.
    entropy_coef: float = Field(0.0, ge=0)
    entropy_auto_adjust: bool = False
    entropy_target: float | None = Field(None, gt=0)
    entropy_adjust_beta: float = Field(0.1, gt=0, description="coef *= exp(beta (target - H))")
    entropy_coef_initial: float | None = Field(None, ge=0, description="default entropy_coef")
    entropy_coef_min: float = Field(0.0, ge=0)
    entropy_coef_max: float = Field(1.0, ge=0)
    max_entropy_bonus: float | None = Field(None, gt=0, description="clip on coef x entropy")
    entropy_coef_phase1: float | None = Field(None, ge=0)
    entropy_coef_phase2: float | None = Field(None, ge=0)
    entropy_coef_phase3: float | None = Field(None, ge=0)
    entropy_transition_updates: list[float] | None = Field(
        None, description="phase boundaries as shares of total updates, e.g. [0.1, 0.3]"
    )
    entropy_floor: float | None = Field(None, ge=0, description="stop when entropy stays below")
    entropy_patience: int = Field(10, gt=0)
    entropy_monitor_warmup: int = Field(0, ge=0)
    # Deterministic (greedy) evaluation during training.
    enable_deterministic_eval: bool = False
    deterministic_eval_frequency: int = Field(10, gt=0)
    # grpo / rloo only (TRL's GRPOTrainer / RLOOTrainer). The shared keys above map onto them:
    # lr, schedule, batches, ppo_epochs (GRPO's mu), total_updates, kl_coef (beta), cliprange.
    num_generations: int = Field(
        4, gt=0, description="grpo/rloo: answers per prompt, the group compared; divides the batch"
    )
    cliprange_high: float | None = Field(
        None, gt=0, description="grpo/rloo: upper clip (DAPO: 0.28); null = cliprange"
    )
    mask_truncated_completions: bool = Field(
        False, description="grpo/rloo: answers cut at max_new_tokens add no loss"
    )
    grpo_loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="grpo: how token losses are averaged (TRL's loss_type)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide advantages by the reward std of the group/batch"
    )
    normalize_advantages: bool = Field(False, description="rloo: whiten advantages over the batch")
    trl_args: dict[str, Any] = Field(
        default_factory=dict, description="grpo/rloo: more GRPOConfig/RLOOConfig fields"
    )


class OutputSection(_Section):
    dir: str = Field("runs/ppo", description="run directory (metrics, samples, checkpoints)")
    save_steps: int = Field(10, gt=0, description="updates between checkpoints")
    save_total_limit: int | None = Field(3, gt=0, description="checkpoints kept; null = all")
    best_metric: str = Field(
        "eval/score", description="best/ keeps the adapter where this metric was highest"
    )


Reporter = Literal["tensorboard", "wandb"]


class LoggingSection(_Section):
    steps: int = Field(1, gt=0, description="updates between metric lines")
    report_to: list[Reporter] = Field(
        default_factory=lambda: list[Reporter](["tensorboard"]), description="besides metrics.jsonl"
    )
    num_samples: int = Field(4, ge=0, description="samples written to samples.jsonl per log")


class SwallowConfig(BaseModel):
    """The whole config. Unknown top-level sections are kept for the user's own code."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    data: DataSection = Field(default_factory=DataSection)
    modes: dict[str, ModeSpec] = Field(default_factory=dict)
    rewards: list[RewardSpec] = Field(default_factory=list)
    environment: EnvironmentSection | None = None
    ppo: PPOSection = Field(default_factory=PPOSection)
    output: OutputSection = Field(default_factory=OutputSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @property
    def user_sections(self) -> dict[str, Any]:
        """Sections swallowctl does not own (`env`, `scorer`, `llm`, ...), for the user's code."""
        return dict(self.model_extra or {})

    def mode(self, name: str | None = None) -> ModeSpec:
        """The named mode (default `data.mode`): user-defined first, then built-in."""
        name = name or self.data.mode
        return {**BUILTIN_MODES, **self.modes}[name]

    def sizes(self, num_processes: int = 1) -> BatchSizes:
        return BatchSizes.of(self.ppo, num_processes)


@dataclass(frozen=True)
class BatchSizes:
    """Every batch number of a run, stated once (our users could not say what theirs was)."""

    micro_batch: int  # sequences per forward/backward on one device
    mini_batch: int  # samples per optimizer step, all processes
    samples_per_update: int  # rollout batch, all processes
    optimizer_steps_per_update: int
    total_updates: int
    total_samples: int

    @classmethod
    def of(cls, ppo: PPOSection, num_processes: int = 1) -> BatchSizes:
        mini = ppo.per_device_train_batch_size * ppo.grad_accum_steps * num_processes
        per_update = mini * ppo.num_mini_batches
        if ppo.total_updates is not None:
            updates = ppo.total_updates
        elif ppo.total_episodes is not None:
            updates = math.ceil(ppo.total_episodes / per_update)
        else:
            updates = DEFAULT_TOTAL_UPDATES
        return cls(
            micro_batch=ppo.per_device_train_batch_size,
            mini_batch=mini,
            samples_per_update=per_update,
            optimizer_steps_per_update=ppo.num_mini_batches * ppo.ppo_epochs,
            total_updates=updates,
            total_samples=updates * per_update,
        )


DEFAULT_TOTAL_UPDATES = 100

# --- our users' dialect -------------------------------------------------------------------------

# Keys of the origin project's `ppo:` section that live in another section here. Same meaning.
RELOCATED: dict[str, tuple[str, str]] = {
    "model_name_or_path": ("model", "name_or_path"),
    "revision": ("model", "revision"),
    "max_memory_per_device_gib": ("model", "max_memory_per_device_gib"),
    "lora_rank": ("lora", "r"),
    "temperature": ("generation", "temperature"),
    "top_p": ("generation", "top_p"),
    "max_new_tokens": ("generation", "max_new_tokens"),
    "decode_typical_p": ("generation", "typical_p"),
    "decode_min_p": ("generation", "min_p"),
    "output_dir": ("output", "dir"),
}

# Keys the origin needed to work around TRL, accepted with a warning that says why they are moot.
NO_LONGER_NEEDED: dict[str, str] = {
    "ref_device": "the reference model is the base with the adapter turned off: no second copy, "
    "no GPU of its own",
    "device_map_strategy": "the 4-bit base fits one GPU; several GPUs run data-parallel "
    "(--num-processes), not a device map",
    "cuda_visible_devices": "set CUDA_VISIBLE_DEVICES in the environment or use --num-processes",
    "kl_lr_adjust_up": "learning-rate nudges fought the scheduler; lr follows lr_scheduler_type",
    "kl_lr_adjust_down": "learning-rate nudges fought the scheduler; lr follows lr_scheduler_type",
    "prompt_feed_debug": "every prompt and completion is in samples.jsonl; --verbose logs more",
}

# Names from TRL / transformers that people type out of habit.
SYNONYMS: dict[str, str] = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_ppo_epochs": "ppo_epochs",
    "cliprange_value": "cliprange_value",
    "kl_penalty": "kl_estimator",
    "lora_r": "lora.r",
    "model": "model.name_or_path",
    "response_length": "max_new_tokens",
    "lora_alpha": "lora.alpha",
}


@dataclass
class LoadedConfig:
    """A validated config, where it came from, and the warnings loading it produced."""

    config: SwallowConfig
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)


class _Where:
    """Maps a key path to `FILE:LINE` (or `--set`) for messages."""

    def __init__(self, path: Path | None, lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.lines = lines
        self.from_set: set[KeyPath] = set()
        self.display: dict[KeyPath, KeyPath] = {}  # relocated path -> what the user wrote

    def __call__(self, key: KeyPath) -> str:
        for n in range(len(key), -1, -1):
            if key[:n] in self.from_set:
                return "--set"
            if key[:n] in self.lines and self.path is not None:
                return f"{self.path}:{self.lines[key[:n]]}"
        return str(self.path) if self.path else "config"

    def line(self, key: KeyPath) -> int:
        for n in range(len(key), -1, -1):
            if key[:n] in self.lines:
                return self.lines[key[:n]]
        return 0

    def name(self, key: KeyPath) -> str:
        for n in range(len(key), 0, -1):
            if key[:n] in self.display:
                return dotted(self.display[key[:n]] + key[n:])
        return dotted(key)

    def move(self, old: KeyPath, new: KeyPath) -> None:
        if old in self.lines:
            self.lines[new] = self.lines[old]
        self.display[new] = old


_EXP_NUMBER = re.compile(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+")


def parse_override(item: str) -> tuple[KeyPath, Any]:
    """`ppo.lr=1e-5` -> (("ppo", "lr"), 1e-05); the value is read as YAML (numbers, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {item!r}: expected KEY.PATH=VALUE", hint="e.g. --set ppo.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # PyYAML reads 1e-5 as a string (YAML 1.1 wants a dot); people mean the number.
    if isinstance(value, str) and _EXP_NUMBER.fullmatch(value.strip()):
        value = float(value)
    path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    return path, value


def _set_in(tree: dict[str, Any], path: KeyPath, value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list) and isinstance(part, int):
            while len(node) <= part:
                node.append({})
            node = node[part]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list) and isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _relocate(raw: dict[str, Any], where: _Where, warnings: list[str]) -> None:
    """Move the origin's `ppo:` keys to their sections here; drop moot ones with a warning."""
    ppo = raw.get("ppo")
    if not isinstance(ppo, dict):
        return
    for key in list(ppo):
        if key in NO_LONGER_NEEDED:
            warnings.append(
                f"{where(('ppo', key))}: ppo.{key} is no longer needed: {NO_LONGER_NEEDED[key]}"
            )
            del ppo[key]
        elif key in RELOCATED:
            section, name = RELOCATED[key]
            target = raw.setdefault(section, {})
            if not isinstance(target, dict):
                continue  # the section itself is wrong; validation reports it
            value = ppo.pop(key)
            if name in target and target[name] != value:
                raise ConfigError(
                    f"{where(('ppo', key))}: ppo.{key}: {value!r} contradicts "
                    f"{section}.{name}: {target[name]!r} at {where((section, name))}",
                    hint="keep one of the two",
                )
            target[name] = value
            where.move(("ppo", key), (section, name))


def _apply_overrides(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...], where: _Where
) -> None:
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 2 and path[0] == "ppo" and path[1] in RELOCATED:
            path = RELOCATED[str(path[1])]
        try:
            _set_in(raw, path, value)
        except (TypeError, AttributeError, KeyError):
            raise ConfigError(
                f"--set {item}: {dotted(path)} does not name a setting",
                hint="see 'swallowctl config show' for the keys",
            ) from None
        where.from_set.add(path)


def _known_keys(path: KeyPath) -> list[str]:
    """Field names valid at the parent of `path` (for did-you-mean)."""
    parent = [p for p in path[:-1] if not isinstance(p, int)]
    model: type[BaseModel] = SwallowConfig
    if parent[:1] == ["modes"]:
        # modes.<name>.<key>: the mode's name is the user's own.
        model, parent = ModeSpec, parent[2:]
    for part in parent:
        info = model.model_fields.get(part)
        sub = _section_type(info.annotation) if info else None
        if sub is None:
            return []
        model = sub
    keys = list(model.model_fields)
    if model is PPOSection:
        keys += list(RELOCATED) + list(NO_LONGER_NEEDED)
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `list[X]`."""
    for a in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _unknown_key_message(path: KeyPath) -> str:
    key = str(path[-1])
    known = _known_keys(path)
    synonyms = [s for s in SYNONYMS if SYNONYMS[s] in known or "." in SYNONYMS[s]]
    guess = difflib.get_close_matches(key, known + synonyms, n=1, cutoff=0.6)
    if guess:
        meant = SYNONYMS.get(guess[0], guess[0])
        return f"unknown key '{key}'; did you mean '{meant}'?"
    return f"unknown key '{key}'; remove it (see 'swallowctl config init' for every key)"


def _check_top_level(raw: dict[str, Any], where: _Where) -> None:
    """Unknown top-level sections belong to the user, unless they look like a typo of ours."""
    ours = list(SwallowConfig.model_fields)
    for key in raw:
        if key in ours:
            continue
        guess = difflib.get_close_matches(str(key), ours, n=1, cutoff=0.6)
        if guess:
            raise ConfigError(
                f"{where((key,))}: {key}: unknown section; did you mean '{guess[0]}'?",
                hint="sections swallowctl does not own are kept for your code; "
                "if this is one of yours, give it a name less like ours",
            )


def _format_errors(err: ValidationError, where: _Where) -> str:
    by_path: dict[KeyPath, list[str]] = {}
    got: dict[KeyPath, str] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        # Union members add their type name to loc: cut back to the last real key.
        while loc and isinstance(loc[-1], str) and ("[" in loc[-1] or loc[-1] in _TYPE_TAGS):
            loc = loc[:-1]
        if e["type"] == "extra_forbidden":
            msg = _unknown_key_message(loc)
        elif e["type"] == "missing":
            msg = "required but missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            msg = re.sub(r" or instance of \w+|, unable to (interpret|parse) .*", "", msg)
            if "input" in e and not isinstance(e["input"], dict | list):
                got[loc] = f" (got {e['input']!r})"
        msgs = by_path.setdefault(loc, [])
        if msg not in msgs:
            # Union members each say "Input should be ...": say it once.
            msgs.append(msg.removeprefix("Input should be ") if msgs else msg)
    ordered = sorted(by_path, key=lambda loc: (where.line(loc), dotted(loc)))
    return "\n".join(
        f"{where(loc)}: {where.name(loc)}: {' or '.join(by_path[loc])}{got.get(loc, '')}"
        for loc in ordered
    )


_TYPE_TAGS = {"bool", "int", "float", "str", "list", "dict", "none", "function-after"}


# --- settings that only some algorithms have ----------------------------------------------------

_NO_CRITIC = "it has no value model"
_FIXED_KL = "TRL keeps the KL coefficient (beta) fixed"
_OUR_ENTROPY = "the entropy controllers run in swallowctl's own PPO loop"
_OUR_EVAL = "greedy evaluation runs in swallowctl's own PPO loop"
_GROUP = "PPO's baseline is its value head, not a group of answers"

# ppo.<key> -> (the algorithms that read it, why the others do not).
ONLY_FOR: dict[str, tuple[tuple[Algorithm, ...], str]] = {
    "vf_coef": (("ppo",), _NO_CRITIC),
    "cliprange_value": (("ppo",), _NO_CRITIC),
    "gamma": (("ppo",), _NO_CRITIC),
    "lam": (("ppo",), _NO_CRITIC),
    "whiten_rewards": (("ppo",), _NO_CRITIC),
    "kl_estimator": (("ppo",), "TRL's GRPO puts k3 in the loss, its RLOO k1 in the reward"),
    "target_kl": (("ppo",), _FIXED_KL),
    "min_kl_coef": (("ppo",), _FIXED_KL),
    "max_kl_coef": (("ppo",), _FIXED_KL),
    "kl_adjust_up": (("ppo",), _FIXED_KL),
    "kl_adjust_down": (("ppo",), _FIXED_KL),
    "local_rollout_forward_batch_size": (("ppo",), "TRL generates a whole update in one call"),
    "logits_chunk_size": (("ppo",), "TRL chunks its log-probs itself"),
    "entropy_coef": (("ppo", "grpo"), "RLOO has no entropy bonus"),
    "entropy_auto_adjust": (("ppo",), _OUR_ENTROPY),
    "entropy_target": (("ppo",), _OUR_ENTROPY),
    "entropy_adjust_beta": (("ppo",), _OUR_ENTROPY),
    "entropy_coef_initial": (("ppo",), _OUR_ENTROPY),
    "entropy_coef_min": (("ppo",), _OUR_ENTROPY),
    "entropy_coef_max": (("ppo",), _OUR_ENTROPY),
    "max_entropy_bonus": (("ppo",), _OUR_ENTROPY),
    "entropy_coef_phase1": (("ppo",), _OUR_ENTROPY),
    "entropy_coef_phase2": (("ppo",), _OUR_ENTROPY),
    "entropy_coef_phase3": (("ppo",), _OUR_ENTROPY),
    "entropy_transition_updates": (("ppo",), _OUR_ENTROPY),
    "entropy_floor": (("ppo",), _OUR_ENTROPY),
    "entropy_patience": (("ppo",), _OUR_ENTROPY),
    "entropy_monitor_warmup": (("ppo",), _OUR_ENTROPY),
    "enable_deterministic_eval": (("ppo",), _OUR_EVAL),
    "deterministic_eval_frequency": (("ppo",), _OUR_EVAL),
    "per_device_eval_batch_size": (("ppo",), _OUR_EVAL),
    "num_generations": (CRITIC_FREE, _GROUP),
    "cliprange_high": (CRITIC_FREE, "swallowctl's PPO clips symmetrically"),
    "mask_truncated_completions": (CRITIC_FREE, "use missing_eos_penalty with ppo"),
    "trl_args": (CRITIC_FREE, "ppo is swallowctl's own loop"),
    "grpo_loss_type": (("grpo",), "only GRPO has loss types"),
    "scale_rewards": (("grpo",), "only GRPO scales by the group's std"),
    "normalize_advantages": (("rloo",), "only RLOO has this switch"),
}

# Of those, the ones the user asked for a behaviour with: silently dropping them would train
# something else, so setting them for an algorithm without them is an error, not a warning.
REFUSED_ELSEWHERE = frozenset(
    {
        "target_kl",
        "entropy_coef",
        "entropy_auto_adjust",
        "max_entropy_bonus",
        "entropy_coef_phase1",
        "entropy_coef_phase2",
        "entropy_coef_phase3",
        "entropy_transition_updates",
        "entropy_floor",
        "enable_deterministic_eval",
    }
)


def _unused_settings(cfg: SwallowConfig) -> list[tuple[str, str]]:
    """(key, why) for each ppo.* setting that differs from its default but this algorithm lacks."""
    p = cfg.ppo
    out = []
    for key, (algorithms, why) in ONLY_FOR.items():
        default = PPOSection.model_fields[key].get_default(call_default_factory=True)
        if p.algorithm not in algorithms and getattr(p, key) != default:
            out.append((key, why))
    return out


def _algorithm_problems(cfg: SwallowConfig) -> list[tuple[KeyPath, str]]:
    """What grpo / rloo cannot run: their own settings wrong, or features only our PPO has."""
    p = cfg.ppo
    if p.algorithm not in CRITIC_FREE:
        return []
    problems: list[tuple[KeyPath, str]] = []
    sizes = BatchSizes.of(p)
    if p.num_generations < 2:
        problems.append(
            (
                ("ppo", "num_generations"),
                f"must be at least 2 for {p.algorithm}: each answer is compared with the others "
                "to the same prompt",
            )
        )
    elif sizes.samples_per_update % p.num_generations:
        fits = [
            n for n in range(2, sizes.samples_per_update + 1) if sizes.samples_per_update % n == 0
        ]
        problems.append(
            (
                ("ppo", "num_generations"),
                f"{p.num_generations} does not divide the {sizes.samples_per_update} samples per "
                f"update (per_device_train_batch_size {p.per_device_train_batch_size} x "
                f"grad_accum_steps {p.grad_accum_steps} x num_mini_batches "
                f"{p.num_mini_batches}); use one of {', '.join(map(str, fits[:6]))}",
            )
        )
    for key, why in _unused_settings(cfg):
        if key in REFUSED_ELSEWHERE:
            problems.append(
                (
                    ("ppo", key),
                    f"not available with algorithm {p.algorithm} ({why}); "
                    "remove it or use algorithm: ppo",
                )
            )
    if cfg.lora.critic != "shared":
        problems.append((("lora", "critic"), f"{p.algorithm} has no critic; remove lora.critic"))
    if cfg.environment is not None:
        problems.append(
            (("environment",), f"environments run with algorithm: ppo only, not {p.algorithm}")
        )
    return problems


def _algorithm_warnings(cfg: SwallowConfig, where: _Where) -> list[str]:
    """Settings this algorithm ignores (set, but harmless to drop): one warning each."""
    p = cfg.ppo
    return [
        f"{where(('ppo', key))}: ppo.{key}: {getattr(p, key)!r} is not used by algorithm "
        f"{p.algorithm} ({why})"
        for key, why in _unused_settings(cfg)
        if not (p.algorithm in CRITIC_FREE and key in REFUSED_ELSEWHERE)
    ]


def _check_consistency(cfg: SwallowConfig, where: _Where) -> None:
    """Rules that span several keys; each names the key to change."""
    p = cfg.ppo
    problems: list[tuple[KeyPath, str]] = _algorithm_problems(cfg)
    modes = {**BUILTIN_MODES, **cfg.modes}
    if cfg.data.mode not in modes:
        guess = difflib.get_close_matches(cfg.data.mode, list(modes), n=1)
        tip = f"; did you mean '{guess[0]}'?" if guess else f"; known: {', '.join(sorted(modes))}"
        problems.append((("data", "mode"), f"unknown mode '{cfg.data.mode}'{tip}"))
    if p.total_updates is not None and p.total_episodes is not None:
        problems.append(
            (("ppo", "total_episodes"), "give total_updates or total_episodes, not both")
        )
    if p.entropy_auto_adjust and p.entropy_target is None:
        problems.append((("ppo", "entropy_auto_adjust"), "needs ppo.entropy_target"))
    if p.entropy_coef_min > p.entropy_coef_max:
        problems.append((("ppo", "entropy_coef_min"), "is larger than ppo.entropy_coef_max"))
    if p.min_kl_coef > p.max_kl_coef:
        problems.append((("ppo", "min_kl_coef"), "is larger than ppo.max_kl_coef"))
    lora = cfg.lora
    for key in ("critic_r", "critic_alpha"):
        if getattr(lora, key) is not None and lora.critic == "shared":
            problems.append(
                (("lora", key), "sizes the critic adapter; set lora.critic: adapter or remove it")
            )
    if p.entropy_transition_updates is not None:
        t = p.entropy_transition_updates
        if any(not 0 < x < 1 for x in t) or t != sorted(t):
            problems.append(
                (("ppo", "entropy_transition_updates"), "must be increasing shares in (0, 1)")
            )
    if problems:
        raise ConfigError(
            "\n".join(f"{where(path)}: {where.name(path)}: {msg}" for path, msg in problems)
        )


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedConfig:
    """Load and validate a config. With no path: the defaults (the seed's settings).

    Raises:
        ConfigError: one line per problem, each `FILE:LINE: key.path: what is wrong`.
        UsageError: a malformed `--set` item.
    """
    file = Path(path) if path is not None else None
    raw: Any = {}
    lines: dict[KeyPath, int] = {}
    if file is not None:
        raw, lines = load_yaml_with_lines(file)
        if raw is None:
            raise ConfigError(
                f"{file}: the config file is empty",
                hint=f"write a starter with 'swallowctl config init {file} --force'",
            )
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{file}:1: the top level must be a mapping of sections (ppo:, model:, ...), "
                f"not a {type(raw).__name__}"
            )
    where = _Where(file, lines)
    warnings: list[str] = []
    _check_top_level(raw, where)
    _relocate(raw, where, warnings)
    _apply_overrides(raw, overrides, where)
    try:
        cfg = SwallowConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where)) from None
    _check_consistency(cfg, where)
    warnings += _algorithm_warnings(cfg, where)
    return LoadedConfig(config=cfg, path=file, warnings=warnings)


def dump_config(cfg: SwallowConfig) -> dict[str, Any]:
    """The resolved config as plain data (what `config show` prints and runs record)."""
    return cfg.model_dump(mode="json")


def render_yaml(cfg: SwallowConfig, sizes: BatchSizes | None = None) -> str:
    """The resolved config as YAML, with the batch sizes it implies as trailing comments."""
    text = yaml.safe_dump(dump_config(cfg), allow_unicode=True, sort_keys=False)
    if sizes is not None:
        text += "# what this means per run (one process):\n" + "".join(
            f"#   {k}: {v}\n" for k, v in vars(sizes).items()
        )
    return text


def config_keys() -> list[str]:
    """Every settable dotted key (for shell completion of --set)."""
    keys: list[str] = []
    for name, info in SwallowConfig.model_fields.items():
        sub = _section_type(info.annotation)
        if sub is None or name in ("rewards", "modes"):
            keys.append(name)
        else:
            keys += [f"{name}.{k}" for k in sub.model_fields]
    return keys


STARTER = Path(__file__).parent / "data" / "config_template.yaml"


def write_starter(path: Path, *, force: bool = False) -> None:
    """Write the commented starter config (every key with its default) to `path`."""
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STARTER.read_text(encoding="utf-8"), encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot write ({e.strerror})") from None
