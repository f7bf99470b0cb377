"""Environments: the user's world a policy acts in (reset / observe / step), run as a pool.

The interface (the config names the class: `environment.entrypoint: package.module:Class`)::

    class MyEnv:
        def __init__(self, settings: dict, sections: dict) -> None: ...
        def reset(self, seed: int) -> None: ...
        def observe(self) -> Observation: ...
        def step(self, completion: str, choice: str | None, state: dict) -> StepResult: ...

- `settings` is `environment.settings` from the config; `sections` holds the config's sections
  swallowctl does not own (`env`, `scorer`, `llm`, ...), as plain dicts.
- `reset(seed)` starts an episode. Seeds are derived from `ppo.seed`, the process, the slot and
  the episode number, so every run (and every resume) sees the same episodes.
- `observe()` returns an `Observation`: either chat `messages` (used as they are; the mode's
  system prompt is put first when they have none), or `fields` laid out by the mode's `template`
  (`str.format`; the built-in `intervention` mode's template is `{prompt}`, see
  `intervention_fields`). `state` is any dict: the sample carries a copy of it (taken when
  observed) and hands it back to `step`.
- `step(completion, choice, state)` scores one sample against the `state` it was generated from.
  `completion` is the decoded answer; `choice` is the label the mode's `choices` map the answer to
  (e.g. `"bridge"` for "2" in `intervention`), or None for a free-text mode. Return
  `StepResult(reward, done, info)`; `done` ends the episode (the slot is reset with the next
  seed); `info` holds anything to log: numeric values are logged as means (`env/info/<key>`), and
  `info["correct"]`, the label (or key) of the right choice, gives `choice/accuracy`.

Optional, picked up when present:
- `accepts_output_errors = True` (class attribute): also step the environment when the answer is
  none of the mode's choices (`choice=None`); by default such a sample is not stepped, it scores
  the mode's `output_error_penalty` and its slot keeps the same observation for the next update.
  When it is stepped, the penalty and the environment's reward are added.
- `state_dict() -> dict` (JSON-able) and `load_state_dict(dict)`: saved in checkpoints, so a
  resumed run continues each episode where it was. Without them a resumed run restarts each slot's
  current episode from that episode's seed (episode numbers and seeds are always saved).
- `close()`: called once when training ends.

How the trainer uses it (`EnvPool`): one environment per batch slot (`num_envs`, default the
samples per update of a process; more than that are used in turn). Every sample is generated from
its own slot's observation and stepped exactly once, with that observation's `state`. Steps are
submitted as soon as their chunk of completions is generated and run in a thread pool
(`concurrency`) while the trainer computes log-probs; the next observation of each slot (reset
first when the episode ended) is fetched in the background during the PPO update. A slot never
has two calls in flight. Greedy evaluation episodes (`ppo.enable_deterministic_eval`, and
`swallowctl infer --env`) run in instances of their own: see `swallowctl.infer.episodes`.

Failures: each call has `timeout_s`. An exception is retried `retries` times (same arguments):
`step` must leave the environment unchanged when it raises, or use `retries: 0`. A call that times
out is not retried: Python cannot stop it, and a retry would run beside it on the same object (the
double-step our users' patched TRL suffered). Put timeouts and retries of slow API calls inside the
environment (see examples/openai_env.py). Every error names `module:Class.method`, the slot, the
episode and the step.
"""

from __future__ import annotations

import concurrent.futures
import copy
import inspect
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from swallowctl.core.errors import ConfigError, DataError, RuntimeFailure, SwallowError
from swallowctl.core.modes import ModeSpec
from swallowctl.core.userimport import import_attr
from swallowctl.ppo.data import PromptRow, check_row, render_messages

log = logging.getLogger(__name__)

METHODS = ("reset", "observe", "step")
CORRECT_KEY = "correct"  # info key naming the right choice (label or key): choice/accuracy

Message = dict[str, str]


@dataclass
class Observation:
    """What the policy sees: `messages` or `fields` (for the mode's template), plus `state`."""

    messages: list[Message] | None = None
    fields: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """The environment's answer to one sample."""

    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    """The methods swallowctl calls (see the module docstring for the optional ones)."""

    def reset(self, seed: int) -> None: ...

    def observe(self) -> Observation: ...

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult: ...


# --- the intervention protocol -------------------------------------------------------------------

EDGES = ("AB", "BC", "CA")


