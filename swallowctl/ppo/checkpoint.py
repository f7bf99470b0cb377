"""Checkpoints that are never torn: written to a temp dir, marked complete, then renamed.

`checkpoint-N/` holds the policy adapter (PEFT format), the value head (safetensors), the
optimizer, scheduler and controller states, every RNG state and the data cursor, so a resumed
run continues exactly where the stopped one was.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from swallowctl.core.errors import RuntimeFailure, UsageError, io_reason

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written last: a directory without it was interrupted while saving
OLD = ".old-"  # prefix of a directory being replaced (see `install`)
STATE = "trainer_state.json"
TENSORS = "trainer_state.pt"
VALUE_HEAD = "value_head.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# What `load` needs to resume (trainer._save writes them).
_STATE_KEYS = ("update", "num_processes", "kl_coef", "entropy_coef", "python_random")
_TENSOR_KEYS = ("optimizer", "scheduler", "torch_rng")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `run_dir`, oldest first."""
    found = []
    for p in run_dir.glob("checkpoint-*"):
        m = _NAME.match(p.name)
        if m and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    done = checkpoints(run_dir)
    return done[-1][1] if done else None


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: Path,
    name: str,
    *,
    write_model: Any,
    state: dict[str, Any],
    tensors: dict[str, Any] | None = None,
) -> Path:
    """Write `run_dir/name` (e.g. `checkpoint-12`, `final`) atomically and return its path.

    `write_model(dir)` saves the adapter and value head; `state` is JSON, `tensors` goes through
    torch.save (optimizer/scheduler states, RNG states) and is read back with weights_only=True.
    """
    import torch

    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        recover(run_dir)
        tmp.mkdir(parents=True)
        write_model(tmp)
        if tensors is not None:
            # Through memory: torch.save reports a full disk as a RuntimeError of its C++
            # writer ("unexpected pos"); Python's own write says what happened.
            buffer = io.BytesIO()
            torch.save(tensors, buffer)
            (tmp / TENSORS).write_bytes(buffer.getbuffer())
        (tmp / STATE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
        seal(tmp)
        install(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written copy
        reason = io_reason(e)
        if reason is None:
            raise
        previous = latest(run_dir)
        raise RuntimeFailure(
            f"could not write checkpoint {final}: {reason}",
            hint=f"the previous checkpoint ({previous.name if previous else 'none'}) is intact; "
            "free disk space (or fix the cause) and resume with --resume",
        ) from e
    log.debug("saved %s", final)
    return final


def seal(path: Path) -> None:
    """Mark a fully written checkpoint directory complete: its files reach the disk first."""
    _fsync_tree(path)
    (path / COMPLETE).write_text("", encoding="utf-8")
    _fsync_dir(path)


def install(src: Path, dest: Path) -> None:
    """Move the complete directory `src` to `dest`, replacing an existing `dest` whole.

    A directory cannot be renamed over a non-empty one, and deleting `dest` first would lose it
    to a kill before the rename: the old one is moved aside, and removed only once the new one
    is in place. A kill in between leaves `.old-NAME`, which `recover` puts back.
    """
    aside = dest.with_name(f"{OLD}{dest.name}")
    if dest.exists():
        os.rename(dest, aside)
    os.rename(src, dest)
    _fsync_dir(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Tidy what a kill left: temp dirs, half-pruned checkpoints, a cut replacement undone.

    `.old-NAME` goes back where NAME is missing (see `install`). Call it before writing.
    """
    for tmp in run_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for path in run_dir.glob("checkpoint-*"):
        if _NAME.match(path.name) and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)  # unmarked by `prune`, then killed
    for aside in run_dir.glob(f"{OLD}*"):
        dest = run_dir / aside.name.removeprefix(OLD)
        if dest.exists():
            shutil.rmtree(aside, ignore_errors=True)  # killed after the new one was in place
        else:
            os.rename(aside, dest)


def read_state(path: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (cheap: no tensors).

    Raises:
        UsageError: unreadable, or without what this version resumes from (another version's).
    """
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise _incompatible(path, missing)
    return state


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON state, tensor state) of a checkpoint.

    Raises:
        UsageError: the files are unreadable or lack what this version reads (another version's).
    """
    import pickle

    import torch

    state = read_state(path)
    try:
        tensors = torch.load(path / TENSORS, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise _unreadable(path, e) from None
    missing = [k for k in _TENSOR_KEYS if k not in tensors]
    if missing:
        raise _incompatible(path, missing)
    return state, tensors


def _unreadable(path: Path, e: Exception) -> UsageError:
    return UsageError(
        f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})",
        hint="resume from another checkpoint: move this one out of the run directory",
    )


def _incompatible(path: Path, missing: list[str]) -> UsageError:
    return UsageError(
        f"{path}: not a checkpoint this swallowctl can resume (no {', '.join(missing)})",
        hint="it was written by another version: resume with that version, or start anew",
    )


def prune(run_dir: Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep`.

    Called only after a new checkpoint is complete, so the newest good one is never touched.
    """
    if keep is None:
        return
    done = checkpoints(run_dir)
    for _, path in done[: max(0, len(done) - keep)]:
        # Unmarked first: a kill halfway through the delete leaves no "complete" torn copy.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
