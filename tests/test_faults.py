"""Never lose a run: SIGKILL at exact moments, a full disk, save_total_limit, then --resume.

Each run is a real `swallowctl train` process of builtin:tiny-ja, forked from a warm server
(tests/forkrun.py), which SIGKILLs it at a chosen call (a rollout, a PPO micro-step, each step
of writing a checkpoint), so no product code carries test hooks. After every kill the run
directory must hold no torn checkpoint that resume would take, and after the last `--resume`
the adapters (final/ and best/) must equal those of one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from forkrun import ForkRunner
from safetensors.torch import load_file

from swallowctl.ppo import checkpoint
from swallowctl.ppo.policy import ADAPTER_WEIGHTS


class Result(NamedTuple):
    returncode: int
    stderr: str  # stdout and stderr together


UPDATES = 4
SETS = (
    "model.name_or_path=builtin:tiny-ja",
    f"ppo.total_updates={UPDATES}",
    "ppo.per_device_train_batch_size=2",
    "ppo.grad_accum_steps=1",
    "ppo.ppo_epochs=2",  # two micro-steps per update: a kill can land between them
    "ppo.lr=3e-3",
    "generation.max_new_tokens=4",
    "output.save_steps=1",
    "output.save_total_limit=2",
    "output.best_metric=episode",  # rises every update: best/ is replaced every update
    "logging.report_to=[]",
    "rewards.0.function=japanese_ratio",
)
CHECKPOINT_FILES = (ADAPTER_WEIGHTS, checkpoint.VALUE_HEAD, checkpoint.STATE, checkpoint.TENSORS)


@pytest.fixture(scope="module")
def runner() -> Iterator[ForkRunner]:
    with ForkRunner() as r:
        yield r


def train(
    runner: ForkRunner,
    run: Path,
    *,
    resume: bool,
    kill: str | None = None,
    kill_after_s: float | None = None,
) -> Result:
    argv = ["train", f"--set=output.dir={run}", *(f"--set={s}" for s in SETS)]
    rc, err = runner.run(argv + ["--resume"] * resume, kill=kill, kill_after_s=kill_after_s)
    return Result(rc, err)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / ADAPTER_WEIGHTS)


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{b}: {k}")


def assert_nothing_torn(run: Path) -> None:
    """Every directory resume or a user would take is whole; torn ones are unmarked."""
    for d in run.glob("checkpoint-*"):
        if (d / checkpoint.COMPLETE).is_file():
            for name in CHECKPOINT_FILES:
                assert (d / name).is_file(), f"{d} is marked complete without {name}"
    done = [n for n, _ in checkpoint.checkpoints(run)]
    if done:
        checkpoint.load(run / f"checkpoint-{done[-1]}")  # both state files read back
        weights(run / f"checkpoint-{done[-1]}")
        # save_total_limit=2: the old ones go only once a new one is complete, so the two
        # newest complete checkpoints are always there, whatever moment the kill hit.
        assert done[-2:] == list(range(max(1, done[-1] - 1), done[-1] + 1)), done
    for name in ("final", "best"):
        if (run / name).exists():
            assert (run / name / checkpoint.COMPLETE).is_file(), f"{name}/ is torn"


@pytest.fixture(scope="module")
def reference(runner: ForkRunner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    r = train(runner, run, resume=False)
    assert r.returncode == 0, r.stderr
    return run


# Kill points: (SWALLOWCTL_TEST_KILL, what it interrupts). A "call" counts from the start of the
# process. Per update, in order: rollout (_generate), 2 micro-steps (policy_loss), best/ saved,
# checkpoint-N saved (save_adapter, torch.save, _fsync_tree, COMPLETE, install), prune.
ROLLOUT_2 = ("swallowctl.ppo.trainer:PPOTrainer._generate:2:after", "rollout of update 2")
ROLLOUT_START = ("swallowctl.ppo.trainer:PPOTrainer._rollout:1:before", "start of a rollout")
SCORING = ("swallowctl.ppo.trainer:PPOTrainer._rewards:2:before", "scoring of a rollout")
MID_UPDATE_1 = ("swallowctl.ppo.algo:policy_loss:1:after", "first micro-step")
MID_UPDATE_3 = ("swallowctl.ppo.algo:policy_loss:3:after", "a micro-step of the 2nd update")
ADAPTER_ONLY = ("swallowctl.ppo.policy:save_adapter:2:after", "checkpoint-1: adapter written")
TENSORS_WRITTEN = ("torch:save:3:after", "checkpoint: optimizer and RNG serialized")
BEFORE_MARK = ("swallowctl.ppo.checkpoint:_fsync_tree:2:after", "checkpoint: all but COMPLETE")
BEFORE_RENAME = ("swallowctl.ppo.checkpoint:install:2:before", "final/: complete, not renamed")
BEST_ASIDE = ("os:rename:1:after:/.old-", "best/ moved aside, the new one not in yet")
FINAL_ASIDE = ("os:rename:2:after:/.old-", "final/ moved aside, the new one not in yet")
BEFORE_PRUNE = ("swallowctl.ppo.checkpoint:prune:2:before", "checkpoint-2 in, not pruned")
MID_PRUNE = ("shutil:rmtree:1:before:/checkpoint-", "prune: checkpoint-1 unmarked, not deleted")

# Each chain kills the same run several times in a row (each seed one kill), resuming between
# kills, then resumes to the end. None: run to the end without a kill (then resume a finished run).
CHAINS = {
    "rollout-fsync-update": [ROLLOUT_2, BEFORE_MARK, MID_UPDATE_3],
    "adapter-best-prune": [ADAPTER_ONLY, BEST_ASIDE, BEFORE_PRUNE],
    "tensors-midprune-final": [TENSORS_WRITTEN, MID_PRUNE, BEFORE_RENAME],
    "scoring-update-finalaside": [SCORING, MID_UPDATE_1, ROLLOUT_START, None, FINAL_ASIDE],
}


def test_at_least_ten_kill_points() -> None:
    kills = [k for chain in CHAINS.values() for k in chain if k is not None]
    assert len(kills) >= 10


@pytest.mark.parametrize("chain", list(CHAINS), ids=list(CHAINS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    chain: str, runner: ForkRunner, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    resume = False
    for step in CHAINS[chain]:
        newest = checkpoint.latest(run) if run.exists() else None
        r = train(runner, run, resume=resume, kill=step[0] if step else None)
        if step is None:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == -9, f"{step[1]}: the kill did not happen\n{r.stderr}"
        if resume and newest is not None:
            assert f"resumed from {newest}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert_nothing_torn(run)
        resume = True
    finish_like_reference(runner, run, reference)


def test_sigkill_at_random_moments(runner: ForkRunner, reference: Path, tmp_path: Path) -> None:
    # By the clock, three times in a row: wherever the run happens to be (a kill may also come
    # after the run ended, rc 0; the next --resume then redoes its last update).
    run = tmp_path / "run"
    rng = random.Random(8)
    for i in range(3):
        r = train(runner, run, resume=i > 0, kill_after_s=rng.uniform(0.2, 1.6))
        assert r.returncode in (-9, 0), r.stderr
        assert "Traceback" not in r.stderr
        assert_nothing_torn(run)
    finish_like_reference(runner, run, reference)


def finish_like_reference(runner: ForkRunner, run: Path, reference: Path) -> None:
    """`--resume` to the end; then the run must be the uninterrupted one, tidy."""
    newest = checkpoint.latest(run)
    r = train(runner, run, resume=True)
    assert r.returncode == 0, r.stderr
    if newest is not None:
        assert f"resumed from {newest}" in r.stderr, r.stderr
    assert_same_adapter(reference / "final", run / "final")
    assert_same_adapter(reference / "best", run / "best")
    best = json.loads((run / "best" / checkpoint.STATE).read_text())
    assert best["update"] == UPDATES
    updates = [json.loads(x)["update"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert updates == list(range(1, UPDATES + 1))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(run.glob(".*")), "temp or set-aside directories left behind"


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Callable[[], None] | None]:
    """A tmpfs of `size` at `path`; yields a function that frees space (remounts it bigger).

    Yields None where mounting is refused (not root, a sandbox): the caller injects ENOSPC.
    """
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode:
        yield None
        return
    try:
        yield lambda: subprocess.run(
            ["mount", "-o", "remount,size=64m", str(path)], check=True, capture_output=True
        )
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_while_checkpointing(runner: ForkRunner, reference: Path, tmp_path: Path) -> None:
    # 2 MiB: config, logs, best/ and checkpoint-1 (~1.3 MiB) fit; checkpoint-2 does not.
    with small_disk(tmp_path / "disk", "2m") as free_space:
        run = tmp_path / "disk" / "run"
        kill = None if free_space else "torch:save:2:enospc"
        r = train(runner, run, resume=False, kill=kill)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.stderr
        assert f"could not write checkpoint {run / 'checkpoint-2'}" in errors[0]
        assert "No space left on device" in errors[0]
        assert "the previous checkpoint (checkpoint-1) is intact" in r.stderr
        assert [n for n, _ in checkpoint.checkpoints(run)] == [1]
        assert_nothing_torn(run)
        assert not list(run.glob(".tmp-*")), "the half-written checkpoint was left behind"
        if free_space:
            free_space()
        r = train(runner, run, resume=True)
        assert r.returncode == 0, r.stderr
        assert f"resumed from {run / 'checkpoint-1'}" in r.stderr
        # Resumed from checkpoint-1, the run ends exactly as one never stopped: it was intact.
        assert_same_adapter(reference / "final", run / "final")


def test_disk_full_while_exporting(runner: ForkRunner, reference: Path, tmp_path: Path) -> None:
    # 64 KiB: the mlx-lm adapter (~300 KiB) does not fit.
    with small_disk(tmp_path / "disk", "64k") as free_space:
        out = tmp_path / "disk" / "export"
        argv = ["export", str(reference / "final"), "--format", "mlx-adapter", "--output", str(out)]
        kill = None if free_space else "safetensors.numpy:save_file:1:enospc"
        rc, err = runner.run(argv, kill=kill)
        assert rc == 1, err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert errors == [f"error: could not write {out}: No space left on device"], err
        assert "Traceback" not in err
        assert not list((tmp_path / "disk").iterdir()), "half-written output left behind"


def test_ctrl_c_on_a_save_step_saves_once_exits_130_and_resumes(
    runner: ForkRunner, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = ["train", f"--set=output.dir={run}", *(f"--set={s}" for s in SETS), "-v"]
    rc, err = runner.run(argv, kill="swallowctl.ppo.trainer:PPOTrainer._one_update:2:sigint")
    assert rc == 130, err
    assert "stopped by SIGINT after update 2" in err and "again with --resume" in err
    assert err.count(f"saved {run / 'checkpoint-2'}") == 1, err  # not written twice
    assert [n for n, _ in checkpoint.checkpoints(run)] == [1, 2]
    finish_like_reference(runner, run, reference)
