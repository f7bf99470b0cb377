"""Evaluation inside an environment: `infer --env`, greedy eval during env training, and
environment metrics that merge across processes.

Classes below are named as `<this module>:Class` (the module is already imported under HERE).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from swallowctl.cli import app
from swallowctl.core.config import load_config
from swallowctl.core.errors import RuntimeFailure
from swallowctl.core.modes import ModeSpec
from swallowctl.infer.episodes import play_episodes
from swallowctl.ppo.environment import (
    EnvPool,
    Observation,
    StepOutcome,
    StepResult,
    collect,
    env_metrics,
    env_tally,
    finish_tally,
    merge_tallies,
)
from swallowctl.ppo.trainer import PPOTrainer

ROOT = Path(__file__).resolve().parent.parent
HERE = __name__
runner = CliRunner()
MODE = ModeSpec(system=None, choices={"a": "left", "b": "right"}, output_error_penalty=-0.5)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; threads only fight over a shared CI machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run of the bundled example with greedy env eval every 4 updates."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("eval") / "run"
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)
    try:
        cfg = load_config(
            ROOT / "examples" / "intervention.yaml",
            (
                f"output.dir={run}",
                "ppo.total_updates=12",
                "output.save_steps=100",
                "ppo.enable_deterministic_eval=true",
                "ppo.deterministic_eval_frequency=4",
            ),
        ).config
        PPOTrainer(cfg).run()
    finally:
        mp.undo()
    return run


def infer_env(*args: str) -> Any:
    r = runner.invoke(app, ["infer", "-c", "examples/intervention.yaml", "-q", *args])
    return r


# --- infer --env on the bundled example ----------------------------------------------------------


def recompute(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's numbers from the steps file alone."""
    returns: dict[int, float] = defaultdict(float)
    lengths: dict[int, int] = defaultdict(int)
    for s in steps:
        returns[s["episode"]] += s["reward"]
        lengths[s["episode"]] += 1
    graded = [s for s in steps if s["label"] is None or "correct" in s["info"]]
    right = sum(s["label"] is not None and s["label"] == s["info"]["correct"] for s in graded)
    labels = [s["label"] or "output_error" for s in steps]
    return {
        "episodes": len(returns),
        "steps": len(steps),
        "mean_return": sum(returns.values()) / len(returns),
        "mean_length": sum(lengths.values()) / len(lengths),
        "accuracy": right / len(graded),
        "output_errors": labels.count("output_error"),
        "choices": {k: labels.count(k) / len(steps) for k in set(labels)},
        "ended": sum(s["end"] is not None for s in steps),
    }


