"""A policy playing whole episodes inside an environment: `infer --env` and training's env eval.

The policy is any `generate(conversations) -> answers` function (an inference backend's greedy
batch, or the trainer's greedy rollout), so both paths run the same episodes the same way.
Episodes run side by side, `parallel` at a time, one environment instance each; every round
generates one answer per running episode in one batch, then steps them concurrently. Episode i
is reset with `eval_episode_seed(seed, i)`: a run is repeatable, and apart from training's
episodes. Which instance plays which episode is decided in episode order, never by timing.

An answer that is none of the mode's choices is scored `output_error_penalty`; unless the class
sets `accepts_output_errors`, the environment is not stepped with it, and the episode ends there
(greedy decoding would give the same answer to the same observation again).

Imports no torch: the trainer and the CLI both use it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from swallowctl.core import console
from swallowctl.core.errors import UsageError
from swallowctl.core.modes import ModeSpec
from swallowctl.infer import GenerationSettings, InferenceBackend, Message
from swallowctl.ppo.environment import (
    CORRECT_KEY,
    CallPolicy,
    Observation,
    StepOutcome,
    Tally,
    call,
    check_step_result,
    class_name,
    close,
    collect,
    construct,
    env_tally,
    eval_episode_seed,
    finish_tally,
    observe,
    plain_info,
    render_observation,
    reset,
)

if TYPE_CHECKING:
    from swallowctl.core.config import SwallowConfig

Generate = Callable[[list[list[Message]]], list[str]]
End = Literal["done", "output_error", "max_steps"]


@dataclass
class EpisodeStep:
    """One decision: what the policy saw and answered, and what the environment made of it."""

    episode: int
    seed: int
    step: int
    messages: list[Message]
    state: dict[str, Any]
    answer: str
    choice: str | None  # the mode's key the answer parsed to (None: output error / free text)
    label: str | None
    env_reward: float | None  # None: the environment was not stepped (an output error)
    reward: float  # env_reward plus the output error penalty, as training scores it
    done: bool  # what the environment said (False when it was not stepped)
    info: dict[str, Any]
    seconds: float
    end: End | None = None  # set on an episode's last step: why it ended

    def to_json(self) -> dict[str, Any]:
        return {
            "episode": self.episode,
            "seed": self.seed,
            "step": self.step,
            "observation": self.messages,
            "state": self.state,
            "answer": self.answer,
            "choice": self.choice,
            "label": self.label,
            "reward": self.reward,
            "env_reward": self.env_reward,
            "done": self.done,
            "end": self.end,
            "info": plain_info(self.info),
        }


@dataclass
class Episode:
    index: int
    seed: int
    ret: float
    length: int
    end: End


@dataclass
class EpisodesReport:
    """Per-episode returns and the tally of every step (merge tallies across processes)."""

    environment: str
    mode: str
    seed: int
    episodes: list[Episode] = field(default_factory=list)
    tally: Tally = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`env/*` and `choice/*` over every step of every episode (as training names them)."""
        return finish_tally(self.tally)

    def to_json(self) -> dict[str, Any]:
        m = self.metrics()
        returns = [e.ret for e in self.episodes]
        labels = {
            k.removeprefix("choice/"): _num(v)
            for k, v in m.items()
            if k.startswith("choice/") and k != "choice/accuracy"
        }
        return {
            "environment": self.environment,
            "mode": self.mode,
            "seed": self.seed,
            "episodes": len(self.episodes),
            "steps": sum(e.length for e in self.episodes),
            "mean_return": _num(m.get("env/episode_return", math.nan)),
            "min_return": min(returns) if returns else None,
            "max_return": max(returns) if returns else None,
            "mean_length": _num(m.get("env/episode_length", math.nan)),
            "accuracy": _num(m.get("choice/accuracy", math.nan)),
            "output_errors": round(self.tally.get("choice/output_error", (0.0, 0.0))[0]),
            "choices": labels,
            "info": {
                k.removeprefix("env/info/"): _num(v)
                for k, v in m.items()
                if k.startswith("env/info/")
            },
            "per_episode": [
                {
                    "episode": e.index,
                    "seed": e.seed,
                    "return": e.ret,
                    "length": e.length,
                    "end": e.end,
                }
                for e in self.episodes
            ],
        }


