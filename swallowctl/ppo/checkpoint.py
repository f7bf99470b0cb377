"""Checkpoints that are never torn: written to a temp dir, marked complete, then renamed.

`checkpoint-N/` holds the policy adapter (PEFT format), the value head (safetensors), the
optimizer, scheduler and controller states, every RNG state and the data cursor, so a resumed
run continues exactly where the stopped one was.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from swallowctl.core.errors import RuntimeFailure

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written last: a directory without it was interrupted while saving
STATE = "trainer_state.json"
TENSORS = "trainer_state.pt"
VALUE_HEAD = "value_head.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
        tmp.mkdir(parents=True)
        write_model(tmp)
        if tensors is not None:
            torch.save(tensors, tmp / TENSORS)
        (tmp / STATE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("", encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():  # `final` of a resumed run, or a step saved again: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir)
        raise RuntimeFailure(
            f"could not write checkpoint {final}: {e.strerror or e}",
            hint=f"the previous checkpoint ({previous.name if previous else 'none'}) is intact; "
            "free disk space and resume with --resume",
        ) from e
    log.debug("saved %s", final)
    return final


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON state, tensor state) of a checkpoint."""
    import torch

    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    tensors = torch.load(path / TENSORS, map_location="cpu", weights_only=True)
    return state, tensors


def prune(run_dir: Path, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, and stale temp dirs.

    Called only after a new checkpoint is complete, so the newest good one is never touched.
    """
    for tmp in run_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is None:
        return
    done = checkpoints(run_dir)
    for _, path in done[: max(0, len(done) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
