"""Environments: each sample stepped once against its own state, choices, hostile code, env check.

The environment classes below are named in configs as `<this module>:Class`: the trainer imports
this very module (already in sys.modules), so the classes can record into module-level lists.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.core.config import SwallowConfig, load_config
from swallowctl.core.errors import RuntimeFailure, UsageError
from swallowctl.core.modes import BUILTIN_MODES, INTERVENTION_CHOICES, ModeSpec
from swallowctl.ppo.environment import (
    CallPolicy,
    EnvPool,
    Observation,
    StepResult,
    check_environment,
    choice_metrics,
    collect,
    episode_seed,
    intervention_fields,
)
from swallowctl.ppo.rewards import parse_choice
from swallowctl.ppo.trainer import Interrupted, PPOTrainer

ROOT = Path(__file__).resolve().parent.parent
HERE = __name__  # the module name the test runner imported this file under
EXAMPLE = "examples.intervention_env:InterventionEnv"

# A free-text mode: every sample is stepped (choice None), so step counts are exact.
SMALL = (
    "model.name_or_path=builtin:tiny-ja",
    "generation.max_new_tokens=2",
    "ppo.per_device_train_batch_size=4",
    "ppo.grad_accum_steps=1",
    "ppo.ppo_epochs=1",
    "ppo.gradient_checkpointing=false",
    "logging.report_to=[]",
    "logging.num_samples=100",
    "modes.plain.system=null",
    "modes.plain.template='{prompt}'",
    "data.mode=plain",
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    # The tiny model's matrices are too small to gain from threads, and on a shared CI machine
    # spinning OpenMP threads slowed these tests 5-50x (seen with 2 threads at load 5 on 2 CPUs).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(tmp_path: Path, env: str, *more: str) -> SwallowConfig:
    return load_config(
        None,
        (
            *SMALL,
            f"output.dir={tmp_path / 'run'}",
            f"environment.entrypoint={HERE}:{env}",
            *more,
        ),
    ).config


def reward_of(key: str) -> float:
    return (zlib.crc32(key.encode()) % 1000) / 1000


# --- a recording environment ---------------------------------------------------------------------

EVENTS: list[tuple[Any, ...]] = []
_LOCK = threading.Lock()


class RecordingEnv:
    """Episodes of 1-3 steps (by seed); every call recorded; step checks it gets the live state."""

    count = 0

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        with _LOCK:
            self.id = RecordingEnv.count
            RecordingEnv.count += 1
        self.sleep = float(settings.get("sleep", 0.0))
        self.seed, self.t, self.length = -1, 0, 0

    def key(self) -> str:
        return f"e{self.id}s{self.seed}t{self.t}"

    def reset(self, seed: int) -> None:
        self.seed, self.t, self.length = seed, 0, 1 + seed % 3
        EVENTS.append(("reset", self.id, seed))

    def observe(self) -> Observation:
        EVENTS.append(("observe", self.key()))
        return Observation(fields={"prompt": f"観察 {self.key()} です"}, state={"key": self.key()})

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        if state["key"] != self.key():
            raise AssertionError(f"stepped with {state['key']} while at {self.key()}")
        if self.sleep:  # uneven latencies: steps finish out of order
            time.sleep(self.sleep * (zlib.crc32(self.key().encode()) % 5))
        EVENTS.append(("step", state["key"], completion, choice))
        self.t += 1
        return StepResult(reward_of(state["key"]), self.t >= self.length, {"t": self.t})


@pytest.fixture
def events() -> list[tuple[Any, ...]]:
    EVENTS.clear()
    RecordingEnv.count = 0
    return EVENTS


def test_each_sample_is_stepped_once_against_the_state_it_was_generated_from(
    tmp_path: Path, events: list[tuple[Any, ...]]
) -> None:
    # 6 environments for 4 samples per update: batches take slots in turn, so they mix slots
    # and cross episode boundaries (episodes last 1-3 steps); steps run 4 at a time, unevenly.
    cfg = config(
        tmp_path,
        "RecordingEnv",
        "environment.num_envs=6",
        "environment.concurrency=4",
        "environment.settings.sleep=0.004",
        "ppo.total_updates=4",
    )
    PPOTrainer(cfg).run()
    run = tmp_path / "run"
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    steps = {e[1]: e for e in events if e[0] == "step"}
    assert Counter(e[1] for e in events if e[0] == "step").most_common(1)[0][1] == 1
    assert len(steps) == 16  # one step per sample, none twice, none lost
    for s in samples:
        key = s["prompt"].split()[1]  # the state this sample was generated from
        assert key in steps and steps[key][2] == s["completion"]
        assert s["environment"] == pytest.approx(reward_of(key))
        assert s["score"] == pytest.approx(reward_of(key))  # scored once, on that state
    # Episodes that ended were reset with the next deterministic seed of their slot.
    resets = [e for e in events if e[0] == "reset"]
    assert len(resets) > 6
    for env_id in range(6):
        seeds = [seed for _, i, seed in resets if i == env_id]
        assert seeds == [episode_seed(42, 0, env_id, n) for n in range(len(seeds))]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ended = sum(1 for s in samples if s["done"])
    assert sum(m["env/episodes"] for m in metrics) == ended
    assert all(m["env/steps"] == 4 for m in metrics)
    assert metrics[0]["env/info/t"] >= 1


def test_pool_steps_concurrently_and_keeps_one_call_per_slot(events: list[tuple[Any, ...]]) -> None:
    pool = EnvPool(RecordingEnv, {"sleep": 0.01}, {}, num_envs=8, seed=1, concurrency=8)
    pool.start()
    for _update in range(3):
        slots = pool.next_slots(8)
        obs = [pool.observation(s) for s in slots]
        start = time.perf_counter()
        futures = [pool.step_async(s, "x", None, o.state) for s, o in zip(slots, obs, strict=True)]
        outcomes = collect(futures)
        # Eight steps of up to 40 ms each, at once: far less than their sum.
        assert time.perf_counter() - start < 0.2
        assert [o.slot for o in outcomes] == slots
    pool.close()
    keys = [e[1] for e in events if e[0] == "step"]
    assert len(keys) == len(set(keys)) == 24


# --- choices -------------------------------------------------------------------------------------


def test_choice_metrics_are_a_window_and_errors_count_as_wrong() -> None:
    mode = BUILTIN_MODES["intervention"]
    texts = ["1", "2", "2。", "えっと", "4"]
    m = choice_metrics(texts, mode, ["validate", "plan", "bridge", None, "4"])
    assert m["choice/validate"] == pytest.approx(0.2) and m["choice/bridge"] == pytest.approx(0.4)
    assert m["choice/plan"] == 0 and m["choice/no_intervention"] == pytest.approx(0.2)
    assert m["choice/output_error"] == pytest.approx(0.2)
    assert m["choice/accuracy"] == pytest.approx(3 / 5)  # the key "4" counts as the label
    assert (
        choice_metrics(["x"], mode)["choice/accuracy"]
        != choice_metrics(["x"], mode)["choice/accuracy"]
    )  # NaN: nothing graded
    assert choice_metrics(["x"], mode, graded=True)["choice/accuracy"] == 0.0


class ChoiceEnv:
    """Records the choices it is stepped with; optionally asks to see output errors."""

    seen: ClassVar[list[str | None]] = []
    accepts_output_errors = False

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        self.t = 0

    def reset(self, seed: int) -> None:
        self.t = 0

    def observe(self) -> Observation:
        fields = intervention_fields(
            utterances=["A: もういいよ。", "B: そっちこそ。"],
            target_utterances=["そっちこそ。"],
            scores={"AB": -0.5, "BC": 0.2, "CA": 0.1},
            edge="AB",
            target="B",
        )
        return Observation(fields=fields, state={"t": self.t})

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        ChoiceEnv.seen.append(choice)
        self.t += 1
        return StepResult(0.5, False, {"correct": "bridge"})


class SeesErrorsEnv(ChoiceEnv):
    accepts_output_errors = True


@pytest.mark.parametrize("cls", ["ChoiceEnv", "SeesErrorsEnv"])
def test_output_errors_are_penalized_and_stepped_only_when_asked(tmp_path: Path, cls: str) -> None:
    ChoiceEnv.seen = []
    # The built-in intervention mode on the tiny model: nearly every answer is an output error.
    cfg = config(tmp_path, cls, "data.mode=intervention", "ppo.total_updates=1")
    trainer = PPOTrainer(cfg)
    b = trainer._env_rollout()
    samples = b["samples"]
    errors = [s for s in samples if s["choice"] is None]
    assert errors, "the untrained tiny model is expected to miss the digits"
    penalty = BUILTIN_MODES["intervention"].output_error_penalty
    if cls == "ChoiceEnv":
        assert None not in ChoiceEnv.seen and len(ChoiceEnv.seen) == len(samples) - len(errors)
        assert all(s["score"] == penalty and s["environment"] is None for s in errors)
    else:
        assert ChoiceEnv.seen.count(None) == len(errors)
        assert all(s["score"] == pytest.approx(penalty + 0.5) for s in errors)
    metrics = trainer._merged(b["tally"])
    assert metrics["choice/output_error"] == len(errors) / len(samples)
    accuracy = metrics["choice/accuracy"]
    if ChoiceEnv.seen:  # graded: output errors count as wrong answers
        assert accuracy == pytest.approx(sum(s["choice"] == "bridge" for s in samples) / 4)
    else:  # nothing was stepped, so nothing could be graded: no value rather than a fake 0
        assert math.isnan(accuracy)
    assert "observation" not in samples[0]["prompt"]
    assert "対象の話者: B" in samples[0]["prompt"] and "改善したい関係: A-B" in samples[0]["prompt"]
    trainer.env_pool.close()


def test_prompt_file_training_logs_choices_too(tmp_path: Path) -> None:
    # A choice mode without an environment: shares and errors per update; accuracy from a
    # `correct` column when the data has one.
    data = tmp_path / "obs.jsonl"
    rows = [{"prompt": f"B: そっちこそ。{i}", "correct": "bridge"} for i in range(4)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = load_config(
        None,
        (*SMALL, "data.mode=intervention", f"data.prompts={data}", f"output.dir={tmp_path}/run"),
    ).config
    trainer = PPOTrainer(cfg)
    assert trainer.stream is not None
    b = trainer._rollout(trainer.stream.next_batch(4))
    m, texts = b["metrics"], [s["completion"] for s in b["samples"]]
    parsed = [parse_choice(t, INTERVENTION_CHOICES) for t in texts]
    assert m["choice/output_error"] == parsed.count(None) / 4
    assert m["choice/accuracy"] == parsed.count("2") / 4


# --- the bundled environment: the tiny model learns the cues -------------------------------------


def test_the_tiny_model_learns_to_pick_the_strategy_the_cue_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config(
        ROOT / "examples" / "intervention.yaml",
        (f"output.dir={tmp_path / 'run'}", "ppo.total_updates=20", "output.save_steps=100"),
    ).config
    PPOTrainer(cfg).run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    acc = [json.loads(x)["choice/accuracy"] for x in lines]
    first, last = sum(acc[:5]) / 5, sum(acc[-5:]) / 5
    # Seen here (seed 42): 0.13 over the first five updates -> 0.50 over the last five; output
    # errors 0.94 -> 0.12. (The full 30-update example: 0.00 -> 0.84 at the last update.)
    # Untrained, the tiny model almost never writes a choice at all.
    assert last > first + 0.2, acc
    assert json.loads(lines[-1])["choice/output_error"] < 0.5


def test_resume_continues_the_episodes_as_an_unbroken_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)

    def cfg(name: str) -> SwallowConfig:
        return load_config(
            ROOT / "examples" / "intervention.yaml",
            (
                f"output.dir={tmp_path / name}",
                "ppo.total_updates=3",
                "ppo.per_device_train_batch_size=8",
                "output.save_steps=10",
            ),
        ).config

    PPOTrainer(cfg("a")).run()

    def interrupt_after_2(update: int, _m: dict[str, float]) -> None:
        if update == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        PPOTrainer(cfg("b"), on_update=interrupt_after_2).run()
    state = json.loads((tmp_path / "b" / "checkpoint-2" / "trainer_state.json").read_text())
    slots = state["environment"]["slots"]
    assert len(slots) == 8 and all(s["env"]["rng"] for s in slots)  # each environment's state
    PPOTrainer(cfg("b"), resume=True).run()
    a_w = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b_w = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    for k in a_w:
        torch.testing.assert_close(a_w[k], b_w[k], rtol=0, atol=1e-6)
    keys = ("env/reward", "choice/accuracy", "env/episodes", "env/episode_return")

    def metrics(name: str) -> list[list[Any]]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [[json.loads(x)[k] for k in keys] for x in lines]

    assert metrics("a") == metrics("b")


def test_environments_without_state_dict_restart_their_episode_on_resume(
    events: list[tuple[Any, ...]],
) -> None:
    pool = EnvPool(RecordingEnv, {}, {}, num_envs=2, seed=3)
    for _ in range(2):
        slots = pool.next_slots(2)
        obs = [pool.observation(s) for s in slots]
        collect([pool.step_async(s, "x", None, o.state) for s, o in zip(slots, obs, strict=True)])
    saved = pool.state_dict()
    pool.close()
    again = EnvPool(RecordingEnv, {}, {}, num_envs=2, seed=3)
    again.load_state_dict(saved)
    again.start()
    again.wait_idle()
    for slot, s in zip(again.slots, saved["slots"], strict=True):
        assert slot.episode == s["episode"] and slot.steps == 0
        assert events[-1][0] == "observe"
    last_resets = [e for e in events if e[0] == "reset"][-2:]
    assert sorted(seed for *_, seed in last_resets) == sorted(
        episode_seed(3, 0, i, s["episode"]) for i, s in enumerate(saved["slots"])
    )
    again.close()


# --- hostile environments ------------------------------------------------------------------------


class HostileEnv:
    """Behaves for the first step of each slot, then does what `settings.bad` says."""

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        self.bad = settings["bad"]
        self.t = 0

    def reset(self, seed: int) -> None:
        self.t = 0

    def observe(self) -> Any:
        if self.bad == "observe-dict" and self.t >= 1:
            return {"prompt": "x"}
        return Observation(fields={"prompt": f"t{self.t}"}, state={})

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> Any:
        self.t += 1
        if self.t < 2:
            return StepResult(0.0, False, {})
        if self.bad == "raise":
            raise ConnectionError("the LLM API is down")
        if self.bad == "hang":
            threading.Event().wait(30)
        if self.bad == "tuple":
            return (1.0, False, {})
        if self.bad == "reward-str":
            return StepResult("1.0", False, {})  # type: ignore[arg-type]
        if self.bad == "reward-nan":
            return StepResult(float("nan"), False, {})
        if self.bad == "done-int":
            return StepResult(0.0, 1, {})  # type: ignore[arg-type]
        return StepResult(0.0, False, {})


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        (
            "raise",
            "HostileEnv.step (slot 0, episode 0, step 1) failed after 2 attempt(s): "
            "ConnectionError: the LLM API is down",
        ),
        ("hang", "HostileEnv.step (slot 0, episode 0, step 1) timed out after 0.5s"),
    ],
)
def test_hostile_environments_stop_with_the_class_and_method_and_keep_the_checkpoint(
    tmp_path: Path, bad: str, expect: str
) -> None:
    def cfg(bad: str) -> SwallowConfig:
        return config(
            tmp_path,
            "HostileEnv",
            f"environment.settings.bad={bad}",
            "environment.timeout_s=0.5",
            "environment.retries=1",
            "ppo.total_updates=3",
            "output.save_steps=1",
        )

    start = time.perf_counter()
    with pytest.raises(RuntimeFailure) as e:
        PPOTrainer(cfg(bad)).run()
    # Steps run concurrently: whichever slot fails first is named.
    assert f"environment {HERE}:{expect}" in re.sub(r"slot \d+", "slot 0", e.value.message)
    assert time.perf_counter() - start < 30  # a hang costs timeout_s, not the hang
    run = tmp_path / "run"
    assert (run / "checkpoint-1" / "COMPLETE").is_file()
    assert not (run / "checkpoint-2").exists() and not (run / "final").exists()
    state = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())
    assert [s["steps"] for s in state["environment"]["slots"]] == [1, 1, 1, 1]
    # Fixed, the run resumes from that checkpoint and finishes.
    PPOTrainer(cfg("none"), resume=True).run()
    updates = [json.loads(x)["update"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert updates == [1, 2, 3] and (run / "final" / "COMPLETE").is_file()


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        (
            "tuple",
            "HostileEnv.step (slot 0, episode 0, step 1) returned tuple, expected StepResult",
        ),
        (
            "reward-str",
            "HostileEnv.step (slot 0, episode 0, step 1): StepResult.reward is str '1.0'",
        ),
        ("reward-nan", "StepResult.reward is nan, expected a finite number"),
        ("done-int", "StepResult.done is int 1, expected a bool"),
        (
            "observe-dict",
            "HostileEnv.observe (slot 0, episode 0, step 1) returned dict, expected Observation",
        ),
    ],
)
def test_wrong_return_types_name_the_class_method_and_field(bad: str, expect: str) -> None:
    policy = CallPolicy(timeout_s=5, retries=2, backoff_s=0)
    pool = EnvPool(HostileEnv, {"bad": bad}, {}, num_envs=1, seed=0, policy=policy)
    obs = pool.observation(pool.next_slots(1)[0])
    collect([pool.step_async(0, "x", None, obs.state)])  # the first step behaves
    with pytest.raises(RuntimeFailure) as e:
        obs = pool.observation(pool.next_slots(1)[0])
        collect([pool.step_async(0, "x", None, obs.state)])
    assert e.value.message.startswith("environment ") and expect in e.value.message
    assert "attempt" not in e.value.message  # a wrong type is a bug: never retried
    pool.close()


def test_too_few_environments_for_a_batch_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="num_envs is 2"):
        PPOTrainer(config(tmp_path, "RecordingEnv", "environment.num_envs=2"))


# --- env check -----------------------------------------------------------------------------------

runner = CliRunner()


def test_env_check_passes_on_the_bundled_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    r = runner.invoke(app, ["env", "check", "-c", "examples/intervention.yaml"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "ok"
    assert "step" in r.stdout and "deterministic reset: yes" in r.stdout
    r = runner.invoke(
        app, ["env", "check", EXAMPLE, "--mode", "intervention", "--episodes", "6", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["episodes"] == 6 and doc["reports_correct"]
    assert set(doc["latency"]) >= {"reset", "observe", "step"}
    assert set(doc["reward_by_action"]) == {"validate", "bridge", "plan", "no_intervention"}


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        ("raise", "HostileEnv.step (episode 0, step 1) failed after 1 attempt(s): ConnectionError"),
        ("tuple", "HostileEnv.step (episode 0, step 1) returned tuple, expected StepResult"),
    ],
)
def test_env_check_fails_with_exit_1_naming_class_and_method(bad: str, expect: str) -> None:
    r = runner.invoke(
        app,
        [
            "env",
            "check",
            f"{HERE}:HostileEnv",
            f"--set=environment.entrypoint={HERE}:X",
            f"--set=environment.settings.bad={bad}",
        ],
    )
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {HERE}:{expect}" + errors[0].split(expect, 1)[1]]
    assert "1 problem(s)" in r.stdout


def test_env_check_reports_an_import_error_with_exit_2() -> None:
    r = runner.invoke(app, ["env", "check", "no_such_module_here:Env"])
    assert r.exit_code == 2
    assert "no module named 'no_such_module_here'" in r.stderr


def test_check_environment_counts_latency_and_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    report = check_environment(
        EXAMPLE, {}, {"env": {"max_steps": 2}}, BUILTIN_MODES["intervention"], episodes=3
    )
    assert report.ok and report.episodes == 3 and set(report.lengths) <= {1, 2}
    assert report.latency()["step"]["calls"] == report.steps
    free = check_environment(EXAMPLE, {}, {}, ModeSpec(template="{prompt}"), episodes=1)
    assert free.ok and set(free.by_action) <= {
        "はい、わかりました。",
        "少し様子を見ましょう。",
        "お二人の意見を聞かせてください。",
    }