def _num(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


@dataclass
class _Running:
    env: Any
    index: int = -1
    seed: int = 0
    step: int = 0
    ret: float = 0.0
    obs: Observation | None = None


class _Player:
    """The calls of one `play_episodes`: each names `module:Class.method (episode i, step t)`."""

    def __init__(self, cls: type, mode: ModeSpec, policy: CallPolicy) -> None:
        self.name, self.mode, self.policy = class_name(cls), mode, policy
        self.accepts_output_errors = bool(getattr(cls, "accepts_output_errors", False))

    def where(self, r: _Running, method: str) -> str:
        return f"environment {self.name}.{method} (episode {r.index}, step {r.step})"

    def begin(self, r: _Running, index: int, seed: int) -> None:
        r.index, r.seed, r.step, r.ret = index, seed, 0, 0.0
        reset(r.env, seed, self.policy, self.where(r, "reset"))
        r.obs = observe(r.env, self.policy, self.where(r, "observe"))

    def step(self, r: _Running, messages: list[Message], answer: str) -> EpisodeStep:
        mode, obs = self.mode, r.obs
        assert obs is not None
        key = _parse(answer, mode)
        label = mode.choices[key] if mode.choices and key is not None else None
        error = bool(mode.choices) and key is None
        penalty = mode.output_error_penalty if error else 0.0
        env_reward, done, info, seconds = None, False, {}, 0.0
        if not error or self.accepts_output_errors:
            where = self.where(r, "step")
            value, seconds = call(r.env, "step", (answer, label, obs.state), self.policy, where)
            result = check_step_result(value, where)
            env_reward, done, info = result.reward, result.done, result.info
        return EpisodeStep(
            episode=r.index,
            seed=r.seed,
            step=r.step,
            messages=messages,
            state=obs.state,
            answer=answer,
            choice=key,
            label=label,
            env_reward=env_reward,
            reward=(env_reward or 0.0) + penalty,
            done=done,
            info=info,
            seconds=seconds,
        )

    def next_observation(self, r: _Running) -> None:
        r.obs = observe(r.env, self.policy, self.where(r, "observe"))

    def prompt(self, r: _Running) -> list[Message]:
        assert r.obs is not None, "begin() observes first"
        return render_observation(r.obs, self.mode, self.where(r, "observe")).messages


def _parse(text: str, mode: ModeSpec) -> str | None:
    from swallowctl.infer.session import parse

    return parse(text, mode)


def _end(s: EpisodeStep, length: int, max_steps: int) -> End | None:
    if s.env_reward is None:
        return "output_error"
    if s.done:
        return "done"
    return "max_steps" if length >= max_steps else None


def play_episodes(
    cls: type,
    settings: Mapping[str, Any],
    sections: Mapping[str, Any],
    mode: ModeSpec,
    generate: Generate,
    *,
    episodes: Sequence[int],
    seed: int,
    mode_name: str = "",
    policy: CallPolicy | None = None,
    parallel: int = 8,
    concurrency: int = 8,
    max_steps: int = 100,
    on_step: Callable[[EpisodeStep], None] | None = None,
    graded: bool = False,
    info_keys: Iterable[str] = (),
) -> EpisodesReport:
    """Play the episodes numbered `episodes` to their end with `generate`'s answers.

    Each episode ends when the environment says done, at an output error it is not stepped with,
    or after `max_steps` steps. `on_step` sees every step as it happens (in round order).
    `graded` and `info_keys` carry what training already knows of the environment (it reports
    info['correct']; these info keys), so the report has those metrics even when no step did.

    Raises:
        RuntimeFailure: an environment call failed, timed out or returned a wrong type, naming
            `module:Class.method` and the episode and step.
    """
    policy = policy or CallPolicy()
    player = _Player(cls, mode, policy)
    report = EpisodesReport(player.name, mode_name or "(given)", seed)
    queue = deque(episodes)
    envs = [construct(cls, settings, sections) for _ in range(min(parallel, len(queue)))]
    outcomes: list[StepOutcome] = []
    texts: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max(concurrency, 1), "episode") as pool:

        def each(fn: Callable[..., Any], *columns: Sequence[Any]) -> list[Any]:
            return collect([pool.submit(fn, *args) for args in zip(*columns, strict=True)])

        def begin(runs: list[_Running]) -> None:
            # Episode numbers are handed out in order here, never by which call finishes first.
            numbers = [queue.popleft() for _ in runs]
            each(lambda r, i: player.begin(r, i, eval_episode_seed(seed, i)), runs, numbers)

        try:
            running = [_Running(env) for env in envs]
            begin(running)
            while running:
                prompts = [player.prompt(r) for r in running]
                answers = generate(prompts)
                steps: list[EpisodeStep] = each(player.step, running, prompts, answers)
                again, ended = [], []
                for r, s in zip(running, steps, strict=True):
                    r.step, r.ret = r.step + 1, r.ret + s.reward
                    s.end = end = _end(s, r.step, max_steps)
                    finished = (r.ret, r.step) if end else None
                    outcomes.append(
                        StepOutcome(
                            0, s.episode, s.step, s.env_reward, s.done, s.info, s.seconds, finished
                        )
                    )
                    texts.append(s.answer)
                    graded = graded or CORRECT_KEY in s.info
                    if on_step is not None:
                        on_step(s)
                    if end:
                        report.episodes.append(
                            Episode(r.index, r.seed, round(r.ret, 6), r.step, end)
                        )
                        ended.append(r)
                    else:
                        again.append(r)
                each(player.next_observation, again)
                starting = ended[: len(queue)]
                begin(starting)
                running = again + starting
        finally:
            for env in envs:
                close(env, f"{player.name}.close", policy.timeout_s)
    report.episodes.sort(key=lambda e: e.index)
    report.tally = env_tally(outcomes, texts, mode, graded=graded, info_keys=info_keys)
    return report