def test_infer_env_reports_what_its_steps_file_says_and_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "steps.jsonl"
    r = infer_env("--episodes", "6", "--output", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    steps = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    want = recompute(steps)
    assert doc["episodes"] == want["episodes"] == want["ended"] == 6
    assert doc["steps"] == want["steps"]
    assert doc["mean_return"] == pytest.approx(want["mean_return"], abs=1e-6)
    assert doc["mean_length"] == pytest.approx(want["mean_length"], abs=1e-6)
    assert doc["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    assert doc["output_errors"] == want["output_errors"]
    for label, share in want["choices"].items():
        assert doc["choices"][label] == pytest.approx(share, abs=1e-6)
    assert sum(doc["choices"].values()) == pytest.approx(1.0, abs=1e-5)
    # Every step: what the policy saw, said and was paid, against the state it saw.
    first = steps[0]
    assert first["observation"][-1]["role"] == "user" and first["state"]["step"] == 0
    assert {"answer", "choice", "label", "reward", "env_reward", "done", "info"} <= set(first)

    again = infer_env("--episodes", "6", "--json")
    assert again.exit_code == 0, again.stderr
    assert {**json.loads(again.stdout), "output": None} == {**doc, "output": None}
    other = json.loads(infer_env("--episodes", "6", "--json", "--seed", "7").stdout)
    assert [e["seed"] for e in other["per_episode"]] != [e["seed"] for e in doc["per_episode"]]

    text = infer_env("--episodes", "2")
    assert text.exit_code == 0, text.stderr
    assert "episode(s)" in text.stdout and "accuracy (info['correct'])" in text.stdout


def test_training_eval_in_env_mode_logs_eval_metrics_and_keeps_best(trained: Path) -> None:
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/score" in r]
    assert [r["update"] for r in evals] == [4, 8, 12]
    for r in evals:
        assert r["eval/score"] == r["eval/episode_return"]
        assert r["eval/episodes"] == 8  # per_device_eval_batch_size episodes, every time
        assert 0 <= r["eval/choice/accuracy"] <= 1
        assert {"eval/choice/output_error", "eval/info/matched", "eval/episode_length"} <= set(r)
    state = json.loads((trained / "best" / "trainer_state.json").read_text())
    assert state["eval/score"] == max(r["eval/score"] for r in evals)


def test_a_trained_adapter_scores_higher_than_the_base(
    trained: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(ROOT)
    base = json.loads(infer_env("--episodes", "8", "--json").stdout)
    r = infer_env("--episodes", "8", "--json", "--adapter", str(trained / "final"))
    assert r.exit_code == 0, r.stderr
    tuned = json.loads(r.stdout)
    # Seen here: accuracy 0.11 -> 0.5, mean return 0.0 -> 1.5, output errors 7 -> 0.
    assert tuned["accuracy"] > base["accuracy"] + 0.2, (base, tuned)
    assert tuned["mean_return"] > base["mean_return"]
    assert tuned["adapter"] == str(trained / "final")

    pytest.importorskip("mlx_lm")
    import swallowctl.infer.mlx_backend as mb

    monkeypatch.setattr(mb, "cache_dir", lambda: tmp_path / "mlx-adapters")
    r = infer_env(
        "--episodes", "8", "--json", "--backend", "mlx", "--adapter", str(trained / "final")
    )
    assert r.exit_code == 0, r.stderr
    on_mlx = json.loads(r.stdout)
    assert on_mlx["backend"] == "mlx"
    assert on_mlx["per_episode"] == tuned["per_episode"]  # same greedy answers on both backends


# --- hostile environments and flags --------------------------------------------------------------


class StepRaises:
    accepts_output_errors = True  # stepped whatever the tiny model answers

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        self.bad = settings.get("bad", "raise")

    def reset(self, seed: int) -> None:
        pass

    def observe(self) -> Any:
        if self.bad == "observe":
            return {"prompt": "辞書です"}
        return Observation(fields={"target": "A", "target_utterances": "え"}, state={})

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        raise ConnectionError("the simulator went away")


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        (
            "raise",
            r"StepRaises\.step \(episode \d, step 0\) failed after 1 attempt\(s\): Connection",
        ),
        (
            "observe",
            r"StepRaises\.observe \(episode \d, step 0\) returned dict, expected Observation",
        ),
    ],
)
def test_a_hostile_environment_ends_infer_in_one_line_naming_class_and_method(
    monkeypatch: pytest.MonkeyPatch, bad: str, expect: str
) -> None:
    monkeypatch.chdir(ROOT)
    r = infer_env(
        "--env",
        f"{HERE}:StepRaises",
        "--episodes",
        "2",
        "--set=environment.retries=0",
        f"--set=environment.settings.bad={bad}",
    )
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    # Both episodes fail at once; which one is reported first depends on timing.
    assert len(errors) == 1 and re.search(f"environment {HERE}:{expect}", errors[0]), r.stderr
    assert "Traceback" not in r.stderr


def test_env_flags_are_checked_before_a_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(ROOT)
    r = infer_env("--episodes", "2", "--prompt", "こんにちは")
    assert r.exit_code == 2 and "--env plays episodes" in r.stderr
    kept = tmp_path / "steps.jsonl"
    kept.write_text("{}\n")
    r = infer_env("--episodes", "2", "--output", str(kept))
    assert r.exit_code == 2 and "already exists" in r.stderr and kept.read_text() == "{}\n"
    r = infer_env("--env", "no_such_module_here:Env")
    assert r.exit_code == 2 and "--env: cannot import 'no_such_module_here'" in r.stderr
    r = runner.invoke(app, ["infer", "--episodes", "2", "-q"])
    assert r.exit_code == 2 and "which environment?" in r.stderr


# --- play_episodes on its own (no model) ---------------------------------------------------------


class Walk:
    """Episode length 1-4 by seed; answer "a" is right on even steps, "b" on odd ones."""

    accepts_output_errors = False

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        self.seed, self.t = 0, 0

    def reset(self, seed: int) -> None:
        self.seed, self.t = seed, 0

    def observe(self) -> Observation:
        return Observation(fields={"prompt": f"{self.seed} {self.t}"}, state={"t": self.t})

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        assert state["t"] == self.t
        right = "left" if self.t % 2 == 0 else "right"
        self.t += 1
        info = {"correct": right, **({"even": 1.0} if self.t % 2 else {})}
        return StepResult(float(choice == right), self.t >= 1 + self.seed % 4, info)


def answers_by_prompt(conversations: list[list[dict[str, str]]]) -> list[str]:
    # A pure function of the prompt (as greedy decoding is): "x" is an output error.
    return ["abx"[zlib.crc32(c[-1]["content"].encode()) % 3] for c in conversations]


def test_episodes_do_not_depend_on_how_many_run_side_by_side() -> None:
    def play(parallel: int, **kw: Any) -> Any:
        return play_episodes(
            Walk,
            {},
            {},
            MODE,
            answers_by_prompt,
            episodes=range(7),
            seed=3,
            parallel=parallel,
            **kw,
        )

    one, three = play(1), play(3)
    assert one.episodes == three.episodes
    timing = "env/step_s"
    assert {k: v for k, v in one.tally.items() if k != timing} == {
        k: v for k, v in three.tally.items() if k != timing
    }
    ends = {e.end for e in one.episodes}
    assert ends <= {"done", "output_error"} and len(one.episodes) == 7
    for e in one.episodes:  # an output error pays the mode's penalty and ends the episode
        assert e.end != "output_error" or math.isclose(e.ret % 1, 0.5)
    capped = play(2, max_steps=1)
    assert all(e.length == 1 for e in capped.episodes)
    assert {e.end for e in capped.episodes} <= {"done", "max_steps", "output_error"}


def test_a_failing_generate_or_init_names_what_failed() -> None:
    class Broken(Walk):
        def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
            raise OSError("no simulator")

    with pytest.raises(RuntimeFailure, match=r"Broken\.__init__ failed: OSError: no simulator"):
        play_episodes(Broken, {}, {}, MODE, answers_by_prompt, episodes=range(2), seed=0)


# --- metrics that merge across processes ---------------------------------------------------------


def outcome(reward: float | None, info: dict[str, Any], finished: Any = None) -> StepOutcome:
    return StepOutcome(0, 0, 0, reward, False, info, 0.01, finished)


def test_tallies_of_two_processes_merge_to_the_metrics_of_all_their_steps() -> None:
    # Rank 0 finishes two episodes and reports info key "x"; rank 1 none, and key "y" only.
    rank0 = [outcome(1.0, {"x": 2, "correct": "left"}, (3.0, 2)), outcome(0.5, {}, (1.0, 4))]
    texts0 = ["a", "b"]
    rank1 = [outcome(None, {}), outcome(0.0, {"y": True, "correct": "right"})]
    texts1 = ["zzz", "b"]
    t0 = env_tally(rank0, texts0, MODE, graded=True)
    t1 = env_tally(rank1, texts1, MODE, graded=True)
    assert set(t0) != set(t1)  # as they come: a mean all-reduce of these would pair wrong keys
    merged = finish_tally(merge_tallies([t0, t1]))
    assert merged == finish_tally(merge_tallies([t1, t0]))  # every rank: same keys, same values
    assert list(merged) == sorted(merged)
    whole = env_metrics(rank0 + rank1, texts0 + texts1, MODE, graded=True)
    assert set(merged) == set(whole)
    for k, v in whole.items():
        assert merged[k] == pytest.approx(v, nan_ok=True), k
    assert merged["env/episode_return"] == 2.0 and merged["env/episodes"] == 2
    assert merged["env/info/x"] == 2.0 and merged["env/info/y"] == 1.0
    assert merged["choice/left"] == 0.25 and merged["choice/output_error"] == 0.25
    # Graded: "a" (right) on rank 0, "zzz" (an output error: wrong) and "b" (right) on rank 1;
    # rank 0's "b" has no info["correct"], so it is not graded.
    assert merged["choice/accuracy"] == pytest.approx(2 / 3)
    # A window where a process answered nothing gradeable still carries every choice key.
    empty = env_tally([outcome(None, {})], ["zzz"], MODE)
    assert {k for k in empty if k.startswith("choice/")} == {
        k for k in t0 if k.startswith("choice/")
    }
    assert math.isnan(finish_tally(empty)["choice/accuracy"])


class InfoEnv:
    """Reports info key `x` and the right answer on every step."""

    def __init__(self, settings: dict[str, Any], sections: dict[str, Any]) -> None:
        pass

    def reset(self, seed: int) -> None:
        pass

    def observe(self) -> Observation:
        return Observation(messages=[{"role": "user", "content": "?"}])

    def step(self, completion: str, choice: str | None, state: dict[str, Any]) -> StepResult:
        return StepResult(1.0, False, {"x": 2, "correct": "left"})


def test_a_window_without_steps_keeps_the_info_keys_and_grading_seen_before() -> None:
    pool = EnvPool(InfoEnv, {}, {}, num_envs=1, seed=0)
    o = pool.observation(0)
    collect([pool.step_async(0, "a", "left", o.state)])
    assert pool.info_keys == {"x"} and pool.reports_correct
    # The next window is all output errors (not stepped): the same keys, no values.
    window = [pool.skip(0)]
    before = env_tally(window, ["zzz"], MODE)
    assert "env/info/x" not in before  # as it was: metrics lines lost keys now and then
    tally = env_tally(window, ["zzz"], MODE, graded=pool.reports_correct, info_keys=pool.info_keys)
    after = finish_tally(tally)
    assert math.isnan(after["env/info/x"]) and after["choice/accuracy"] == 0.0
    # A resumed pool knows them too.
    saved = pool.state_dict()
    pool.close()
    again = EnvPool(InfoEnv, {}, {}, num_envs=1, seed=0)
    again.load_state_dict(saved)
    assert again.info_keys == {"x"} and again.reports_correct
    again.close()


WORKER = """
import json, os, sys
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
from accelerate import PartialState
from swallowctl.ppo.environment import reduce_tally
state = PartialState(cpu=True)
tally = json.load(open(os.path.join(out, f"tally{rank}.json")))
tally = {k: tuple(v) for k, v in tally.items()}
metrics = reduce_tally(tally, state.num_processes)
json.dump(metrics, open(os.path.join(out, f"metrics{rank}.json"), "w"))
"""


def test_two_gloo_processes_with_different_keys_log_the_same_metrics(tmp_path: Path) -> None:
    """A real 2-process gather (accelerate on gloo, as multi-process CPU training runs it)."""
    rank0 = [outcome(1.0, {"x": 2, "correct": "left"}, (3.0, 2))]
    rank1 = [outcome(None, {}), outcome(0.0, {"y": 1, "correct": "right"}, (0.5, 5))]
    tallies = [env_tally(rank0, ["a"], MODE, graded=True), env_tally(rank1, ["zz", "b"], MODE)]
    for rank, t in enumerate(tallies):
        (tmp_path / f"tally{rank}.json").write_text(json.dumps(t))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path)], env=env)
        for r in range(2)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    m0, m1 = (json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in range(2))
    assert m0 == m1
    whole = env_metrics(rank0 + rank1, ["a", "zz", "b"], MODE, graded=True)
    assert set(m0) == set(whole)
    for k, v in whole.items():
        if k != "env/step_s":
            assert m0[k] == pytest.approx(v, nan_ok=True), k