def intervention_fields(
    *,
    utterances: Sequence[str],
    target_utterances: Sequence[str],
    scores: Mapping[str, float],
    edge: str,
    target: str,
    topic: str | None = None,
) -> dict[str, Any]:
    """Fields for the built-in `intervention` mode: `prompt` laid out in Japanese, plus columns.

    `utterances` are recent lines ("A: ..."), `target_utterances` the target speaker's own recent
    lines (without the name), `scores` the relation scores by edge ("AB", "BC", "CA"), `edge` the
    edge to improve and `target` the speaker on it. The target's utterances come last, so what
    reveals their need sits right before the answer. The columns (`utterances`, `scores`,
    `w_AB`, ..., `edge`, `target`) are those of `builtin:prompts-ja`'s intervention rows, so a
    user mode can lay them out its own way.
    """
    missing = [e for e in EDGES if e not in scores]
    if missing or edge not in EDGES or target not in edge:
        raise ValueError(
            f"intervention_fields needs scores for {', '.join(EDGES)}, an edge among them and a "
            f"target on it (got edges {sorted(scores)}, edge {edge!r}, target {target!r})"
        )
    score_text = ", ".join(f"w_{e}={scores[e]:+.2f}" for e in EDGES)
    lines = [f"話題: {topic}"] if topic else []
    lines += ["直近の会話:", *utterances]
    lines += [
        f"関係スコア(-1〜+1): {score_text}",
        f"改善したい関係: {edge[0]}-{edge[1]}",
        f"対象の話者: {target}",
        f"{target}さんの最近の発言:",
        *(f"「{u}」" for u in target_utterances),
    ]
    out: dict[str, Any] = {
        "prompt": "\n".join(lines),
        "utterances": "\n".join(utterances),
        "target_utterances": "\n".join(target_utterances),
        "scores": score_text,
        "edge": edge,
        "target": target,
        **{f"w_{e}": float(scores[e]) for e in EDGES},
    }
    if topic:
        out["topic"] = topic
    return out


# --- loading -------------------------------------------------------------------------------------


def load_environment_class(spec: str, *, where: str = "environment.entrypoint") -> type:
    """Import `package.module:Class` (only that module) and check it has reset/observe/step.

    The current directory is searched after sys.path, as `python -m` would, so an `my_env.py`
    beside the config works.

    Raises:
        ConfigError: a malformed spec, a module that cannot be imported, a missing attribute, or
            something that is not a class with the three methods.
    """
    obj = import_attr(
        spec, where=where, kind="Class", example="examples.intervention_env:InterventionEnv"
    )
    if not inspect.isclass(obj):
        raise ConfigError(
            f"{where}: '{spec}' is a {type(obj).__name__}, not a class",
            hint="name a class with reset(seed), observe() and step(completion, choice, state)",
        )
    lacking = [m for m in METHODS if not callable(getattr(obj, m, None))]
    if lacking:
        raise ConfigError(
            f"{where}: {spec} has no {', '.join(lacking)} method",
            hint="an environment needs reset(seed), observe() and step(completion, choice, state)",
        )
    return obj


def class_name(cls: type) -> str:
    """`module:Class`, as the config spells an entrypoint (errors name this)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def construct(cls: type, settings: Mapping[str, Any], sections: Mapping[str, Any]) -> Any:
    """`cls(settings, sections)`; a failure names `module:Class.__init__`."""
    try:
        return cls(dict(settings), dict(sections))
    except Exception as e:
        raise RuntimeFailure(
            f"environment {class_name(cls)}.__init__ failed: {type(e).__name__}: {e}",
            hint="it is called as Class(settings: dict, sections: dict); run with --verbose "
            "for the traceback",
        ) from e


# --- checking what user code returns -------------------------------------------------------------


def _type(value: Any) -> str:
    return type(value).__name__


def check_observation(value: Any, where: str) -> Observation:
    """The value `observe()` returned, checked; RuntimeFailure names `where` otherwise."""
    if not isinstance(value, Observation):
        raise RuntimeFailure(
            f"{where} returned {_type(value)}, expected Observation",
            hint="return Observation(messages=[...] or fields={...}, state={...}) from "
            "swallowctl.ppo.environment",
        )
    if (value.messages is None) == (value.fields is None):
        raise RuntimeFailure(
            f"{where} returned an Observation with neither or both of messages and fields; give one"
        )
    if value.messages is not None:
        problem = check_row({"messages": value.messages})
        if problem is not None:
            raise RuntimeFailure(f"{where}: Observation.messages: {problem}")
    if value.fields is not None and not (
        isinstance(value.fields, dict) and all(isinstance(k, str) for k in value.fields)
    ):
        raise RuntimeFailure(
            f"{where}: Observation.fields must be a dict with str keys, got {_type(value.fields)}"
        )
    if not isinstance(value.state, dict):
        raise RuntimeFailure(f"{where}: Observation.state must be a dict, got {_type(value.state)}")
    return value


def _is_bool(value: Any) -> bool:
    # numpy's bool_ is not a bool subclass; accept it by name rather than import numpy here.
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def check_step_result(value: Any, where: str) -> StepResult:
    """The value `step()` returned, checked: a finite number, a bool and a dict with str keys."""
    if not isinstance(value, StepResult):
        raise RuntimeFailure(
            f"{where} returned {_type(value)}, expected StepResult",
            hint="return StepResult(reward=float, done=bool, info=dict) from "
            "swallowctl.ppo.environment",
        )
    r = value.reward
    if isinstance(r, str | bytes) or _is_bool(r):
        raise RuntimeFailure(f"{where}: StepResult.reward is {_type(r)} {r!r}, expected a number")
    try:
        reward = float(r)
    except (TypeError, ValueError):
        raise RuntimeFailure(
            f"{where}: StepResult.reward is {_type(r)} {r!r}, expected a number"
        ) from None
    if not math.isfinite(reward):
        raise RuntimeFailure(f"{where}: StepResult.reward is {reward}, expected a finite number")
    if not _is_bool(value.done):
        raise RuntimeFailure(
            f"{where}: StepResult.done is {_type(value.done)} {value.done!r}, expected a bool"
        )
    if not (isinstance(value.info, dict) and all(isinstance(k, str) for k in value.info)):
        raise RuntimeFailure(
            f"{where}: StepResult.info must be a dict with str keys, got {_type(value.info)}"
        )
    return StepResult(reward, bool(value.done), value.info)


def check_none(value: Any, where: str) -> None:
    if value is not None:
        raise RuntimeFailure(f"{where} returned {_type(value)}, expected None")


def numeric_info(info: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers (bools as 0/1) of an `info` dict: what gets logged as means."""
    out: dict[str, float] = {}
    for k, v in info.items():
        if isinstance(v, str | bytes) or not (isinstance(v, int | float) or _is_bool(v)):
            continue
        x = float(v)
        if math.isfinite(x):
            out[k] = x
    return out


