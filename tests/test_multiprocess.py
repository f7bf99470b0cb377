"""Several training processes (Accelerate, gloo on the CPU) on builtin:tiny-ja, through the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from swallowctl import launch
from swallowctl.cli import app
from swallowctl.core.config import load_config
from swallowctl.ppo.environment import episode_seed

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "model.name_or_path=builtin:tiny-ja",
    "generation.max_new_tokens=4",
    "ppo.per_device_train_batch_size=1",
    "ppo.ppo_epochs=1",
    "ppo.lr=3e-3",
    "lora.dropout=0",  # dropout draws from each process's RNG: 2x1 and 1x2 would differ
    "logging.report_to=[]",
    "rewards.0.function=japanese_ratio",
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SWALLOWCTL_LAUNCHED", None)
    return env


def _args(run: Path, *more: str) -> list[str]:
    sets = [a for s in (*TINY, f"output.dir={run}", *more) for a in ("--set", s)]
    return ["train", *sets]


def swallowctl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swallowctl", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _errors_of_a_failing_pair(tmp_path: Path, argv: list[str], timeout: float) -> list[str]:
    """Run `argv` in 2 processes with the user code written to `tmp_path`; the run must fail
    (exit 1) with no traceback and no final/. Its `error:` lines. `timeout`: a hang ends there."""
    r = subprocess.run(
        [sys.executable, "-m", "swallowctl", *argv, "--num-processes", "2"],
        env={**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "final").exists()
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _worker(parent: psutil.Process, rank: int) -> psutil.Process:
    for child in parent.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def _sigterm_rank1_after_checkpoint_1(run: Path, argv: list[str]) -> tuple[int, str]:
    """Start 2 processes; once checkpoint-1 is complete, SIGTERM the second worker only."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "swallowctl", *argv],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (run / "checkpoint-1" / "COMPLETE").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _worker(psutil.Process(proc.pid), 1).send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


