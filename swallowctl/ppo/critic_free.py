"""GRPO and RLOO: TRL's GRPOTrainer / RLOOTrainer, fed from our config, rewards and run layout.

`ppo.algorithm: grpo | rloo` trains here; everything around the algorithm is swallowctl's own:
- model: the base from `policy.load_base` (4-bit NF4 when `decide_precision` says so), every stop
  id in its generation config, pad never a stop id; a LoRA adapter from `lora:` (TRL wraps it
  from a peft LoraConfig; a starting `lora.init_adapter` comes as a PeftModel, whose frozen copy
  TRL keeps as the reference);
- data: our PromptRows as a `datasets.Dataset`: `prompt` is the rendered chat (mode included),
  plus the row's index, from which the reward call rebuilds the very columns PPO passes;
- rewards: our RewardSet as TRL's one reward function (`RewardBridge`), called with PPO's
  arguments; each component is logged as `reward/<label>`, `missing_eos_penalty` applies;
- sizes: one update = one TRL generation batch = our samples per update (prompts x
  num_generations); per update num_mini_batches x ppo_epochs optimizer steps (TRL's
  `steps_per_generation` = grad_accum_steps x num_mini_batches, `num_iterations` = ppo_epochs);
  `total_updates` x that = TRL's `max_steps`;
- optimizer and schedule: ours (AdamW eps 1e-5, `algo.lr_factor`): the same lr curve as PPO;
- outputs: `metrics.jsonl` one line per update in our names (TRL's own keys under `trl/`),
  `samples.jsonl`, `checkpoint-N/` (N = update), `final/` (manifest, adapter, tokenizer);
- `--resume` and SIGINT/SIGTERM as PPO: finish the update, checkpoint, exit 130.

Checkpoints: TRL's Trainer writes `checkpoint-<optimizer step>` in place, file by file, into a
staging folder (`RUN/.trl`). When it is done, `on_save` records the algorithm and update, fsyncs,
writes COMPLETE and renames it to `RUN/checkpoint-<update>`: a checkpoint in the run folder is
whole or absent, as with PPO. TRL resumes from it (`resume_from_checkpoint`: adapter, optimizer,
scheduler, RNG states, data position).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from swallowctl.core.config import CRITIC_FREE, SwallowConfig, dump_config, render_yaml
from swallowctl.core.errors import ConfigError, UsageError
from swallowctl.ppo import checkpoint
from swallowctl.ppo.signals import Signals
from swallowctl.ppo.trainer import (
    FINAL,
    MANIFEST,
    Interrupted,
    TrainResult,
    final_manifest,
)

if TYPE_CHECKING:
    from swallowctl.ppo.data import PromptRow
    from swallowctl.ppo.rewards import RewardSet

log = logging.getLogger(__name__)

STAGING = ".trl"  # TRL's output_dir inside the run: checkpoints are written here, then promoted
ROW = "swallowctl_row"  # dataset column: the index of the PromptRow the prompt came from
RUN_INFO = "swallowctl.json"  # in each checkpoint: the algorithm and update that wrote it
TRAINERS = {"grpo": ("GRPOConfig", "GRPOTrainer"), "rloo": ("RLOOConfig", "RLOOTrainer")}

# TRL's metric -> ours (trainer.py / TRL 1.12 PPO names), where the meaning is the same.
OUR_NAMES = {
    "reward": "objective/scores",
    "kl": "objective/kl",
    "entropy": "policy/entropy_avg",
    "learning_rate": "lr",
    "clip_ratio/region_mean": "policy/clipfrac_avg",
    "policy_loss": "loss/policy_avg",
}
OURS_ALREADY = ("reward/", "val/")  # logged by RewardBridge under our names

# Where each TRL field we set comes from, for `ppo.trl_args` messages.
ORIGIN = {
    "learning_rate": "ppo.lr",
    "weight_decay": "ppo.weight_decay",
    "max_grad_norm": "ppo.max_grad_norm",
    "seed": "ppo.seed",
    "per_device_train_batch_size": "ppo.per_device_train_batch_size",
    "gradient_accumulation_steps": "ppo.grad_accum_steps",
    "steps_per_generation": "ppo.grad_accum_steps x ppo.num_mini_batches",
    "num_iterations": "ppo.ppo_epochs",
    "max_steps": "ppo.total_updates",
    "num_generations": "ppo.num_generations",
    "max_completion_length": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "top_k": "generation.top_k",
    "min_p": "generation.min_p",
    "generation_kwargs": "generation.typical_p",
    "beta": "ppo.kl_coef",
    "epsilon": "ppo.cliprange",
    "epsilon_high": "ppo.cliprange_high",
    "mask_truncated_completions": "ppo.mask_truncated_completions",
    "shuffle_dataset": "data.shuffle",
    "gradient_checkpointing": "ppo.gradient_checkpointing",
    "loss_type": "ppo.grpo_loss_type",
    "scale_rewards": "ppo.scale_rewards",
    "entropy_coef": "ppo.entropy_coef",
    "normalize_advantages": "ppo.normalize_advantages",
}


# --- the config, mapped -------------------------------------------------------------------------


def trl_kwargs(cfg: SwallowConfig, staging: Path, *, cpu: bool) -> dict[str, Any]:
    """GRPOConfig / RLOOConfig arguments for `cfg`: ours (see ORIGIN), then ppo.trl_args."""
    return _mapped_kwargs(cfg, staging, cpu=cpu) | cfg.ppo.trl_args


def _mapped_kwargs(cfg: SwallowConfig, staging: Path, *, cpu: bool) -> dict[str, Any]:
    p, g = cfg.ppo, cfg.generation
    sizes = cfg.sizes()
    out: dict[str, Any] = {
        "output_dir": str(staging),
        "seed": p.seed,
        "data_seed": p.seed,
        "learning_rate": p.lr,
        "weight_decay": p.weight_decay,
        "max_grad_norm": p.max_grad_norm,
        "per_device_train_batch_size": p.per_device_train_batch_size,
        "gradient_accumulation_steps": p.grad_accum_steps,
        # One generation batch per update: every mini-batch of it, every epoch over it.
        "steps_per_generation": p.grad_accum_steps * p.num_mini_batches,
        "num_iterations": p.ppo_epochs,
        "max_steps": sizes.total_updates * sizes.optimizer_steps_per_update,
        "num_generations": p.num_generations,
        "max_completion_length": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "top_k": g.top_k,
        "min_p": g.min_p or None,
        "generation_kwargs": {"typical_p": g.typical_p} if g.typical_p < 1 else None,
        "beta": p.kl_coef,
        "epsilon": p.cliprange,
        "epsilon_high": p.cliprange_high,
        "mask_truncated_completions": p.mask_truncated_completions,
        "shuffle_dataset": cfg.data.shuffle,
        "gradient_checkpointing": p.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        # Every LoRA parameter takes part in each forward: no extra DDP graph walk (nor its
        # warning from every process).
        "ddp_find_unused_parameters": False,
        # No autocast: the same fp32 stream as our PPO (and as tune-memory models it).
        "bf16": False,
        "fp16": False,
        "use_cpu": cpu,
        # The run layout is ours: one log per update, saves decided by our callback.
        "logging_strategy": "steps",
        "logging_steps": sizes.optimizer_steps_per_update,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": False,  # the row index must reach the reward function
        "dataloader_num_workers": 0,
    }
    if p.algorithm == "grpo":
        out |= {
            "loss_type": p.grpo_loss_type,
            "scale_rewards": p.scale_rewards,
            "entropy_coef": p.entropy_coef,
        }
    else:
        out["normalize_advantages"] = p.normalize_advantages
    return out


def check_trl_args(cfg: SwallowConfig) -> None:
    """`ppo.trl_args`: real fields of this TRL's config class, none that swallowctl sets.

    Raises:
        ConfigError: `ppo.trl_args.KEY: ...` with the key to use instead, or a likely spelling.
    """
    import trl

    config_name = TRAINERS[cfg.ppo.algorithm][0]
    fields = {f.name for f in dataclasses.fields(getattr(trl, config_name))}
    ours = _mapped_kwargs(cfg, Path("."), cpu=True)
    for key in cfg.ppo.trl_args:
        where = f"ppo.trl_args.{key}"
        if key in ours:
            source = ORIGIN.get(key)
            raise ConfigError(
                f"{where}: swallowctl sets {key}"
                + (f" from {source}; set that instead" if source else " (run layout)")
            )
        if key not in fields:
            guess = difflib.get_close_matches(key, sorted(fields), n=1)
            tip = f"; did you mean '{guess[0]}'?" if guess else ""
            raise ConfigError(
                f"{where}: not a {config_name} field in TRL {trl.__version__}{tip}",
                hint="see the TRL docs of GRPOConfig / RLOOConfig for this version",
            )


def check_inputs(cfg: SwallowConfig) -> int:
    """Data, rewards and ppo.trl_args, before any model loads; return the prompt count."""
    from swallowctl.ppo.trainer import check_inputs as check_ppo_inputs

    count = check_ppo_inputs(cfg)
    check_trl_args(cfg)
    return count


def plan_lines(cfg: SwallowConfig, num_processes: int = 1) -> list[str]:
    """What an update of grpo / rloo is, in the user's numbers (besides PPO's plan lines)."""
    p = cfg.ppo
    sizes = cfg.sizes(num_processes)
    prompts = sizes.samples_per_update // p.num_generations
    return [
        f"{p.algorithm} (TRL {_trl_version()} {TRAINERS[p.algorithm][1]}, no value model): "
        f"{prompts} prompts x {p.num_generations} answers per update, generated in one call "
        "per process",
        f"as TRL: steps_per_generation {p.grad_accum_steps * p.num_mini_batches}, "
        f"num_iterations {p.ppo_epochs}, max_steps "
        f"{sizes.total_updates * sizes.optimizer_steps_per_update}, beta {p.kl_coef:g}",
    ]


def _trl_version() -> str:
    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def check_run_algorithm(cfg: SwallowConfig) -> None:
    """Refuse to continue a run in output.dir that another algorithm wrote (checkpoints differ).

    Reads the run's config.yaml (written when it started); runs older than `ppo.algorithm` are
    PPO runs.
    """
    written = Path(cfg.output.dir) / "config.yaml"
    try:
        data = yaml.safe_load(written.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    section = data.get("ppo") if isinstance(data, dict) else None
    other = section.get("algorithm", "ppo") if isinstance(section, dict) else "ppo"
    if other != cfg.ppo.algorithm:
        raise UsageError(
            f"{written.parent} holds a {other} run; this config trains {cfg.ppo.algorithm}",
            hint=f"set ppo.algorithm: {other} to continue it, or output.dir to a new directory",
        )


# --- rewards ------------------------------------------------------------------------------------


class RewardBridge:
    """Our RewardSet as TRL's one reward function: PPO's arguments in, the weighted total out.

    TRL calls it once per generation batch with chat prompts, chat completions, the completion
    ids (stop token included) and the dataset's columns. It rebuilds exactly what PPO passes:
    the row's prompt text, the decoded answer, its ids, whether it ended on a stop id, the row's
    columns and the mode, so every component sees the same call under either algorithm.
    """

    __name__ = "swallowctl"  # TRL names a reward function by its __name__ (rewards/<name>/mean)

    def __init__(
        self,
        rewards: RewardSet,
        rows: Sequence[PromptRow],
        tokenizer: Any,
        stop_ids: Sequence[int],
        *,
        mode: str,
        missing_eos_penalty: float | None,
    ) -> None:
        self.rewards = rewards
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.mode = mode
        self.missing_eos_penalty = missing_eos_penalty
        self.samples: list[dict[str, Any]] = []  # the latest batch, for samples.jsonl

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        **kwargs: Any,
    ) -> list[float]:
        from swallowctl.ppo.data import reward_columns

        rows = [self.rows[int(i)] for i in kwargs[ROW]]
        ids = [list(map(int, x)) for x in completion_ids]
        # Decoded here, as PPO does, rather than TRL's chat-parsed completions.
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        finished = [bool(x) and x[-1] in self.stop_ids for x in ids]
        prompt_texts = [r.prompt_text for r in rows]
        result = self.rewards(
            prompts=prompt_texts,
            completions=texts,
            completion_ids=ids,
            finished=finished,
            columns=reward_columns(rows),
            mode=self.mode,
        )
        penalty = self.missing_eos_penalty or 0.0
        scores = [t - (0.0 if f else penalty) for t, f in zip(result.total, finished, strict=True)]
        self._log(kwargs.get("log_metric"), result.means(), finished)
        self.samples = [
            {
                "prompt": prompt,
                "completion": text,
                "score": score,
                **{k: _finite(v[i]) for k, v in result.components.items()},
            }
            for i, (prompt, text, score) in enumerate(zip(prompt_texts, texts, scores, strict=True))
        ]
        return scores

    @staticmethod
    def _log(
        log_metric: Callable[[str, float], None] | None,
        means: dict[str, float],
        finished: list[bool],
    ) -> None:
        """Per-component means and stop counts through TRL's metric log (gathered, averaged)."""
        if log_metric is None:
            return
        for label, value in means.items():
            log_metric(f"reward/{label}", value)
        log_metric("val/num_eos_tokens", float(sum(finished)))


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