def plain_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """An `info` dict as valid JSON for the run's files: finite numbers, str, bool, None."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, bool | str) or v is None:
            out[k] = v
        elif isinstance(v, int | float):
            out[k] = float(v) if math.isfinite(v) else None
    return out


def render_observation(obs: Observation, mode: ModeSpec, where: str) -> PromptRow:
    """The chat messages the policy is prompted with, and the columns reward functions receive.

    Columns: the observation's `fields` (if any) plus `env_state`, its state.
    """
    row: dict[str, Any] = (
        {"messages": obs.messages} if obs.messages is not None else dict(obs.fields or {})
    )
    try:
        messages = render_messages(row, mode, where=where)
    except DataError as e:
        hint = "make observe() give the fields the mode's template names"
        raise DataError(e.message, hint=hint) from None
    columns = {k: v for k, v in row.items() if k != "messages" and v is not None}
    columns["env_state"] = obs.state
    return PromptRow(messages=messages, columns=columns, where=where)


# --- calls with a timeout ------------------------------------------------------------------------


class _TimedOut(Exception):
    pass


def call_with_timeout(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
    """Run `fn(*args)` in a daemon thread; raise _TimedOut after `timeout_s`.

    A daemon thread, not a pool worker: a hung call must never keep the interpreter from exiting.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="env-call", daemon=True).start()
    if not done.wait(timeout_s):
        raise _TimedOut
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass(frozen=True)
class CallPolicy:
    """Limits of every environment call."""

    timeout_s: float = 120.0
    retries: int = 2
    backoff_s: float = 0.5


def call(
    env: Any, method: str, args: tuple[Any, ...], policy: CallPolicy, where: str
) -> tuple[Any, float]:
    """`env.method(*args)` with timeout and retries; returns (value, seconds of the last attempt).

    Raises:
        RuntimeFailure: a timeout (never retried) or an exception after every retry, naming
            `where` (`module:Class.method (slot i, ...)`).
    """
    fn = getattr(env, method)
    attempts = policy.retries + 1
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(policy.backoff_s * 2 ** (attempt - 1), 10.0))
        start = time.perf_counter()
        try:
            return call_with_timeout(fn, args, policy.timeout_s), time.perf_counter() - start
        except _TimedOut:
            raise RuntimeFailure(
                f"{where} timed out after {policy.timeout_s:g}s; a hung call cannot be stopped "
                "or safely retried, so training stops",
                hint="raise environment.timeout_s, or time out slow API calls inside the "
                "environment (and retry them there)",
            ) from None
        except Exception as e:
            last = e
            log.warning(
                "%s: attempt %d of %d: %s: %s", where, attempt + 1, attempts, type(e).__name__, e
            )
    assert last is not None
    cause = last.message if isinstance(last, SwallowError) else f"{type(last).__name__}: {last}"
    raise RuntimeFailure(
        f"{where} failed after {attempts} attempt(s): {cause}",
        hint="run with --verbose for the traceback",
    ) from last


def reset(env: Any, seed: int, policy: CallPolicy, where: str) -> None:
    """`env.reset(seed)` through `call`, checked to return None."""
    value, _ = call(env, "reset", (seed,), policy, where)
    check_none(value, where)


def observe(env: Any, policy: CallPolicy, where: str) -> Observation:
    """`env.observe()` through `call`, checked, with a copy of its state."""
    value, _ = call(env, "observe", (), policy, where)
    obs = check_observation(value, where)
    try:
        # The sample carries a copy: an environment that later edits the dict it returned
        # (its own live state) cannot change the state the sample is scored against.
        obs.state = copy.deepcopy(obs.state)
    except Exception as e:  # a state holding something uncopyable is passed as it is
        log.debug("%s: state not copied: %s", where, e)
    return obs


# --- the pool ------------------------------------------------------------------------------------


