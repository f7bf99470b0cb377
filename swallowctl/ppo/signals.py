"""Ctrl-C / SIGTERM during training: finish the update, checkpoint, exit; twice: stop at once.

Shared by PPOTrainer and CriticFreeTrainer; under several processes the trainer reduces
`requested` so every process stops after the same update.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)


class Signals:
    """First Ctrl-C/SIGTERM: finish the update, checkpoint, exit. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning(
            "%s: finishing this update, then saving a checkpoint (Ctrl-C again to stop now)",
            self.requested,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