# --- the trainer --------------------------------------------------------------------------------


def _trainer_class(algorithm: str, schedule: Callable[[int], float]) -> Any:
    """TRL's trainer with swallowctl's optimizer and schedule, so the lr curve equals PPO's.

    transformers documents overriding create_optimizer / create_scheduler for this.
    """
    import torch
    import trl

    base: Any = getattr(trl, TRAINERS[algorithm][1])

    class _Trainer(base):
        optimizer: Any
        lr_scheduler: Any

        def create_optimizer(self, model: Any = None) -> Any:
            if self.optimizer is None:
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = torch.optim.AdamW(
                    params,
                    lr=self.args.learning_rate,
                    weight_decay=self.args.weight_decay,
                    eps=1e-5,
                )
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, schedule
                )
            return self.lr_scheduler

    return _Trainer


def _callback(runner: CriticFreeTrainer) -> Any:
    """A TrainerCallback that hands TRL's events to the runner."""
    from transformers import TrainerCallback

    class _RunCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return runner.on_step_end(state, control)

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return runner.on_log(state, control, kwargs.get("logs") or {})

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            runner.on_save(state)

    return _RunCallback()


class CriticFreeTrainer:
    """GRPO or RLOO from the config; `run()` trains. Same interface as PPOTrainer."""

    def __init__(
        self,
        cfg: SwallowConfig,
        *,
        resume: bool = False,
        on_update: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        from swallowctl.core.models import resolve

        if cfg.ppo.algorithm not in CRITIC_FREE:
            raise ValueError(f"CriticFreeTrainer trains grpo or rloo, not {cfg.ppo.algorithm}")
        # TRL 1.16 still calls transformers' old gradient-checkpointing names; nothing a user of
        # swallowctl can change, so not shown.
        warnings.filterwarnings(
            "ignore", r"`\w*gradient_checkpointing\w*` is deprecated", FutureWarning
        )
        self.cfg = cfg
        self.algorithm = cfg.ppo.algorithm
        self.on_update = on_update or (lambda _u, _m: None)
        self.rank = int(os.environ.get("RANK", "0"))
        self.sizes = cfg.sizes(int(os.environ.get("WORLD_SIZE", "1")))
        self.steps_per_update = self.sizes.optimizer_steps_per_update
        self.run_dir = Path(cfg.output.dir)
        self.staging = self.run_dir / STAGING
        self.resume_path = self._check_run_dir(resume)
        self.resolved = resolve(cfg.model.name_or_path, cfg.model.revision)
        self._build_model()
        self._build_data_and_rewards()
        self.trainer = self._build_trainer()
        self.signals: Signals | None = None
        self.stopped_at: int | None = None
        self.last: dict[str, float] = {}
        self._clock = time.perf_counter()
        self.runlog = self._open_runlog()

    # --- set-up ----------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _check_run_dir(self, resume: bool) -> Path | None:
        """Refuse to mix two runs (or two algorithms) in one directory; find where to resume."""
        found = checkpoint.latest(self.run_dir) if self.run_dir.exists() else None
        if not resume:
            if found is not None or (self.run_dir / FINAL).exists():
                raise UsageError(
                    f"{self.run_dir} already holds a run",
                    hint="pass --resume to continue it, or set output.dir to a new directory",
                )
            return None
        check_run_algorithm(self.cfg)
        if found is None:
            log.warning(
                "--resume: no complete checkpoint in %s; starting from the start", self.run_dir
            )
            return None
        info = _read_run_info(found)
        if info.get("algorithm") != self.algorithm:
            raise UsageError(
                f"{found} was written by {info.get('algorithm', 'ppo')}, not {self.algorithm}",
                hint="set ppo.algorithm back to continue it, or output.dir to a new directory",
            )
        return found

    def _build_model(self) -> None:
        """The base as PPO loads it, every stop id in its generation config; the adapter."""
        import torch
        from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training

        from swallowctl.ppo import policy

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        self.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
        self.precision = policy.decide_precision(cfg, self.device)
        self.tokenizer = policy.load_tokenizer(self.resolved, cfg)
        base = policy.load_base(self.resolved, cfg, self.precision)
        # TRL stops on every eos id of the generation config: all of Llama-3.1's stop ids.
        base.generation_config.eos_token_id = list(self.resolved.stop_token_ids)
        base.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if self.precision.load_in_4bit:
            base = prepare_model_for_kbit_training(
                base,
                use_gradient_checkpointing=cfg.ppo.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        lora = cfg.lora
        self.peft_config: Any = None
        if lora.init_adapter:
            # TRL copies a PeftModel's adapter as "ref": the frozen starting adapter is the
            # reference, as in PPO.
            self.model: Any = PeftModel.from_pretrained(base, lora.init_adapter, is_trainable=True)
        else:
            # A fresh adapter: TRL wraps it; the reference is the base with adapters disabled.
            self.model = base
            self.peft_config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )

    def _build_data_and_rewards(self) -> None:
        from datasets import Dataset

        from swallowctl.ppo.data import load_prompts
        from swallowctl.ppo.rewards import RewardSet

        cfg = self.cfg
        rows = load_prompts(cfg.data.prompts, cfg.mode(), mode_name=cfg.data.mode, announce=False)
        rewards = RewardSet.from_config(
            cfg.rewards,
            device=self.device,
            load_in_4bit=self.precision.load_in_4bit,
            stop_token_ids=self.resolved.stop_token_ids,
            modes=cfg.modes,
            mode=cfg.data.mode,
        )
        self.bridge = RewardBridge(
            rewards,
            rows,
            self.tokenizer,
            self.resolved.stop_token_ids,
            mode=cfg.data.mode,
            missing_eos_penalty=cfg.ppo.missing_eos_penalty,
        )
        self.dataset = Dataset.from_dict(
            {"prompt": self._fitted_prompts(rows), ROW: list(range(len(rows)))}
        )

    def _fitted_prompts(self, rows: Sequence[PromptRow]) -> list[list[dict[str, str]]]:
        """Each prompt cut to data.max_prompt_tokens as PPO cuts it (TRL cuts none)."""
        from swallowctl.ppo.rollout import fit_prompt

        limit = self.cfg.data.max_prompt_tokens
        fitted = [fit_prompt(self.tokenizer, r.messages, limit)[0] for r in rows]
        cut = sum(f is not r.messages for f, r in zip(fitted, rows, strict=True))
        if cut:
            log.info("%d of %d prompts cut to data.max_prompt_tokens (%d)", cut, len(rows), limit)
        return fitted

    def _build_trainer(self) -> Any:
        import torch
        import trl
        from transformers import PrinterCallback, ProgressCallback

        from swallowctl.ppo import algo

        cfg, sizes = self.cfg, self.sizes
        total = sizes.total_updates * self.steps_per_update
        warmup = int(cfg.ppo.warmup_ratio * total)

        def schedule(step: int) -> float:
            return algo.lr_factor(
                step, total, warmup, cfg.ppo.lr_scheduler_type, cfg.ppo.min_lr_ratio
            )

        config_cls = getattr(trl, TRAINERS[self.algorithm][0])
        args = config_cls(**trl_kwargs(cfg, self.staging, cpu=not torch.cuda.is_available()))
        trainer = _trainer_class(self.algorithm, schedule)(
            model=self.model,
            reward_funcs=self.bridge,
            args=args,
            train_dataset=self.dataset,
            processing_class=self.tokenizer,
            peft_config=self.peft_config,
            callbacks=[_callback(self)],
        )
        # Progress and metrics are ours (console bar, metrics.jsonl): keep stdout clean.
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        return trainer

    def _open_runlog(self) -> Any:
        from swallowctl.ppo.runlog import RunLog

        if not self.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = _read_run_info(self.resume_path).get("update") if self.resume_path else None
        return RunLog(
            self.run_dir,
            list(self.cfg.logging.report_to),
            resume_from=resumed,
            config=dump_config(self.cfg),
        )

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until total_updates or a signal; write final/ (adapter, tokenizer, manifest)."""
        self._write_config()
        resume = str(self.resume_path) if self.resume_path else None
        try:
            with Signals() as signals:
                self.signals = signals
                self._clock = time.perf_counter()
                self.trainer.train(resume_from_checkpoint=resume)
            updates = self.trainer.state.global_step // self.steps_per_update
            if self.stopped_at is not None:
                raise Interrupted(
                    f"stopped by {signals.requested} after update {self.stopped_at}; "
                    f"checkpoint-{self.stopped_at} saved in {self.run_dir}",
                    hint="run the same command again with --resume to continue",
                )
            final = self._save_final(updates)
        finally:
            if self.runlog is not None:
                self.runlog.close()
            self.bridge.rewards.close()
            if self.is_main:
                shutil.rmtree(self.staging, ignore_errors=True)
        return TrainResult(self.run_dir, final, updates, self.last)

    def on_step_end(self, state: Any, control: Any) -> Any:
        """At the end of an update: save when output.save_steps says so."""
        update, rest = divmod(state.global_step, self.steps_per_update)
        if not rest and update % self.cfg.output.save_steps == 0:
            control.should_save = update < self.sizes.total_updates  # the last one is final/
        return control

    def on_log(self, state: Any, control: Any, logs: dict[str, Any]) -> Any:
        """One metrics line per update (TRL logs once, as an update ends), samples, progress;
        then, if a signal came, save this update and stop (Trainer saves right after a log)."""
        if "train_runtime" in logs:  # the end-of-training summary, not an update
            return control
        update = state.global_step // self.steps_per_update
        metrics = self._metrics(update, logs)
        self.last = metrics
        if self.runlog is not None:
            self.runlog.metrics(update, metrics)
            if update % self.cfg.logging.steps == 0:
                self.runlog.samples(update, self.bridge.samples[: self.cfg.logging.num_samples])
        self.on_update(update, metrics)
        if self.signals is not None and self.signals.requested:
            self.stopped_at = update
            control.should_save = True
            control.should_training_stop = True
        return control

    def _metrics(self, update: int, logs: dict[str, Any]) -> dict[str, float]:
        """TRL's logs in our names where they map, everything of TRL's also under trl/."""
        import torch

        now = time.perf_counter()
        seconds, self._clock = now - self._clock, now
        values = {k: float(v) for k, v in logs.items() if _is_number(v)}
        out: dict[str, float] = {ours: values[k] for k, ours in OUR_NAMES.items() if k in values}
        out |= {k: v for k, v in values.items() if k.startswith(OURS_ALREADY)}
        per_update = self.sizes.samples_per_update
        out["episode"] = float(update * per_update)
        out["time/update_s"] = seconds
        out["throughput/episodes_per_s"] = per_update / seconds if seconds > 0 else math.nan
        if torch.cuda.is_available():
            out["memory/peak_bytes"] = float(torch.cuda.max_memory_allocated())
        out |= {f"trl/{k}": v for k, v in values.items() if not k.startswith(OURS_ALREADY)}
        return out

    def on_save(self, state: Any) -> None:
        """TRL saved checkpoint-<step> in the staging folder: promote it to checkpoint-<update>."""
        self.trainer.accelerator.wait_for_everyone()  # every rank's RNG file is in place
        if not self.is_main:
            return
        update = state.global_step // self.steps_per_update
        src = self.staging / f"checkpoint-{state.global_step}"
        info = {"algorithm": self.algorithm, "update": update, "trl_step": state.global_step}
        (src / RUN_INFO).write_text(json.dumps(info), encoding="utf-8")
        checkpoint.seal(src)
        checkpoint.recover(self.run_dir)
        checkpoint.install(src, self.run_dir / f"checkpoint-{update}")  # saved again: replaced
        checkpoint.prune(self.run_dir, self.cfg.output.save_total_limit)

    def _write_config(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                render_yaml(self.cfg, self.sizes), encoding="utf-8"
            )

    def _save_final(self, updates: int) -> Path | None:
        """`final/`: PEFT adapter, tokenizer and a manifest naming the base and the algorithm."""
        from swallowctl.ppo.policy import save_adapter

        self.trainer.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        peft_model = self.trainer.accelerator.unwrap_model(self.trainer.model)

        def write(directory: Path) -> None:
            save_adapter(peft_model, directory)
            self.tokenizer.save_pretrained(directory)
            manifest = final_manifest(self.cfg, self.resolved, updates, self.last)
            manifest["algorithm"] = self.algorithm
            manifest["trl"] = _trl_version()
            (directory / MANIFEST).write_text(
                json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8"
            )

        return checkpoint.save(self.run_dir, FINAL, write_model=write, state={"update": updates})


def _read_run_info(path: Path | None) -> dict[str, Any]:
    """The checkpoint's RUN_INFO ({} for PPO checkpoints, which have none)."""
    if path is None:
        return {}
    try:
        data = json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    """A loggable scalar (TRL logs None for a metric with no value in the window)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
