"""What a run writes as it goes: metrics.jsonl, samples.jsonl, TensorBoard events.

Each JSONL line is one complete JSON document, flushed as written; after a resume the lines of
updates past the checkpoint are dropped, so the files read as if the run had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from swallowctl.core.errors import MissingDependencyError

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write null so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_after(path: Path, update: int) -> None:
    """Drop lines whose `update` is past `update` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("update", 0) <= update:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill: it belongs to an update we redo
    # Into a temp file, then renamed over: a kill while rewriting must not empty the log.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


class RunLog:
    """Appends metrics and samples; mirrors scalars to TensorBoard (and W&B) when asked."""

    def __init__(self, run_dir: Path, report_to: list[str], *, resume_from: int | None) -> None:
        self.run_dir = run_dir
        if resume_from is not None:
            truncate_after(run_dir / METRICS, resume_from)
            truncate_after(run_dir / SAMPLES, resume_from)
        self._metrics = open(run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(run_dir / SAMPLES, "a", encoding="utf-8")  # noqa: SIM115
        self._tb: Any = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MissingDependencyError("tensorboard", "train", "logging.report_to") from e
            self._tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"),
                purge_step=(resume_from + 1 if resume_from is not None else None),
            )
        self._wandb: Any = None
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as e:
                raise MissingDependencyError("wandb", "train", "logging.report_to: wandb") from e
            self._wandb = wandb.init(dir=str(run_dir), resume="allow", id=run_dir.name)

    def metrics(self, update: int, values: dict[str, float]) -> None:
        row = {"update": update, **{k: _clean(v) for k, v in values.items()}}
        self._metrics.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, update)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=update)

    def samples(self, update: int, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            line = {"update": update, **{k: _clean(v) for k, v in r.items()}}
            self._samples.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
