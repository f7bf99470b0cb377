"""Checks on where a command will write, run before any model loads."""

from __future__ import annotations

import os
from pathlib import Path

from swallowctl.core.errors import UsageError


def check_creatable(path: Path, name: str, *, folder: bool = False) -> None:
    """Refuse `path` when it cannot be created: an existing ancestor is a file, or read-only.

    `name` is what the user set it with (`--output`, `output.dir`). `folder`: `path` itself, if
    it exists, must be a folder; otherwise whether it may exist is the caller's rule.
    """
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{name} {path} is a file, not a folder")
    for parent in path.absolute().parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise UsageError(f"{name} {path}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{name} {path}: cannot write in {parent} (permission denied)")
        return