@pytest.mark.slow
def test_two_processes_stop_together_resume_and_refuse_another_count(tmp_path: Path) -> None:
    more = ("ppo.grad_accum_steps=1", "ppo.total_updates=3", "output.save_steps=1")
    run = tmp_path / "run"
    argv = [*_args(run, *more), "--num-processes", "2"]
    code, err = _sigterm_rank1_after_checkpoint_1(run, argv)
    # The signal reached process 1 only: both stopped after the same update, one checkpoint.
    assert code == 130, err
    stops = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1, err
    stopped_at = int(stops[0].split("after update ")[1].split(";")[0])
    assert 1 <= stopped_at <= 3
    assert (run / f"checkpoint-{stopped_at}" / "COMPLETE").is_file()
    assert not (run / "final").exists()
    assert "Traceback" not in err and "ChildFailedError" not in err
    state = json.loads((run / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and len(state["ranks"]) == 2
    tensors = torch.load(run / f"checkpoint-{stopped_at}" / "trainer_state.pt", weights_only=True)
    first, second = (r["torch_rng"] for r in tensors["ranks"])
    assert not torch.equal(first, second)  # each process's own RNG, not rank 0's twice

    refused = swallowctl(*_args(run, *more), "--resume", "--num-processes", "1")
    assert refused.returncode == 2, refused.stderr
    assert "written by 2 process(es); this run has 1" in refused.stderr
    assert "--num-processes 2" in refused.stderr and "Traceback" not in refused.stderr

    resumed = swallowctl(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("adapter: ") == 1  # only the main process prints
    assert resumed.stderr.count("updates: 3, samples per update: 2 (2 process(es))") == 1
    assert [m["update"] for m in metrics(run)] == [1, 2, 3]
    # Only the main process writes: one run layout, no second copy of any file.
    names = sorted(p.name for p in run.iterdir())
    checkpoints = [f"checkpoint-{i}" for i in range(1, max(stopped_at, 2) + 1)]
    assert names == [*checkpoints, "config.yaml", "final", "metrics.jsonl", "samples.jsonl"]
    assert (run / "final" / "manifest.json").is_file()

    # Resuming gave what one uninterrupted run gives (per-process RNG states and data cursors).
    whole = tmp_path / "whole"
    straight = swallowctl(*_args(whole, *more), "--num-processes", "2")
    assert straight.returncode == 0, straight.stderr
    a, b = (
        load_file(run / "final" / "adapter_model.safetensors"),
        load_file(whole / "final" / "adapter_model.safetensors"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_processes_of_one_equal_one_process_accumulating_two(tmp_path: Path) -> None:
    # Greedy-like sampling (top_k=1): each prompt's answer is the same in either layout.
    same = ("ppo.total_updates=1", "generation.top_k=1", "output.save_steps=100")
    one = swallowctl(*_args(tmp_path / "1x2", *same, "ppo.grad_accum_steps=2"))
    assert one.returncode == 0, one.stderr
    # The other entry: Accelerate's own launcher running the module.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", "--main_process_port", "0", "-m", "swallowctl"]
    two = subprocess.run(
        [*launcher, *_args(tmp_path / "2x1", *same, "ppo.grad_accum_steps=1")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("adapter: ") == 1
    m1, m2 = metrics(tmp_path / "1x2")[0], metrics(tmp_path / "2x1")[0]
    assert m1["objective/scores"] == pytest.approx(m2["objective/scores"], abs=1e-6)
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl", "policy/entropy_avg"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    a = load_file(tmp_path / "1x2" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "2x1" / "final" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="it is installed")
def test_deepspeed_missing_is_one_line_before_anything_loads(tmp_path: Path) -> None:
    r = swallowctl(*_args(tmp_path / "run"), "--num-processes", "2", "--deepspeed", "zero2")
    assert r.returncode == 2
    assert "pip install deepspeed" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_reward_failing_in_one_process_ends_both_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "rank_reward.py").write_text(
        "import os\n\n\n"
        "def score(prompts, completions, completion_ids, **kwargs):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('only process 1 breaks')\n"
        "    return [0.5] * len(completions)\n",
        encoding="utf-8",
    )
    argv = _args(tmp_path / "run", "rewards.0.function=rank_reward:score", "rewards.0.retries=0")
    errors = _errors_of_a_failing_pair(tmp_path, argv, timeout=240)
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: process 1: reward") and "only process 1 breaks" in errors[0]


def test_launch_arguments_map_our_flags_to_accelerate(tmp_path: Path) -> None:
    train = ["train", "--config", "my.yaml"]
    plain = launch.launch_args(2, None, None, train)
    assert plain[:3] == ["--num_processes", "2", "--multi_gpu"]
    assert plain[plain.index("--main_process_port") + 1] == "0"
    assert plain[-5:] == ["-m", "swallowctl", *train]
    zero2 = launch.launch_args(4, None, "zero2", train)
    assert "--use_deepspeed" in zero2 and zero2[zero2.index("--zero_stage") + 1] == "2"
    assert "--multi_gpu" not in zero2
    accel = tmp_path / "accel.yaml"
    accel.write_text("distributed_type: MULTI_GPU\nnum_processes: 3\n", encoding="utf-8")
    own = launch.launch_args(None, accel, None, train)
    assert own == ["--config_file", str(accel), "-m", "swallowctl", *train]
    assert launch.planned_processes(None, accel) == 3
    assert launch.planned_processes(2, accel) == 2


def test_launcher_flags_inside_a_launched_process_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = CliRunner().invoke(app, ["train", "--num-processes", "2", "--dry-run"])
    assert r.exit_code == 2
    assert "already started by a launcher" in r.output


# Environment training (examples/intervention.yaml) at test sizes: 4 environments per process.
ENV_TINY = (
    "ppo.per_device_train_batch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.enable_deterministic_eval=true",
    "ppo.deterministic_eval_frequency=1",
    "ppo.per_device_eval_batch_size=2",
)


def _env_pools(checkpoint: Path) -> list[dict[str, Any]]:
    """Each process's saved environments: its own rank, other seeds than the other's."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    pools = [r["environment"] for r in state["ranks"]]
    assert [p["rank"] for p in pools] == [0, 1]
    seeds = [{s["env"]["seed"] for s in p["slots"]} for p in pools]
    assert len(seeds[0]) == len(seeds[1]) == 4 and not seeds[0] & seeds[1]
    return pools


def _env_args(run: Path, *more: str) -> list[str]:
    sets = [a for s in (*ENV_TINY, f"output.dir={run}", *more) for a in ("--set", s)]
    return ["train", "-c", str(ROOT / "examples" / "intervention.yaml"), *sets]


@pytest.mark.slow
def test_environment_training_in_two_processes_stops_resumes_and_logs_every_key(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    argv = [*_env_args(run, "ppo.total_updates=5", "output.save_steps=1"), "--num-processes", "2"]
    code, err = _sigterm_rank1_after_checkpoint_1(run, argv)
    assert code == 130, err
    stopped_at = int(err.split("after update ")[1].split(";")[0])
    assert 1 <= stopped_at <= 3
    pools = _env_pools(run / f"checkpoint-{stopped_at}")

    resumed = swallowctl(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    names = sorted(p.name for p in run.iterdir())
    checkpoints = [f"checkpoint-{i}" for i in range(2, 5)]  # save_total_limit: 3
    assert names == ["best", *checkpoints, "config.yaml", "final", "metrics.jsonl", "samples.jsonl"]
    assert (run / "final" / "COMPLETE").is_file()
    rows = metrics(run)
    assert [m["update"] for m in rows] == [1, 2, 3, 4, 5]
    mode = load_config(ROOT / "examples" / "intervention.yaml").config.mode()
    labels = {f"choice/{label}" for label in mode.choices.values()}
    keys = [{k for k in m if k.startswith(("env/", "choice/", "eval/"))} for m in rows]
    assert all(k == keys[0] for k in keys), [sorted(k ^ keys[0]) for k in keys]
    assert labels | {"choice/output_error", "choice/accuracy"} <= keys[0]
    assert {f"eval/{k}" for k in labels} <= keys[0]
    for m in rows:
        assert m["eval/episodes"] == 4  # 2 per process, episodes 0..3 shared out, not repeated
        assert sum(m[k] for k in (*labels, "choice/output_error")) == pytest.approx(1)
    # Rank 0's samples of the first resumed update continue its saved episodes.
    first = [
        s for s in map(json.loads, (run / "samples.jsonl").open()) if s["update"] == stopped_at + 1
    ]
    assert first
    for s in first:
        saved = pools[0]["slots"][s["env"]]
        assert (s["episode"], s["step"]) == (saved["episode"], saved["steps"])
    # And each process went on with its own environments (not rank 0's, not fresh ones).
    for rank, (then, now) in enumerate(
        zip(pools, _env_pools(run / f"checkpoint-{stopped_at + 1}"), strict=True)
    ):
        for slot, (a, b) in enumerate(zip(then["slots"], now["slots"], strict=True)):
            next_one = episode_seed(42, rank, slot, a["episode"] + 1)
            assert (b["episode"], b["env"]["seed"]) in {
                (a["episode"], a["env"]["seed"]),
                (a["episode"] + 1, next_one),
            }
            assert b["episode"] > a["episode"] or b["steps"] in (a["steps"], a["steps"] + 1)


@pytest.mark.slow
def test_a_loss_overflowing_in_one_process_ends_both_with_one_line(tmp_path: Path) -> None:
    # NaN rewards mean "no value" and inf ones are refused: what reaches the loss is a huge
    # finite reward. 1e30 on process 1 only: its value loss overflows float32 there (inf);
    # process 0's stays finite (advantages are whitened over both: finite, near 0).
    (tmp_path / "rank_reward.py").write_text(
        "import os\n\n\n"
        "def score(prompts, completions, completion_ids, **kwargs):\n"
        "    return [1e30 if os.environ.get('RANK') == '1' else 0.0] * len(completions)\n",
        encoding="utf-8",
    )
    argv = _env_args(
        tmp_path / "run", "ppo.total_updates=2", 'rewards=[{function: "rank_reward:score"}]'
    )
    errors = _errors_of_a_failing_pair(tmp_path, argv, timeout=240)
    assert errors == [
        "error: process 1: the loss became inf (not finite); training stopped before applying it"
    ]
    assert metrics(tmp_path / "run") == []  # stopped before update 1 was applied or logged


@pytest.mark.slow
def test_an_environment_failing_in_one_process_ends_both_with_one_line(tmp_path: Path) -> None:
    # Process 0 used to wait in the metrics merge while process 1 reported: a hang.
    (tmp_path / "rank_env.py").write_text(
        "import os\n\n"
        "from examples.intervention_env import InterventionEnv\n\n\n"
        "class RankEnv(InterventionEnv):\n"
        "    def observe(self):\n"
        "        if os.environ.get('RANK') == '1':\n"
        "            raise ValueError('only process 1 breaks')\n"
        "        return super().observe()\n",
        encoding="utf-8",
    )
    argv = _env_args(
        tmp_path / "run",
        "ppo.total_updates=2",
        "environment.entrypoint=rank_env:RankEnv",
    )
    errors = _errors_of_a_failing_pair(tmp_path, argv, timeout=120)
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: process 1: ") and "only process 1 breaks" in errors[0]
    assert "RankEnv.observe" in errors[0]