def episode_seed(seed: int, rank: int, slot: int, episode: int) -> int:
    """The seed of one episode: the same in every run, resume and Python version.

    String seeds go through SHA-512 in `random`, so this does not depend on PYTHONHASHSEED.
    """
    return random.Random(f"{seed}/{rank}/{slot}/{episode}").getrandbits(31)


def eval_episode_seed(seed: int, episode: int) -> int:
    """The seed of evaluation episode `episode`: apart from every training episode's."""
    return random.Random(f"{seed}/eval/{episode}").getrandbits(31)


@dataclass
class _Slot:
    index: int
    env: Any
    episode: int = 0  # the number of the current episode in this slot (0 = first)
    steps: int = 0  # steps taken in the current episode
    ret: float = 0.0  # reward summed over the current episode
    pending: concurrent.futures.Future[Observation] | None = None
    restore: dict[str, Any] | None = None  # env state from a checkpoint, applied by start()


@dataclass
class StepOutcome:
    """What happened to one sample's slot.

    `reward` is None when the sample was not stepped (an output error); `finished` holds
    (return, length) of the episode this step ended, if it ended one.
    """

    slot: int
    episode: int
    step: int
    reward: float | None
    done: bool
    info: dict[str, Any]
    seconds: float
    finished: tuple[float, int] | None = None