def play_backend(
    backend: InferenceBackend,
    settings: GenerationSettings,
    cfg: SwallowConfig,
    cls: type,
    mode: ModeSpec,
    mode_name: str,
    *,
    episodes: int,
    seed: int,
    batch_size: int = 8,
    max_steps: int = 100,
    output: Path | None = None,
    on_step: Callable[[EpisodeStep], None] | None = None,
) -> EpisodesReport:
    """`infer --env`: episodes 0..N-1 with a backend's answers (batches of `batch_size`), the
    config's environment settings, sections, timeouts and retries (as in training), and every
    step written to `output` when given (and handed to `on_step`)."""
    section = cfg.environment
    policy = CallPolicy(section.timeout_s, section.retries) if section else CallPolicy()

    def generate(conversations: list[list[Message]]) -> list[str]:
        return [c.text for c in backend.generate_batch(conversations, settings)]

    with step_writer(output) if output else contextlib.nullcontext() as write:

        def seen(step: EpisodeStep) -> None:
            for fn in (write, on_step):
                if fn is not None:
                    fn(step)

        return play_episodes(
            cls,
            section.settings if section else {},
            cfg.user_sections,
            mode,
            generate,
            episodes=range(episodes),
            seed=seed,
            mode_name=mode_name,
            policy=policy,
            parallel=batch_size,
            concurrency=section.concurrency if section else 8,
            max_steps=max_steps,
            on_step=seen,
        )


# --- the steps file and the text report ---------------------------------------------------------


def check_steps_path(path: Path) -> None:
    """Refused before anything loads: a steps file is never written over."""
    if path.exists() and (not path.is_file() or path.stat().st_size > 0):
        raise UsageError(
            f"--output {path}: already exists; the steps of this evaluation go to a new file",
            hint="give another --output, or delete the old one",
        )


@contextlib.contextmanager
def step_writer(path: Path) -> Iterator[Callable[[EpisodeStep], None]]:
    """`on_step` for `play_episodes`: every step as one JSONL row of `path`, flushed as it comes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("x" if not path.exists() else "w", encoding="utf-8") as f:

        def write(step: EpisodeStep) -> None:
            f.write(json.dumps(step.to_json(), ensure_ascii=False, default=str) + "\n")
            f.flush()

        yield write


@contextlib.contextmanager
def episode_progress(total: int) -> Iterator[Callable[[EpisodeStep], None]]:
    """Episodes and steps done on stderr; yields an `on_step` for `play_backend`."""
    bar = Progress(
        TextColumn("episodes {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[steps]} steps"),
        TimeElapsedColumn(),
        console=console.err,
        disable=console.state.quiet,
    )
    task = bar.add_task("episodes", total=total, steps=0)
    steps = 0

    def on_step(step: EpisodeStep) -> None:
        nonlocal steps
        steps += 1
        bar.update(task, advance=step.end is not None, steps=steps)

    with bar:
        yield on_step


def render_summary(report: EpisodesReport) -> list[str]:
    """The headline numbers as text lines (the CLI prints them, then the per-episode table)."""
    d = report.to_json()

    def f(x: float | None, signed: bool = False) -> str:
        return "n/a" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")

    lines = [
        f"{d['environment']} (mode {d['mode']}), seed {d['seed']}: {d['episodes']} episode(s), "
        f"{d['steps']} step(s)",
        f"return: mean {f(d['mean_return'], True)} (min {f(d['min_return'], True)}, max "
        f"{f(d['max_return'], True)}); length: mean {f(d['mean_length'])}",
    ]
    if d["choices"]:
        shares = ", ".join(f"{k} {f(v)}" for k, v in d["choices"].items())
        lines.append(f"choices (share of steps): {shares}; {d['output_errors']} output error(s)")
        why = (
            " (no answer was a choice, so the environment graded none)"
            if d["accuracy"] is None and d["output_errors"] == d["steps"]
            else ""
        )
        lines.append(f"accuracy (info['correct']): {f(d['accuracy'])}{why}")
    if d["info"]:
        lines.append("info (means): " + ", ".join(f"{k} {f(v)}" for k, v in d["info"].items()))
    return lines
