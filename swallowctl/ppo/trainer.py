"""The PPO loop, top to bottom: rollout -> score -> KL penalty -> GAE -> epochs x mini-batches x
micro-batches -> log -> checkpoint. Formulas live in `algo.py`; this file only moves data.

Prefixes: `b_` the whole rollout batch, `mb_` a mini-batch, `micro_` a micro-batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from swallowctl import __version__
from swallowctl.core.config import BatchSizes, SwallowConfig, dump_config, render_yaml
from swallowctl.core.errors import RuntimeFailure, SwallowError, UsageError
from swallowctl.core.models import ResolvedModel, resolve
from swallowctl.ppo import algo, checkpoint
from swallowctl.ppo.runlog import RunLog, check_reporters, redacted
from swallowctl.ppo.signals import Signals

log = logging.getLogger(__name__)

FINAL = "final"
BEST = "best"
MANIFEST = "manifest.json"


class Interrupted(SwallowError):
    """Ctrl-C / SIGTERM: the update finished, a checkpoint was written; exit 130."""

    exit_code = 130


@dataclass(frozen=True)
class Plan:
    """The batch arithmetic of a run, stated before it starts."""

    sizes: BatchSizes
    num_processes: int
    rollout_chunk: int  # sequences per generate / scoring forward
    reward_calls: int  # one per sample per reward component, for the whole run
    environment: str | None = None  # `module:Class`, when samples come from an environment
    num_envs: int = 0  # environments per process
    env_steps: int = 0  # at most one per sample (output errors are not stepped)

    def lines(self) -> list[str]:
        s = self.sizes
        out = [
            f"updates: {s.total_updates}, samples per update: {s.samples_per_update} "
            f"({self.num_processes} process(es)), total samples: {s.total_samples}",
            f"per update: {s.optimizer_steps_per_update} optimizer steps "
            f"(mini-batches of {s.mini_batch} x PPO epochs), micro-batch {s.micro_batch}, "
            f"rollout chunk {self.rollout_chunk}",
            f"reward calls: {self.reward_calls}",
        ]
        if self.environment:
            out.append(
                f"environment: {self.environment}, {self.num_envs} per process; "
                f"environment steps: up to {self.env_steps} (one per sample)"
            )
        return out


def make_plan(cfg: SwallowConfig, num_processes: int = 1) -> Plan:
    from swallowctl.ppo.rewards import default_reward_specs

    sizes = cfg.sizes(num_processes)
    env = cfg.environment
    # With an environment, its reward is the score: `rewards:` only adds to it (none by default).
    components = len(cfg.rewards) if env else len(cfg.rewards or default_reward_specs(cfg.mode()))
    return Plan(
        sizes=sizes,
        num_processes=num_processes,
        rollout_chunk=cfg.ppo.local_rollout_forward_batch_size or sizes.micro_batch,
        reward_calls=sizes.total_samples * components,
        environment=env.entrypoint if env else None,
        num_envs=(env.num_envs or sizes.samples_per_update // num_processes) if env else 0,
        env_steps=sizes.total_samples if env else 0,
    )


def check_inputs(cfg: SwallowConfig) -> int:
    """Validate data (or the environment class) and reward functions before any model loads.

    Returns the prompt count (with an environment: the number of environments per process).
    """
    from swallowctl.ppo.data import load_prompts
    from swallowctl.ppo.rewards import check_reward_specs

    if cfg.environment is not None:
        from swallowctl.ppo.environment import load_environment_class

        load_environment_class(cfg.environment.entrypoint)
        check_reward_specs(cfg.rewards)
        check_reporters(list(cfg.logging.report_to))
        return make_plan(cfg).num_envs
    rows = load_prompts(cfg.data.prompts, cfg.mode(), mode_name=cfg.data.mode)
    check_reward_specs(cfg.rewards)
    check_reporters(list(cfg.logging.report_to))
    return len(rows)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    updates_done: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: str | None = None


class PPOTrainer:
    """Builds everything from the config once; `run()` trains. Library code: it never prints."""

    def __init__(
        self,
        cfg: SwallowConfig,
        *,
        resume: bool = False,
        on_update: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        import torch
        from accelerate import Accelerator

        self.cfg = cfg
        self.on_update = on_update or (lambda _u, _m: None)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = self.accelerator.device
        # Several CPU processes get `cpu:0`, which safetensors refuses as a device name.
        self.device = "cpu" if device.type == "cpu" else str(device)
        self.plan = make_plan(cfg, self.accelerator.num_processes)
        self.run_dir = Path(cfg.output.dir)
        self.start_update = 0
        resume_path = self._check_run_dir(resume)
        check_reporters(list(cfg.logging.report_to))  # a missing wandb fails before the model loads
        self._seed(cfg.ppo.seed + self.accelerator.process_index)
        self.resolved = resolve(cfg.model.name_or_path, cfg.model.revision)
        self._build_model()
        self._build_data_and_rewards()
        self._build_optimizer()
        self._build_controllers()
        if resume_path is not None:
            self._load(resume_path)
        if self.env_pool is not None:
            self.env_pool.start()  # first resets run while the rest is set up
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.runlog = (
            RunLog(
                self.run_dir,
                list(cfg.logging.report_to),
                # --resume without a checkpoint redoes update 1: drop what a killed run wrote
                resume_from=self.start_update if resume else None,
                config=dump_config(cfg),
            )
            if self.accelerator.is_main_process
            else None
        )

    # --- set-up ----------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool) -> Path | None:
        """Refuse to mix two runs in one directory; find where to resume."""
        if self.accelerator.is_main_process and self.run_dir.exists():
            checkpoint.recover(self.run_dir)  # a `final/` or `best/` whose replacement was cut
        found = checkpoint.latest(self.run_dir) if self.run_dir.exists() else None
        if resume and self.accelerator.state.deepspeed_plugin is not None:
            self._raise(
                UsageError(
                    "--resume with --deepspeed is not built yet: ZeRO splits the optimizer state "
                    "across processes and checkpoints hold the main process's part only",
                    hint="train without --deepspeed for resumable runs (the adapter of every "
                    "checkpoint-N still works with infer and export)",
                )
            )
        if resume:
            if found is None:
                log.warning(
                    "--resume: no complete checkpoint in %s; starting from the start", self.run_dir
                )
            else:
                self._check_process_count(found)
            return found
        if found is not None or (self.run_dir / FINAL).exists():
            self._raise(
                UsageError(
                    f"{self.run_dir} already holds a run",
                    hint="pass --resume to continue it, or set output.dir to a new directory",
                )
            )
        return None

    def _check_process_count(self, path: Path) -> None:
        """Data shards, RNG states and environments are per process: the count must not change."""
        then = checkpoint.read_state(path)["num_processes"]
        now = self.accelerator.num_processes
        if then != now:
            how = "without --num-processes" if then == 1 else f"with --num-processes {then}"
            self._raise(
                UsageError(
                    f"{path} was written by {then} process(es); this run has {now}",
                    hint=f"resume {how}, or start a new run in another output.dir",
                )
            )

    def _seed(self, seed: int) -> None:
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_model(self) -> None:
        from swallowctl.ppo import policy

        cfg = self.cfg
        self.critic_adapter = cfg.lora.critic == "adapter"
        if self.critic_adapter and self.accelerator.num_processes > 1:
            # DDP wants one forward and one backward per step over all parameters; the critic
            # adapter takes two passes, each over half of them.
            raise UsageError(
                "lora.critic: adapter runs in one process only (not built for several yet)",
                hint="use lora.critic: shared, or train with one process",
            )
        self.precision = policy.decide_precision(cfg, self.device)
        self.tokenizer = policy.load_tokenizer(self.resolved, cfg)
        base = policy.load_base(self.resolved, cfg, self.precision)
        self.peft = policy.attach_adapters(base, cfg, self.precision)
        module = policy.build_policy_value(self.peft, self.resolved.architecture.hidden_size)
        module.value_head.to(self.device)
        self.model = module
        self.stop_ids = self.resolved.stop_token_ids
        self.pad_id = int(self.tokenizer.pad_token_id)

    def _build_data_and_rewards(self) -> None:
        from swallowctl.ppo.data import PromptStream, load_prompts
        from swallowctl.ppo.rewards import RewardSet

        cfg = self.cfg
        self.mode = cfg.mode()
        self.env_pool: Any = None  # an EnvPool when samples come from an environment
        self.stream: PromptStream | None = None
        self.rewards: RewardSet | None = None
        if cfg.environment is not None:
            self._build_environment()
            return
        rows = load_prompts(cfg.data.prompts, self.mode, mode_name=cfg.data.mode, announce=False)
        self.stream = PromptStream(
            rows,
            seed=cfg.ppo.seed,
            shuffle=cfg.data.shuffle,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )
        eval_spec = cfg.data.eval_prompts
        self.eval_rows = (
            load_prompts(eval_spec, self.mode, mode_name=cfg.data.mode)
            if eval_spec
            else rows[: cfg.ppo.per_device_eval_batch_size]
        )
        self.best_value = -math.inf
        self.rewards = RewardSet.from_config(
            cfg.rewards,
            device=self.device,
            load_in_4bit=self.precision.load_in_4bit,
            stop_token_ids=self.stop_ids,
            modes=cfg.modes,
            mode=cfg.data.mode,
        )

    def _build_environment(self) -> None:
        """The environment pool replaces the prompt stream; `rewards:` only add to its reward."""
        from swallowctl.ppo.environment import CallPolicy, EnvPool, load_environment_class
        from swallowctl.ppo.rewards import RewardSet

        cfg, env = self.cfg, self.cfg.environment
        assert env is not None
        per_process = self.plan.sizes.samples_per_update // self.accelerator.num_processes
        if env.num_envs is not None and env.num_envs < per_process:
            raise UsageError(
                f"environment.num_envs is {env.num_envs}, but each update takes {per_process} "
                "samples per process, and every sample needs an environment of its own",
                hint=f"set environment.num_envs to at least {per_process}, or leave it out",
            )
        self.eval_rows = []
        self.best_value = -math.inf
        self.env_class = load_environment_class(env.entrypoint)
        self.rewards = (
            RewardSet.from_config(
                cfg.rewards,
                device=self.device,
                load_in_4bit=self.precision.load_in_4bit,
                stop_token_ids=self.stop_ids,
                modes=cfg.modes,
                mode=cfg.data.mode,
            )
            if cfg.rewards
            else None
        )
        self.env_pool = EnvPool(
            self.env_class,
            env.settings,
            cfg.user_sections,
            num_envs=env.num_envs or per_process,
            seed=cfg.ppo.seed,
            rank=self.accelerator.process_index,
            concurrency=env.concurrency,
            policy=CallPolicy(timeout_s=env.timeout_s, retries=env.retries),
        )

    def _build_optimizer(self) -> None:
        import torch

        cfg, sizes = self.cfg, self.plan.sizes
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.ppo.lr, weight_decay=cfg.ppo.weight_decay, eps=1e-5
        )
        # The schedule is computed from the real number of optimizer steps of this run.
        total_steps = sizes.total_updates * sizes.optimizer_steps_per_update
        warmup = int(cfg.ppo.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: algo.lr_factor(
                step, total_steps, warmup, cfg.ppo.lr_scheduler_type, cfg.ppo.min_lr_ratio
            ),
        )
        self._accum_scale = self._configure_deepspeed()
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def _configure_deepspeed(self) -> int:
        """`--deepspeed zero2`: our batch sizes and clipping in DeepSpeed's config (no dataloader
        tells Accelerate). Returns what the loss is multiplied by: DeepSpeed divides it by its
        accumulation steps itself, and our micro-batch losses already carry that share."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return 1
        p = self.cfg.ppo
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=p.per_device_train_batch_size,
            gradient_accumulation_steps=p.grad_accum_steps,
            gradient_clipping=p.max_grad_norm,
        )
        return p.grad_accum_steps

    def _build_controllers(self) -> None:
        p = self.cfg.ppo
        self.kl_ctl = (
            algo.AdaptiveKL(
                p.kl_coef,
                p.target_kl,
                p.kl_adjust_up,
                p.kl_adjust_down,
                p.min_kl_coef,
                p.max_kl_coef,
            )
            if p.target_kl is not None
            else None
        )
        self.kl_coef = p.kl_coef
        initial = p.entropy_coef_initial if p.entropy_coef_initial is not None else p.entropy_coef
        self.ent_ctl = (
            algo.EntropyCoef(
                initial,
                p.entropy_target or 0.0,
                p.entropy_adjust_beta,
                p.entropy_coef_min,
                p.entropy_coef_max,
            )
            if p.entropy_auto_adjust
            else None
        )
        self.entropy_coef = initial
        self.monitor = (
            algo.EntropyMonitor(p.entropy_floor, p.entropy_patience, p.entropy_monitor_warmup)
            if p.entropy_floor is not None
            else None
        )

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until `total_updates`, a signal, NaN, or an entropy collapse."""
        sizes = self.plan.sizes
        self._write_config()
        last: dict[str, float] = {}
        stopped: str | None = None
        update = self.start_update
        try:
            with Signals() as signals:
                for update in range(self.start_update + 1, sizes.total_updates + 1):
                    last = self._one_update(update)
                    self.on_update(update, last)
                    self._keep_best(update, last)
                    # A signal may reach one process only: all stop after the same update.
                    requested = self._first_across(signals.requested)
                    if self._should_save(update) or requested:
                        self._save(update)
                    if requested:
                        self._raise(
                            Interrupted(
                                f"stopped by {requested} after update {update}; "
                                f"checkpoint-{update} saved in {self.run_dir}",
                                hint="run the same command again with --resume to continue",
                            )
                        )
                    if self.monitor is not None and self.monitor.update(last["policy/entropy_avg"]):
                        stopped = f"entropy stayed below {self.cfg.ppo.entropy_floor}"
                        log.warning("stopping early at update %d: %s", update, stopped)
                        break
            final = self._save_final(update, last)
        finally:
            if self.runlog is not None:
                self.runlog.close()
            if self.env_pool is not None:
                self.env_pool.close()
        return TrainResult(self.run_dir, final, update, last, stopped)

    def _one_update(self, update: int) -> dict[str, float]:
        import torch

        t0 = time.perf_counter()
        b = self._together(self._any_rollout)  # a reward function or environment may fail
        if "tally" in b:  # merged (a collective) only once every process got this far
            b["metrics"] = {**self._merged(b.pop("tally")), **b["metrics"]}
        t1 = time.perf_counter()
        stats = self._optimize(b)
        t2 = time.perf_counter()
        stats["time/rollout_s"] = t1 - t0
        stats["time/update_s"] = t2 - t1
        n = b["batch"].response.shape[0] * self.accelerator.num_processes
        stats["throughput/episodes_per_s"] = n / (t2 - t0)
        tokens = float(b["batch"].response_mask.sum()) * self.accelerator.num_processes
        stats["throughput/tokens_per_s"] = tokens / (t2 - t0)
        stats["episode"] = float(update * self.plan.sizes.samples_per_update)
        stats["lr"] = float(self.scheduler.get_last_lr()[0])
        if torch.cuda.is_available():
            stats["memory/peak_bytes"] = float(torch.cuda.max_memory_allocated())
        self._update_controllers(stats)
        if self._eval_due(update):
            if self.env_pool is None:
                stats.update(self._reduce(self._together(self._evaluate)))
            else:  # as above: episodes may fail on one process; merge after they all played
                stats.update(self._env_eval_metrics(self._together(self._env_evaluate)))
        # The main process writes; if its disk fails, the others must not wait on it.
        self._together(lambda: self._log(update, stats, b["samples"]), main_only=True)
        return stats

    def _log(self, update: int, stats: dict[str, float], samples: list[dict[str, Any]]) -> None:
        assert self.runlog is not None
        self.runlog.metrics(update, stats)
        if update % self.cfg.logging.steps == 0:
            self.runlog.samples(update, samples[: self.cfg.logging.num_samples])

    def _any_rollout(self) -> dict[str, Any]:
        if self.env_pool is not None:
            return self._env_rollout()
        assert self.stream is not None
        rows = self.stream.next_batch(
            self.plan.sizes.samples_per_update // self.accelerator.num_processes
        )
        return self._rollout(rows)

    # --- rollout and scoring ----------------------------------------------------------------

    def _rollout(self, rows: list[Any]) -> dict[str, Any]:
        """Sample responses, score them once, compute old log-probs, values and reference."""

        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.eval()
        batch = self._generate(unwrapped, [r.messages for r in rows])
        logprobs, values, ref_logprobs = self._score_forward(unwrapped, batch)
        texts = self.tokenizer.batch_decode(batch.response, skip_special_tokens=True)
        scores, components = self._rewards(rows, batch, texts)
        return {
            "metrics": self._choice_metrics(rows, texts),
            "batch": batch,
            "logprobs": logprobs,
            "values": values,
            "ref_logprobs": ref_logprobs,
            "scores": scores,
            "components": components,
            "samples": [
                {
                    "prompt": r.prompt_text,
                    "completion": t,
                    "score": float(s),
                    **{k: _float(v[i]) for k, v in components.items()},
                }
                for i, (r, t, s) in enumerate(zip(rows, texts, scores.tolist(), strict=True))
            ],
        }

    def _choice_metrics(self, rows: list[Any], texts: list[str]) -> dict[str, float]:
        """`choice/*` of a prompt-file batch (`choice/accuracy` if rows have a `correct` column)."""
        from swallowctl.ppo.environment import CORRECT_KEY, choice_metrics

        if not self.mode.choices:
            return {}
        truth = [r.columns.get(CORRECT_KEY) for r in rows]
        if all(t is None for t in truth):
            out = choice_metrics(texts, self.mode)
            del out["choice/accuracy"]  # this data set does not say what is right
            return out
        return choice_metrics(texts, self.mode, [None if t is None else str(t) for t in truth])

    def _generate(
        self,
        unwrapped: Any,
        conversations: list[list[dict[str, str]]],
        on_chunk: Callable[[int, Any], None] | None = None,
    ) -> Any:
        """Sample answers chunk by chunk; `on_chunk(start, piece)` sees each chunk as it is done.

        (So environment steps of one chunk run while the next chunk is generated.)
        """
        from swallowctl.ppo import rollout

        chunk = self.plan.rollout_chunk
        prompts = rollout.encode_prompts(
            self.tokenizer, conversations, self.cfg.data.max_prompt_tokens
        )
        pieces = []
        for i in range(0, len(prompts), chunk):
            q, qm = rollout.left_pad(prompts[i : i + chunk], self.pad_id)
            piece = rollout.generate(
                unwrapped.peft,
                q.to(self.device),
                qm.to(self.device),
                self.cfg.generation,
                self.stop_ids,
                self.pad_id,
            )
            if on_chunk is not None:
                on_chunk(i, piece)
            pieces.append(piece)
        return rollout.concat(pieces, self.pad_id)

    def _env_rollout(self) -> dict[str, Any]:
        """Rollout from the environment pool: each sample from its own slot, stepped once.

        Steps of a chunk are submitted as soon as it is generated and run while the next chunk
        is generated and while log-probs, values and reference are computed; the trainer waits
        for them only then.
        """
        import torch

        from swallowctl.ppo.environment import (
            collect,
            env_tally,
            plain_info,
            render_observation,
        )
        from swallowctl.ppo.rewards import parse_choice

        pool, mode = self.env_pool, self.mode
        n = self.plan.sizes.samples_per_update // self.accelerator.num_processes
        t0 = time.perf_counter()
        slots = pool.next_slots(n)
        observations = [pool.observation(s) for s in slots]
        rows = [
            render_observation(o, mode, f"environment {pool.name}.observe (slot {s})")
            for s, o in zip(slots, observations, strict=True)
        ]
        t_observed = time.perf_counter()
        texts: list[str] = [""] * n
        keys: list[str | None] = [None] * n
        steps: list[Any] = [None] * n

        def submit(start: int, piece: Any) -> None:
            decoded = self.tokenizer.batch_decode(piece.response, skip_special_tokens=True)
            for j, text in enumerate(decoded):
                i = start + j
                texts[i] = text
                key = parse_choice(text, mode.choices) if mode.choices else None
                keys[i] = key
                if mode.choices and key is None and not pool.accepts_output_errors:
                    steps[i] = pool.skip(slots[i])  # an output error is not an action
                else:
                    label = mode.choices[key] if mode.choices and key is not None else None
                    steps[i] = pool.step_async(slots[i], text, label, observations[i].state)

        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.eval()
        batch = self._generate(unwrapped, [r.messages for r in rows], submit)
        logprobs, values, ref_logprobs = self._score_forward(unwrapped, batch)
        extra = self._rewards(rows, batch, texts) if self.rewards is not None else None
        t_waiting = time.perf_counter()
        outcomes = collect(steps)
        t_done = time.perf_counter()

        env_rewards = [math.nan if o.reward is None else o.reward for o in outcomes]
        total = [0.0 if math.isnan(r) else r for r in env_rewards]
        if mode.choices:
            penalty = mode.output_error_penalty
            total = [t + (penalty if k is None else 0.0) for t, k in zip(total, keys, strict=True)]
        scores = torch.tensor(total, dtype=torch.float32, device=self.device)
        components: dict[str, list[float]] = {"environment": env_rewards}
        if extra is not None:
            scores = scores + extra[0]  # the configured rewards (missing_eos_penalty included)
            components.update(extra[1])
        elif self.cfg.ppo.missing_eos_penalty is not None:
            scores = scores - self.cfg.ppo.missing_eos_penalty * (~batch.finished).float()
        tally = env_tally(
            outcomes, texts, mode, graded=pool.reports_correct, info_keys=pool.info_keys
        )
        return {
            "batch": batch,
            "logprobs": logprobs,
            "values": values,
            "ref_logprobs": ref_logprobs,
            "scores": scores,
            "components": components,
            "tally": tally,
            "metrics": {
                "env/observe_wait_s": t_observed - t0,
                "env/step_wait_s": t_done - t_waiting,
            },
            "samples": [
                {
                    # What the policy saw (the mode's layout of the observation).
                    "prompt": r.messages[-1]["content"],
                    "completion": t,
                    "score": float(s),
                    "choice": mode.choices[k] if mode.choices and k is not None else None,
                    **{c: _float(v[i]) for c, v in components.items()},
                    "env": o.slot,
                    "episode": o.episode,
                    "step": o.step,
                    "done": o.done,
                    "info": plain_info(o.info),
                }
                for i, (r, t, s, k, o) in enumerate(
                    zip(rows, texts, scores.tolist(), keys, outcomes, strict=True)
                )
            ],
        }

    def _score_forward(self, unwrapped: Any, batch: Any) -> tuple[Any, Any, Any]:
        import torch

        from swallowctl.ppo.policy import CRITIC, adapter_mode, reference_mode

        chunk = self.plan.rollout_chunk
        lps, vals, refs = [], [], []
        with torch.no_grad():
            for i in range(0, batch.response.shape[0], chunk):
                part = batch.rows(slice(i, i + chunk))
                args = self._forward_args(part)
                lp, v, _ = unwrapped(*args, with_values=not self.critic_adapter)
                if self.critic_adapter:
                    with adapter_mode(unwrapped.peft, CRITIC):
                        _, v, _ = unwrapped(*args, with_logprobs=False)
                with reference_mode(unwrapped.peft):
                    ref, _, _ = unwrapped(*args, with_values=False)
                lps.append(lp)
                vals.append(v)
                refs.append(ref)
        return torch.cat(lps), torch.cat(vals), torch.cat(refs)

    def _rewards(self, rows: list[Any], batch: Any, texts: list[str]) -> tuple[Any, dict]:
        import torch

        from swallowctl.ppo.data import reward_columns

        ids = [
            r[m].tolist()
            for r, m in zip(batch.response.cpu(), batch.response_mask.cpu(), strict=True)
        ]
        assert self.rewards is not None
        result = self.rewards(
            prompts=[r.prompt_text for r in rows],
            completions=texts,
            completion_ids=ids,
            finished=batch.finished.tolist(),
            columns=reward_columns(rows),
            mode=self.cfg.data.mode,
        )
        scores = torch.tensor(result.total, dtype=torch.float32, device=self.device)
        if self.cfg.ppo.missing_eos_penalty is not None:
            scores = scores - self.cfg.ppo.missing_eos_penalty * (~batch.finished).float()
        return scores, result.components

    # --- deterministic evaluation ------------------------------------------------------------

    def _eval_due(self, update: int) -> bool:
        p = self.cfg.ppo
        return p.enable_deterministic_eval and update % p.deterministic_eval_frequency == 0

    def _greedy(self, conversations: list[list[dict[str, str]]]) -> Any:
        """Greedy answers, `per_device_eval_batch_size` prompts per generate call."""
        from swallowctl.ppo import rollout

        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.eval()
        prompts = rollout.encode_prompts(
            self.tokenizer, conversations, self.cfg.data.max_prompt_tokens
        )
        size = self.cfg.ppo.per_device_eval_batch_size
        pieces = []
        for i in range(0, len(prompts), size):
            q, qm = rollout.left_pad(prompts[i : i + size], self.pad_id)
            pieces.append(
                rollout.generate(
                    unwrapped.peft,
                    q.to(self.device),
                    qm.to(self.device),
                    self.cfg.generation,
                    self.stop_ids,
                    self.pad_id,
                    greedy=True,
                )
            )
        return rollout.concat(pieces, self.pad_id)

    def _evaluate(self) -> dict[str, float]:
        """Greedy answers to a fixed eval set, scored by the same rewards: `eval/*` metrics."""
        rows = self.eval_rows
        batch = self._greedy([r.messages for r in rows])
        texts = self.tokenizer.batch_decode(batch.response, skip_special_tokens=True)
        scores, components = self._rewards(rows, batch, texts)
        out = {"eval/score": float(scores.mean())}
        for label, values in components.items():
            finite = [v for v in values if v is not None and math.isfinite(v)]
            out[f"eval/{label}"] = sum(finite) / len(finite) if finite else float("nan")
        return out

    def _env_evaluate(self) -> Any:
        """Greedy episodes in fresh environments, the same seeds every time: this process's
        tally (`_env_eval_metrics` makes the `eval/*` metrics of every process's).

        `per_device_eval_batch_size` episodes per process, played side by side (process r plays
        episodes r, r + P, ...); the training pool is not touched. `eval/score` is the mean
        episode return, so `output.best_metric`'s default keeps the best adapter here too.
        """
        from swallowctl.infer.episodes import play_episodes
        from swallowctl.ppo.environment import CallPolicy

        cfg, env, acc = self.cfg, self.cfg.environment, self.accelerator
        assert env is not None
        size = cfg.ppo.per_device_eval_batch_size
        world, rank = acc.num_processes, acc.process_index

        def generate(conversations: list[list[dict[str, str]]]) -> list[str]:
            batch = self._greedy(conversations)
            return list(self.tokenizer.batch_decode(batch.response, skip_special_tokens=True))

        report = play_episodes(
            self.env_class,
            env.settings,
            cfg.user_sections,
            self.mode,
            generate,
            episodes=range(rank, size * world, world),
            seed=cfg.ppo.seed,
            mode_name=cfg.data.mode,
            policy=CallPolicy(timeout_s=env.timeout_s, retries=env.retries),
            parallel=size,
            concurrency=env.concurrency,
            graded=self.env_pool.reports_correct,
            info_keys=self.env_pool.info_keys,
        )
        return report.tally

    def _env_eval_metrics(self, tally: Any) -> dict[str, float]:
        out = {f"eval/{k.removeprefix('env/')}": v for k, v in self._merged(tally).items()}
        out["eval/score"] = out["eval/episode_return"]
        return out

    def _merged(self, tally: Any) -> dict[str, float]:
        """Environment metrics over every process: the same keys and values on each of them."""
        from swallowctl.ppo.environment import reduce_tally

        return reduce_tally(tally, self.accelerator.num_processes)

    def _keep_best(self, update: int, metrics: dict[str, float]) -> None:
        """`best/`: the adapter with the highest `output.best_metric` seen so far."""
        name = self.cfg.output.best_metric
        value = metrics.get(name)
        if value is None or not math.isfinite(value) or value <= self.best_value:
            return
        self.best_value = value
        self._together(
            lambda: checkpoint.save(
                self.run_dir,
                BEST,
                write_model=self._write_model,
                state={"update": update, name: value},
            ),
            main_only=True,
        )

    # --- advantages and the PPO update -------------------------------------------------------

    def _optimize(self, b: dict[str, Any]) -> dict[str, float]:

        p = self.cfg.ppo
        batch = b["batch"]
        mask = batch.response_mask
        rewards, non_score, kl = algo.shape_rewards(
            b["scores"], b["logprobs"], b["ref_logprobs"], mask, self.kl_coef, p.kl_estimator
        )
        # Statistics of the global batch: N processes x B rows learn as one process with N x B.
        sum_all = self._sum_all if self.accelerator.num_processes > 1 else None
        if p.whiten_rewards:
            rewards = algo.whiten_rewards(rewards, mask, sum_all)
        advantages, returns = algo.gae(rewards, b["values"], mask, p.gamma, p.lam)
        advantages = algo.whiten_advantages(advantages, mask, sum_all)

        stats = self._epochs(batch, b, advantages, returns)
        objective = algo.rollout_metrics(b["scores"], b["logprobs"], kl, non_score, mask)
        stats.update({k: float(v) for k, v in objective.items()})
        stats["val/num_eos_tokens"] = float(batch.finished.sum())
        stats["objective/kl_coef"] = self.kl_coef
        stats["objective/entropy_coef"] = self.entropy_coef
        for label, values in b["components"].items():
            finite = [v for v in values if v is not None and math.isfinite(v)]
            stats[f"reward/{label}"] = sum(finite) / len(finite) if finite else float("nan")
        stats.update(b.get("metrics", {}))  # choice/* and env/*: this update's window only
        return self._reduce(stats)

    def _epochs(
        self, batch: Any, b: dict[str, Any], advantages: Any, returns: Any
    ) -> dict[str, float]:
        """`ppo_epochs` x shuffled mini-batches x micro-batches with gradient accumulation."""
        import torch

        p = self.cfg.ppo
        n = batch.response.shape[0]
        micro = self.plan.sizes.micro_batch
        mini = n // p.num_mini_batches
        self.model.train()
        acc: dict[str, list[float]] = {}
        for _epoch in range(p.ppo_epochs):
            perm = torch.randperm(n, device=self.device)
            for mb_start in range(0, n, mini):
                mb_idx = perm[mb_start : mb_start + mini]
                for micro_start in range(0, len(mb_idx), micro):
                    idx = mb_idx[micro_start : micro_start + micro]
                    last_micro = micro_start + micro >= len(mb_idx)
                    # Gradients are all-reduced once per mini-batch, on its last micro-batch.
                    with (
                        contextlib.nullcontext()
                        if last_micro
                        else self.accelerator.no_sync(self.model)
                    ):
                        self._micro_step(batch, b, advantages, returns, idx, len(mb_idx), acc)
                self.accelerator.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        out = {k: sum(v) / len(v) for k, v in acc.items()}
        ratios = acc["val/ratio"]
        out["val/ratio_var"] = float(torch.tensor(ratios).var()) if len(ratios) > 1 else 0.0
        return out

    def _micro_step(
        self,
        batch: Any,
        b: dict[str, Any],
        advantages: Any,
        returns: Any,
        idx: Any,
        mini: int,
        acc: dict[str, list[float]],
    ) -> None:
        """Forward and backward of one micro-batch; its loss counts len(idx) / mini.

        A shared critic: one forward, one backward of policy + value loss. A critic adapter: the
        policy's pass (policy loss, entropy bonus), then the critic's pass (value loss) inside
        `adapter_mode`, each backward right after its forward, so the policy adapter gets no
        value-loss gradient and the critic adapter and head no policy-loss gradient.
        """
        import torch

        from swallowctl.ppo.policy import CRITIC, adapter_mode

        p = self.cfg.ppo
        part = batch.rows(idx)
        m = part.response_mask
        args = self._forward_args(part)

        def backward(loss: Any) -> None:
            finite = bool(torch.isfinite(loss))
            self._agree(None if finite else self._nan_error(float(loss.detach())))
            self.accelerator.backward(loss * len(idx) / mini * self._accum_scale)

        def value_loss(new_v: Any) -> Any:
            return algo.value_loss(new_v, b["values"][idx], returns[idx], m, p.cliprange_value)

        new_lp, new_v, ent = self.model(*args, with_values=not self.critic_adapter)
        pg = algo.policy_loss(new_lp, b["logprobs"][idx], advantages[idx], m, p.cliprange)
        bonus = algo.entropy_bonus(ent, m, self.entropy_coef, p.max_entropy_bonus)
        if not self.critic_adapter:
            vf = value_loss(new_v)
            backward(pg.loss + p.vf_coef * vf.loss - bonus)
        else:
            backward(pg.loss - bonus)
            unwrapped = self.accelerator.unwrap_model(self.model)
            with adapter_mode(unwrapped.peft, CRITIC):
                _, new_v, _ = self.model(*args, with_logprobs=False)
                vf = value_loss(new_v)
                backward(p.vf_coef * vf.loss)
        if self.device == "cpu":
            _release_freed_memory()
        for k, v in (
            ("policy/approxkl_avg", pg.approxkl),
            ("policy/clipfrac_avg", pg.clipfrac),
            ("loss/policy_avg", pg.loss),
            ("loss/value_avg", vf.loss),
            ("val/clipfrac_avg", vf.clipfrac),
            ("val/ratio", pg.ratio_mean),
            ("policy/entropy_avg", algo.masked_mean(ent, m)),
        ):
            acc.setdefault(k, []).append(float(v.detach()))

    def _forward_args(self, part: Any) -> tuple[Any, ...]:
        """The policy forward's arguments for `part`: the sampling temperature and top-p too, so
        log-probs are those of the distribution the tokens were drawn from."""
        g = self.cfg.generation
        return (
            part.input_ids,
            part.attention_mask,
            part.context_length,
            g.temperature,
            g.top_p,
            self.cfg.ppo.logits_chunk_size,
        )

    def _nan_error(self, value: float) -> SwallowError:
        last = checkpoint.latest(self.run_dir)
        return RuntimeFailure(
            f"the loss became {value} (not finite); training stopped before applying it",
            hint=(f"the last good checkpoint is {last}; " if last else "")
            # inf/NaN rewards never get this far (refused, or "no value"): a huge one does.
            + "lower ppo.lr or ppo.cliprange, check the rewards' scale, then --resume",
        )

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        """Average metrics over processes (a sync point; one small all-reduce per update)."""
        if self.accelerator.num_processes == 1:
            return stats
        import torch

        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], device=self.device, dtype=torch.float64)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist(), strict=True))

    def _sum_all(self, t: Any) -> Any:
        return self.accelerator.reduce(t, reduction="sum")

    def _first_across(self, value: Any) -> Any:
        """The non-None `value` of the lowest rank that has one, on every process (a sync point:
        one integer all-reduce; values are gathered only when some process has one)."""
        if self.accelerator.num_processes == 1:
            return value
        import torch
        from accelerate.utils import gather_object

        flag = torch.tensor([0 if value is None else 1], device=self.device)
        if int(self.accelerator.reduce(flag, reduction="sum").item()) == 0:
            return None
        return next(v for v in gather_object([value]) if v is not None)

    def _together(self, fn: Callable[[], Any], *, main_only: bool = False) -> Any:
        """`fn()` (on the main process only, with main_only); if it raises on any process,
        every process raises. Returns its result (None where it did not run)."""
        result, error = None, None
        if self.accelerator.is_main_process or not main_only:
            try:
                result = fn()
            except Exception as e:
                error = e
        self._agree(error)
        return result

    def _agree(self, error: BaseException | None) -> None:
        """If any process failed, every process raises (the others would wait forever in the
        next collective); the main process reports its own error or the first other one."""
        rank = self.accelerator.process_index
        shared = self._first_across(None if error is None else _portable(error, rank))
        if shared is None:
            return
        if error is None:
            exit_code, message, hint = shared
            error = SwallowError(message, hint=hint)
            error.exit_code = exit_code
        self._raise(error)

    def _raise(self, error: BaseException) -> NoReturn:
        """Raise an error every process raises; only the main one prints it."""
        if not self.accelerator.is_main_process:
            error.reported_by_main = True  # type: ignore[attr-defined]
        raise error

    def _update_controllers(self, stats: dict[str, float]) -> None:
        p = self.cfg.ppo
        if self.kl_ctl is not None:
            self.kl_coef = self.kl_ctl.update(stats["objective/kl"])
        if self.ent_ctl is not None:
            self.entropy_coef = self.ent_ctl.update(stats["policy/entropy_avg"])
        elif p.entropy_coef_phase1 is not None and p.entropy_transition_updates:
            phases = [
                c
                for c in (p.entropy_coef_phase1, p.entropy_coef_phase2, p.entropy_coef_phase3)
                if c is not None
            ]
            progress = stats["episode"] / self.plan.sizes.total_samples
            self.entropy_coef = algo.phase_coef(phases, p.entropy_transition_updates, progress)

    # --- checkpoints ------------------------------------------------------------------------

    def _should_save(self, update: int) -> bool:
        return update % self.cfg.output.save_steps == 0 and update < self.plan.sizes.total_updates

    def _write_model(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from swallowctl.ppo.policy import CRITIC, CRITIC_DIR, save_adapter

        unwrapped = self.accelerator.unwrap_model(self.model)
        save_adapter(unwrapped.peft, directory)
        if self.critic_adapter:
            save_adapter(unwrapped.peft, directory / CRITIC_DIR, CRITIC)
        head = {
            k: v.detach().cpu().contiguous() for k, v in unwrapped.value_head.state_dict().items()
        }
        save_file(head, directory / checkpoint.VALUE_HEAD, metadata={"format": "pt"})

    def _rank_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What differs between processes: RNG states and environment slots (JSON, tensors)."""
        import torch

        state = {
            "environment": self.env_pool.state_dict() if self.env_pool is not None else None,
            "python_random": _jsonable_random_state(),
        }
        # Sampling and mini-batch shuffles draw from torch's RNG: restoring it makes a resumed
        # run continue exactly as an uninterrupted one.
        tensors = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["cuda_rng"] = torch.cuda.get_rng_state()
        return state, tensors

    def _save(self, update: int) -> None:
        """The main process writes; every process's own RNG state goes in (gathered first), and
        no process goes on until the checkpoint is complete (or failed, for all)."""
        mine = self._rank_state()
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        else:
            ranks = [mine]
        self._together(lambda: self._write_checkpoint(update, ranks), main_only=True)

    def _write_checkpoint(
        self, update: int, ranks: list[tuple[dict[str, Any], dict[str, Any]]]
    ) -> None:
        state = {
            "update": update,
            "num_processes": self.accelerator.num_processes,
            "kl_coef": self.kl_coef,
            "entropy_coef": self.entropy_coef,
            "kl_ctl": self.kl_ctl.state_dict() if self.kl_ctl else None,
            "ent_ctl": self.ent_ctl.state_dict() if self.ent_ctl else None,
            "monitor": self.monitor.state_dict() if self.monitor else None,
            "best_value": self.best_value if math.isfinite(self.best_value) else None,
            # The prompt cursor is the same in every process (they walk one global order).
            "data": self.stream.state_dict() if self.stream is not None else None,
            **ranks[0][0],
        }
        tensors = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **ranks[0][1],
        }
        if len(ranks) > 1:  # process i resumes from ranks[i]
            state["ranks"] = [r[0] for r in ranks]
            tensors["ranks"] = [r[1] for r in ranks]
        checkpoint.save(
            self.run_dir,
            f"checkpoint-{update}",
            write_model=self._write_model,
            state=state,
            tensors=tensors,
        )
        checkpoint.prune(self.run_dir, self.cfg.output.save_total_limit)

    def _load(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state, tensors = checkpoint.load(path)
        rank = self.accelerator.process_index
        own_state, own_tensors = (
            (state["ranks"][rank], tensors["ranks"][rank]) if "ranks" in state else (state, tensors)
        )

        from swallowctl.ppo.policy import CRITIC, CRITIC_DIR, POLICY, load_adapter_weights

        critic_saved = "adapter" if (path / CRITIC_DIR).is_dir() else "shared"
        if critic_saved != self.cfg.lora.critic:
            raise UsageError(
                f"{path} was trained with lora.critic: {critic_saved}; this config says "
                f"{self.cfg.lora.critic}",
                hint=f"resume with lora.critic: {critic_saved}",
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        load_adapter_weights(unwrapped.peft, path, POLICY, self.device)
        if self.critic_adapter:
            load_adapter_weights(unwrapped.peft, path / CRITIC_DIR, CRITIC, self.device)
        unwrapped.value_head.load_state_dict(
            load_file(path / checkpoint.VALUE_HEAD, device=self.device)
        )
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        self.kl_coef, self.entropy_coef = state["kl_coef"], state["entropy_coef"]
        for ctl, key in (
            (self.kl_ctl, "kl_ctl"),
            (self.ent_ctl, "ent_ctl"),
            (self.monitor, "monitor"),
        ):
            if ctl is not None and state[key] is not None:
                ctl.load_state_dict(state[key])
        self._load_inputs(path, state, own_state)
        best = state.get("best_value")
        self.best_value = -math.inf if best is None else float(best)
        torch.set_rng_state(own_tensors["torch_rng"])
        if torch.cuda.is_available() and "cuda_rng" in own_tensors:
            torch.cuda.set_rng_state(own_tensors["cuda_rng"])
        _restore_random_state(own_state["python_random"])
        self.start_update = int(state["update"])
        log.info("resumed from %s (update %d)", path, self.start_update)

    def _load_inputs(self, path: Path, state: dict[str, Any], own: dict[str, Any]) -> None:
        """The data cursor, or this process's environment pool's counters, seeds and states."""
        saved_env = own.get("environment")
        if (saved_env is not None) != (self.env_pool is not None):
            then, now = (
                ("an environment", "prompts") if saved_env else ("prompts", "an environment")
            )
            raise UsageError(
                f"{path} was trained from {then}; this config trains from {now}",
                hint="resume with the config the run was started with",
            )
        if self.env_pool is not None:
            self.env_pool.load_state_dict(saved_env)
        else:
            assert self.stream is not None
            self.stream.load_state_dict(state["data"])

    def _write_config(self) -> None:
        if self.accelerator.is_main_process:
            (self.run_dir / "config.yaml").write_text(
                render_yaml(self.cfg, self.plan.sizes), encoding="utf-8"
            )

    def _save_final(self, update: int, last: dict[str, float]) -> Path | None:
        """`final/`: adapter, value head, tokenizer and a manifest naming the exact base."""
        import json

        def write(directory: Path) -> None:
            self._write_model(directory)
            self.tokenizer.save_pretrained(directory)
            manifest = final_manifest(self.cfg, self.resolved, update, last)
            (directory / MANIFEST).write_text(
                json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8"
            )

        return self._together(
            lambda: checkpoint.save(
                self.run_dir, FINAL, write_model=write, state={"update": update}
            ),
            main_only=True,
        )


def final_manifest(
    cfg: SwallowConfig, resolved: ResolvedModel, updates: int, metrics: dict[str, float]
) -> dict[str, Any]:
    """Provenance of a trained adapter: which base (id and commit), which run, which config."""
    return {
        "swallowctl": __version__,
        "algorithm": "ppo",
        # The policy adapter is at the top; a critic adapter (not needed to infer) in critic/.
        "critic": "adapter" if cfg.lora.critic == "adapter" else "shared",
        "base_model": {
            "name": cfg.model.name_or_path,
            "model_id": resolved.model_id,
            "revision": cfg.model.revision,
            "commit": resolved.commit,
        },
        "updates": updates,
        "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
        "config": redacted(dump_config(cfg)),  # travels with the adapter: no secrets
    }


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # this process's own libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim).

    On the CPU a micro-batch's activations are freed after its backward, but glibc keeps big
    freed blocks in its heap once its mmap threshold has risen, so RSS climbs by fragments. One
    trim per micro-batch lowered the CPU benchmark's peak RSS by ~20 MiB of ~555, at no
    measurable cost in time (benchmarks/README.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _float(v: Any) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _portable(error: BaseException, rank: int) -> tuple[int, str, str | None]:
    """(exit code, message, hint) of an error, to raise the same on the other processes."""
    where = f"process {rank}: " if rank else ""
    if isinstance(error, SwallowError):
        return error.exit_code, where + error.message, error.hint
    return 1, f"{where}unexpected {type(error).__name__}: {error}", "run again with --verbose"


def _jsonable_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_random_state(state: list[Any]) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))