class EnvPool:
    """`num_envs` environments of one class, stepped concurrently, one call in flight per slot."""

    def __init__(
        self,
        cls: type,
        settings: Mapping[str, Any],
        sections: Mapping[str, Any],
        *,
        num_envs: int,
        seed: int,
        rank: int = 0,
        concurrency: int = 8,
        policy: CallPolicy | None = None,
    ) -> None:
        if num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        self.cls = cls
        self.name = class_name(cls)
        self.seed = seed
        self.rank = rank
        self.policy = policy or CallPolicy()
        self.accepts_output_errors = bool(getattr(cls, "accepts_output_errors", False))
        self.checkpointable = callable(getattr(cls, "state_dict", None)) and callable(
            getattr(cls, "load_state_dict", None)
        )
        self.slots = [_Slot(i, construct(cls, settings, sections)) for i in range(num_envs)]
        self.cursor = 0  # the next slot to hand out (slots are used in turn)
        # Set once a step reports info["correct"]: from then on every window is graded, so a
        # window of nothing but output errors shows accuracy 0, not "no value".
        self.reports_correct = False
        # Numeric info keys seen so far: later windows log them too (no value when no step
        # reported them), so every metrics line has the same env/info/* keys once they appear.
        self.info_keys: set[str] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="env"
        )
        self.started = False

    def where(self, slot: _Slot, method: str) -> str:
        return (
            f"environment {self.name}.{method} (slot {slot.index}, episode {slot.episode}, "
            f"step {slot.steps})"
        )

    # Each task below runs on a pool worker and touches only its own slot, and a slot gets its
    # next task only after the previous one is done: no environment ever sees two calls at once.

    def _first_observation(self, slot: _Slot) -> Observation:
        if slot.restore is not None:
            state, slot.restore = slot.restore, None
            call(
                slot.env,
                "load_state_dict",
                (state,),
                self.policy,
                self.where(slot, "load_state_dict"),
            )
        else:
            seed = episode_seed(self.seed, self.rank, slot.index, slot.episode)
            reset(slot.env, seed, self.policy, self.where(slot, "reset"))
        return self._observe(slot)

    def _observe(self, slot: _Slot) -> Observation:
        return observe(slot.env, self.policy, self.where(slot, "observe"))

    def _next_observation(self, slot: _Slot, done: bool) -> Observation:
        if done:
            slot.episode += 1
            slot.steps, slot.ret = 0, 0.0
            seed = episode_seed(self.seed, self.rank, slot.index, slot.episode)
            reset(slot.env, seed, self.policy, self.where(slot, "reset"))
        return self._observe(slot)

    def start(self) -> None:
        """Reset every slot (or restore it from a checkpoint) and fetch first observations."""
        if self.started:
            return
        self.started = True
        for slot in self.slots:
            slot.pending = self._executor.submit(self._first_observation, slot)

    def next_slots(self, n: int) -> list[int]:
        """The slots of the next `n` samples: `n` distinct slots, in turn."""
        if n > len(self.slots):
            raise ValueError(f"{n} samples need {n} environments; the pool has {len(self.slots)}")
        out = [(self.cursor + i) % len(self.slots) for i in range(n)]
        self.cursor = (self.cursor + n) % len(self.slots)
        return out

    def observation(self, index: int) -> Observation:
        """The slot's current observation (waits for it to arrive)."""
        self.start()
        pending = self.slots[index].pending
        assert pending is not None
        return pending.result()

    def step_async(
        self, index: int, completion: str, choice: str | None, state: dict[str, Any]
    ) -> concurrent.futures.Future[StepOutcome]:
        """Step slot `index` once with one sample; then fetch its next observation.

        The next observation is fetched by a task of its own, queued before this future
        completes, so a caller who saw the step's result can wait on `observation()` safely.
        """
        slot = self.slots[index]
        pending = slot.pending
        assert pending is not None and pending.done(), "observe before step"

        def task() -> StepOutcome:
            where = self.where(slot, "step")
            value, seconds = call(slot.env, "step", (completion, choice, state), self.policy, where)
            result = check_step_result(value, where)
            outcome = StepOutcome(
                slot.index,
                slot.episode,
                slot.steps,
                result.reward,
                result.done,
                result.info,
                seconds,
            )
            slot.steps += 1
            slot.ret += result.reward
            self.reports_correct = self.reports_correct or CORRECT_KEY in result.info
            self.info_keys.update(numeric_info(result.info))
            if result.done:
                outcome.finished = (slot.ret, slot.steps)
            slot.pending = self._executor.submit(self._next_observation, slot, result.done)
            return outcome

        return self._executor.submit(task)

    def skip(self, index: int) -> StepOutcome:
        """A sample that is not stepped (an output error): the slot keeps its observation."""
        slot = self.slots[index]
        return StepOutcome(slot.index, slot.episode, slot.steps, None, False, {}, 0.0)

    def wait_idle(self) -> None:
        """Wait until no call is in flight (before a checkpoint reads states).

        A failed observation is not raised here: the checkpoint of a good update is still
        written, and the failure surfaces when the next update asks for that observation.
        """
        concurrent.futures.wait([s.pending for s in self.slots if s.pending is not None])

    def state_dict(self) -> dict[str, Any]:
        """Counters and seeds of every slot, and each environment's own state when it has one."""
        self.wait_idle()
        slots = []
        for slot in self.slots:
            env_state = None
            if self.checkpointable:
                where = self.where(slot, "state_dict")
                env_state, _ = call(slot.env, "state_dict", (), self.policy, where)
                try:
                    json.dumps(env_state)
                except (TypeError, ValueError) as e:
                    raise RuntimeFailure(
                        f"{where} returned something that is not JSON: {e}",
                        hint="return plain dicts, lists, strings and numbers",
                    ) from None
            slots.append(
                {"episode": slot.episode, "steps": slot.steps, "return": slot.ret, "env": env_state}
            )
        return {
            "class": self.name,
            "seed": self.seed,
            "rank": self.rank,
            "cursor": self.cursor,
            "reports_correct": self.reports_correct,
            "info_keys": sorted(self.info_keys),
            "slots": slots,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters (and environment states); call before `start()`.

        Raises:
            ConfigError: the checkpoint's pool had another number of environments.
        """
        if self.started:
            raise RuntimeError("load_state_dict must come before start()")
        saved = list(state["slots"])
        if len(saved) != len(self.slots):
            raise ConfigError(
                f"the checkpoint has {len(saved)} environments; this run has {len(self.slots)}",
                hint="resume with the same environment.num_envs and batch sizes",
            )
        if state.get("class") != self.name:
            log.warning("checkpoint environment %s is now %s", state.get("class"), self.name)
        self.cursor = int(state["cursor"])
        self.reports_correct = bool(state.get("reports_correct", False))
        self.info_keys = set(state.get("info_keys", ()))
        restarted = 0
        for slot, s in zip(self.slots, saved, strict=True):
            slot.episode = int(s["episode"])
            if self.checkpointable and s.get("env") is not None:
                slot.steps, slot.ret, slot.restore = int(s["steps"]), float(s["return"]), s["env"]
            else:
                # Without state_dict the episode restarts from its own seed: same episode number.
                restarted += int(s["steps"]) > 0
                slot.steps, slot.ret = 0, 0.0
        if restarted:
            log.warning(
                "%s has no state_dict/load_state_dict: %d environment(s) restart their current "
                "episode on resume",
                self.name,
                restarted,
            )

    def close(self) -> None:
        """Stop the workers and call each environment's close(), if it has one (errors logged)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for slot in self.slots:
            close(slot.env, f"{self.name}.close (slot {slot.index})", self.policy.timeout_s)


def close(env: Any, where: str, timeout_s: float) -> None:
    """`env.close()` if it has one; a failure is logged, never raised."""
    if callable(getattr(env, "close", None)):
        try:
            call_with_timeout(env.close, (), timeout_s)
        except Exception as e:  # closing must not hide the error that ended a run
            log.warning("%s: %s", where, e)


T = TypeVar("T")


def collect(futures: Sequence[concurrent.futures.Future[T] | T]) -> list[T]:
    """Wait for every step; on the first failure, cancel the steps not started yet and raise.

    Of the failures seen by then, the first in sample order is raised. Not waiting for the rest:
    with every call hung, that would cost timeout_s per round of `concurrency` steps.
    """
    pending = [f for f in futures if isinstance(f, concurrent.futures.Future)]
    concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_EXCEPTION)
    failed = [f for f in pending if f.done() and not f.cancelled() and f.exception() is not None]
    if failed:
        for f in pending:
            f.cancel()
        error = failed[0].exception()
        assert error is not None
        raise error
    return [f.result() if isinstance(f, concurrent.futures.Future) else f for f in futures]


