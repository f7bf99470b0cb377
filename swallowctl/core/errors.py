"""Error kinds. Each carries its exit code and a one-line hint; cli.py renders them.

Exit codes: 2 for what the user can fix in their command, config or data; 1 for runtime failures.
"""

from __future__ import annotations

import re


class SwallowError(Exception):
    """Base of every error swallowctl reports as one line (plus an optional hint)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(SwallowError):
    """Bad flags or flag combinations."""

    exit_code = 2


class ConfigError(SwallowError):
    """A config file or `--set` override is wrong; the message starts `FILE:LINE: key.path:`."""

    exit_code = 2


class DataError(SwallowError):
    """Prompt/input data is malformed. The message starts with `FILE:LINE:`."""

    exit_code = 2


class MissingDependencyError(SwallowError):
    """An optional extra is not installed; the hint says which `pip install` fixes it."""

    exit_code = 1

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs {package}, which is not installed",
            hint=f"pip install 'swallowctl[{extra}]'",
        )
        self.package = package
        self.extra = extra


class RuntimeFailure(SwallowError):
    """Something failed while running (I/O, a model, the network)."""

    exit_code = 1


def io_reason(e: BaseException) -> str | None:
    """What went wrong, if `e` is an I/O error; None otherwise.

    safetensors wraps OS errors in its own kind ("I/O error: No space left on device (os error
    28)"); the OS's words are taken out of it.
    """
    if isinstance(e, OSError):
        return e.strerror or str(e)
    m = re.search(r"I/O error: (.+?) \(os error \d+\)", str(e))
    return m.group(1) if m else None