# --- metrics of one update (a window: nothing here accumulates across updates) -------------------

# A metric as (sum, count): tallies of several processes (or episodes) add up key by key, so
# their merge is the exact mean over everything, and a key seen on one process only still ends
# up on all of them (a reduction over differing key sets would pair the wrong values, or hang).
Tally = dict[str, tuple[float, float]]
TOTALS = ("env/steps", "env/episodes")  # reported as sums, not means


def merge_tallies(parts: Iterable[Tally]) -> Tally:
    """Add tallies key by key (keys sorted, so every process builds the same dict)."""
    out: dict[str, tuple[float, float]] = {}
    for part in parts:
        for key, (s, c) in part.items():
            s0, c0 = out.get(key, (0.0, 0.0))
            out[key] = (s0 + s, c0 + c)
    return dict(sorted(out.items()))


def finish_tally(tally: Tally) -> dict[str, float]:
    """Means (sums for `TOTALS`); NaN where nothing was counted."""
    return {
        key: s if key in TOTALS else (s / c if c else math.nan) for key, (s, c) in tally.items()
    }


def reduce_tally(tally: Tally, num_processes: int) -> dict[str, float]:
    """The metrics of every process's tally together, the same on each process.

    A collective (accelerate's `gather_object`) when `num_processes > 1`: every process must
    call it at the same point. Tallies are added before taking means, so a key one process has
    not seen (an info key, no finished episode) cannot unbalance a later mean all-reduce.
    """
    if num_processes > 1:
        from accelerate.utils import gather_object

        tally = merge_tallies(gather_object([tally]))
    return finish_tally(tally)


def choice_tally(
    texts: Sequence[str],
    mode: ModeSpec,
    correct: Sequence[str | None] | None = None,
    *,
    graded: bool = False,
) -> Tally:
    """`choice_metrics` as a tally: every label of the mode and `choice/accuracy` always present."""
    from swallowctl.ppo.rewards import parse_choice

    choices = mode.choices or {}
    n = float(len(texts))
    keys = [parse_choice(t, choices) for t in texts]
    labels = [choices[k] if k is not None else None for k in keys]
    out: dict[str, tuple[float, float]] = {
        f"choice/{label}": (float(labels.count(label)), n)
        for label in dict.fromkeys(choices.values())
    }
    out["choice/output_error"] = (float(labels.count(None)), n)
    truth = list(correct) if correct is not None else [None] * len(texts)
    known = [
        (k, label, c) for k, label, c in zip(keys, labels, truth, strict=True) if c is not None
    ]
    # Output errors the environment was not asked about are wrong answers too: leaving them out
    # would let a policy that rarely answers look accurate.
    unasked = sum(k is None and c is None for k, c in zip(keys, truth, strict=True))
    right = sum(c in (k, label) for k, label, c in known if k is not None)
    graded = graded or bool(known)
    out["choice/accuracy"] = (float(right), float(len(known) + unasked)) if graded else (0.0, 0.0)
    return out


def choice_metrics(
    texts: Sequence[str],
    mode: ModeSpec,
    correct: Sequence[str | None] | None = None,
    *,
    graded: bool = False,
) -> dict[str, float]:
    """`choice/<label>`: share of samples answering each label; `choice/output_error`: share
    answering none; `choice/accuracy`: right answers / samples that could be graded.

    `correct[i]` is the right choice (label or key) for sample i, or None when unknown (e.g. an
    output error the environment was not stepped with). Output errors count as wrong answers
    when any answer in the window is known, or when `graded` says the environment reports right
    answers at all. Otherwise `choice/accuracy` is NaN (no value).
    """
    return finish_tally(choice_tally(texts, mode, correct, graded=graded))


def env_tally(
    outcomes: Sequence[StepOutcome],
    texts: Sequence[str],
    mode: ModeSpec,
    *,
    graded: bool = False,
    info_keys: Iterable[str] = (),
) -> Tally:
    """`env_metrics` as a tally, to merge across processes before taking the means.

    `info_keys`: `env/info/<key>` to include even when no step reported it (no value then).
    """
    stepped = [o for o in outcomes if o.reward is not None]
    finished = [o.finished for o in outcomes if o.finished is not None]
    out: dict[str, tuple[float, float]] = {
        "env/steps": (float(len(stepped)), 1.0),
        "env/reward": (sum(o.reward or 0.0 for o in stepped), float(len(stepped))),
        "env/episodes": (float(len(finished)), 1.0),
        "env/episode_return": (sum(r for r, _ in finished), float(len(finished))),
        "env/episode_length": (float(sum(n for _, n in finished)), float(len(finished))),
        "env/step_s": (sum(o.seconds for o in stepped), float(len(stepped))),
    }
    info: dict[str, list[float]] = {k: [] for k in sorted(info_keys)}
    for o in stepped:
        for k, v in numeric_info(o.info).items():
            info.setdefault(k, []).append(v)
    out.update({f"env/info/{k}": (sum(v), float(len(v))) for k, v in info.items()})
    if mode.choices:
        correct = [
            None if o.info.get(CORRECT_KEY) is None else str(o.info[CORRECT_KEY]) for o in outcomes
        ]
        out.update(choice_tally(texts, mode, correct, graded=graded))
    return out


def env_metrics(
    outcomes: Sequence[StepOutcome], texts: Sequence[str], mode: ModeSpec, *, graded: bool = False
) -> dict[str, float]:
    """This update's environment metrics (`env/*`) and, for a choice mode, `choice/*`.

    `env/episode_return` and `env/episode_length` average the episodes that ended in this update
    (NaN when none did; `env/episodes` counts them). `env/info/<key>` averages the numeric
    `info` values of this update's steps. With several processes, merge their `env_tally`s
    instead (`merge_tallies`, then `finish_tally`).
    """
    return finish_tally(env_tally(outcomes, texts, mode, graded=graded))


# --- env check -----------------------------------------------------------------------------------

FREE_TEXT_ANSWERS = (
    "はい、わかりました。",
    "少し様子を見ましょう。",
    "お二人の意見を聞かせてください。",
)


@dataclass
class CheckReport:
    """What `swallowctl env check` found: latencies, rewards, episodes, problems."""

    environment: str
    mode: str
    episodes: int = 0
    steps: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)  # method -> call latencies
    rewards: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    by_action: dict[str, list[float]] = field(default_factory=dict)  # action -> step rewards
    info_keys: list[str] = field(default_factory=list)
    reports_correct: bool = False
    checkpointable: bool = False
    accepts_output_errors: bool = False
    deterministic: bool | None = None
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hint: str | None = None  # what to do about the first problem, when known

    @property
    def ok(self) -> bool:
        return not self.problems

    def latency(self) -> dict[str, dict[str, float]]:
        """Per method: calls, mean, median and max seconds."""
        out = {}
        for method, xs in self.seconds.items():
            s = sorted(xs)
            out[method] = {
                "calls": float(len(s)),
                "mean_s": sum(s) / len(s),
                "p50_s": s[len(s) // 2],
                "max_s": s[-1],
            }
        return out

    def reward_stats(self) -> dict[str, float]:
        xs = self.rewards
        if not xs:
            return {}
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        return {"mean": mean, "std": std, "min": min(xs), "max": max(xs)}

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "mode": self.mode,
            "ok": self.ok,
            "episodes": self.episodes,
            "steps": self.steps,
            "latency": self.latency(),
            "reward": self.reward_stats(),
            "episode_returns": self.returns,
            "episode_lengths": self.lengths,
            "reward_by_action": {k: sum(v) / len(v) for k, v in self.by_action.items() if v},
            "info_keys": self.info_keys,
            "reports_correct": self.reports_correct,
            "checkpointable": self.checkpointable,
            "accepts_output_errors": self.accepts_output_errors,
            "deterministic_reset": self.deterministic,
            "warnings": self.warnings,
            "problems": self.problems,
            "hint": self.hint,
        }


class _Checker:
    """Runs episodes against one environment instance, timing and checking every call."""

    def __init__(self, cls: type, env: Any, report: CheckReport, policy: CallPolicy) -> None:
        self.cls, self.env, self.report, self.policy = cls, env, report, policy
        self.name = class_name(cls)

    def call(self, method: str, args: tuple[Any, ...], where: str) -> Any:
        value, seconds = call(self.env, method, args, self.policy, f"{self.name}.{method}{where}")
        self.report.seconds.setdefault(method, []).append(seconds)
        return value

    def first_observation(self, seed: int, where: str) -> Observation:
        check_none(self.call("reset", (seed,), where), f"{self.name}.reset{where}")
        return check_observation(self.call("observe", (), where), f"{self.name}.observe{where}")

    def episode(
        self, index: int, seed: int, mode: ModeSpec, action: Callable[[int], str], max_steps: int
    ) -> None:
        report = self.report
        where = f" (episode {index}, step 0)"
        obs = self.first_observation(seed, where)
        total, steps = 0.0, 0
        for t in range(max_steps):
            where = f" (episode {index}, step {t})"
            render_observation(obs, mode, f"{self.name}.observe{where}")
            text = action(t)
            key = _parse(text, mode)
            label = mode.choices[key] if mode.choices and key is not None else None
            value = self.call("step", (text, label, obs.state), where)
            result = check_step_result(value, f"{self.name}.step{where}")
            steps, total = steps + 1, total + result.reward
            report.steps += 1
            report.rewards.append(result.reward)
            report.by_action.setdefault(label or text, []).append(result.reward)
            for k in result.info:
                if k not in report.info_keys:
                    report.info_keys.append(k)
            report.reports_correct = report.reports_correct or CORRECT_KEY in result.info
            if result.done:
                break
            where = f" (episode {index}, step {t + 1})"
            obs = check_observation(self.call("observe", (), where), f"{self.name}.observe{where}")
        else:
            report.warnings.append(
                f"episode {index} did not end within {max_steps} steps (raise --max-steps, or "
                "make step() return done=True)"
            )
        report.episodes += 1
        report.returns.append(round(total, 6))
        report.lengths.append(steps)

    def deterministic(self, seed: int) -> bool:
        first = self.first_observation(seed, " (determinism check)")
        again = self.first_observation(seed, " (determinism check)")
        return (first.messages, first.fields, first.state) == (
            again.messages,
            again.fields,
            again.state,
        )


def _parse(text: str, mode: ModeSpec) -> str | None:
    from swallowctl.ppo.rewards import parse_choice

    return parse_choice(text, mode.choices) if mode.choices else None


def check_environment(
    spec: str,
    settings: Mapping[str, Any],
    sections: Mapping[str, Any],
    mode: ModeSpec,
    *,
    mode_name: str = "",
    episodes: int = 4,
    max_steps: int = 100,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> CheckReport:
    """Run `episodes` episodes with fixed and random (seeded) actions; time and check each call.

    Even episodes answer one fixed action throughout (each choice in turn); odd ones a random
    choice per step. A free-text mode answers short fixed texts. Nothing is retried: the first
    exception, timeout or wrong return type ends the check as a problem naming
    `module:Class.method`. Import errors raise ConfigError (exit 2).
    """
    cls = load_environment_class(spec, where="env check")
    report = CheckReport(environment=class_name(cls), mode=mode_name or "(given)")
    report.checkpointable = callable(getattr(cls, "state_dict", None)) and callable(
        getattr(cls, "load_state_dict", None)
    )
    report.accepts_output_errors = bool(getattr(cls, "accepts_output_errors", False))
    try:
        env = construct(cls, settings, sections)
    except SwallowError as e:
        report.problems.append(e.message)
        report.hint = e.hint
        return report
    checker = _Checker(cls, env, report, CallPolicy(timeout_s=timeout_s, retries=0))
    keys = list(mode.choices or {}) or list(FREE_TEXT_ANSWERS)
    rng = random.Random(seed)
    try:
        for index in range(episodes):
            action = _action(keys, index, rng)
            checker.episode(index, episode_seed(seed, 0, 0, index), mode, action, max_steps)
        if report.checkpointable:
            state = checker.call("state_dict", (), " (after the episodes)")
            try:
                json.dumps(state)
            except (TypeError, ValueError) as bad:
                raise RuntimeFailure(
                    f"{report.environment}.state_dict returned something that is not JSON: {bad}"
                ) from None
        report.deterministic = checker.deterministic(episode_seed(seed, 0, 0, 0))
        if not report.deterministic:
            report.warnings.append(
                "reset(seed) twice with one seed gave different observations: runs will not "
                "repeat, and a resumed run will not see the episodes an unbroken one would"
            )
    except SwallowError as e:
        report.problems.append(e.message)
        report.hint = e.hint
    finally:
        if callable(getattr(env, "close", None)):
            try:
                call_with_timeout(env.close, (), timeout_s)
            except Exception as e:
                report.problems.append(f"{report.environment}.close raised {type(e).__name__}: {e}")
    return report


def _action(keys: Sequence[str], episode: int, rng: random.Random) -> Callable[[int], str]:
    """Even episodes: one fixed answer throughout (each in turn); odd ones: random per step."""
    if episode % 2 == 0:
        fixed = keys[(episode // 2) % len(keys)]
        return lambda _step: fixed
    return lambda _step: rng.choice(keys)


def render_check(report: CheckReport) -> list[str]:
    """The report as text lines (the CLI prints them)."""
    lines = [
        f"{report.environment} (mode {report.mode}): {report.episodes} episode(s), "
        f"{report.steps} step(s)"
    ]
    for method, s in report.latency().items():
        lines.append(
            f"  {method:<16} {int(s['calls']):>4} calls  mean {_ms(s['mean_s'])}  "
            f"p50 {_ms(s['p50_s'])}  max {_ms(s['max_s'])}"
        )
    r = report.reward_stats()
    if r:
        lines.append(
            f"reward per step: mean {r['mean']:+.3f}, std {r['std']:.3f}, "
            f"min {r['min']:+.3f}, max {r['max']:+.3f}"
        )
        by = ", ".join(
            f"{k} {sum(v) / len(v):+.3f} ({len(v)})" for k, v in report.by_action.items()
        )
        lines.append(f"mean reward by action (steps): {by}")
    if report.returns:
        lines.append(
            "episode returns: "
            + ", ".join(f"{x:+.3f}" for x in report.returns)
            + "; lengths: "
            + ", ".join(map(str, report.lengths))
        )
    if report.info_keys:
        note = " (info['correct'] gives choice/accuracy)" if report.reports_correct else ""
        lines.append(f"info keys: {', '.join(report.info_keys)}{note}")
    yes = {True: "yes", False: "no", None: "not checked"}
    lines.append(
        f"deterministic reset: {yes[report.deterministic]}; checkpointable "
        f"(state_dict/load_state_dict): {yes[report.checkpointable]}; stepped on output errors: "
        f"{yes[report.accepts_output_errors]}"
    )
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append("ok" if report.ok else f"{len(report.problems)} problem(s)")
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"
