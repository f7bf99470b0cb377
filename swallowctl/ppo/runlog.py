"""What a run writes as it goes: metrics.jsonl, samples.jsonl, TensorBoard events, W&B.

Each JSONL line is one complete JSON document, flushed as written; after a resume the lines of
updates past the checkpoint are dropped, so the files read as if the run had never stopped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any

from swallowctl.core.errors import MissingDependencyError

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
WANDB_ID = "wandb_run_id"  # the W&B run id, kept so that --resume continues the same W&B run
WANDB_PROJECT = "swallowctl"  # unless WANDB_PROJECT says otherwise

# Whose import each reporter needs, and the extra that installs it.
_REPORTERS = {"tensorboard": ("tensorboard", "train"), "wandb": ("wandb", "wandb")}
# Config keys whose values are secrets, and values that look like tokens wherever they are.
_SECRET_KEY = re.compile(r"token|secret|passw|api_?key|auth|credential|private_?key", re.I)
_TOKEN_LIKE = re.compile(r"\b(?:hf_|sk-|ghp_|gho_|github_pat_|xox[abp]-)[A-Za-z0-9_-]{6,}")


def check_reporters(report_to: list[str]) -> None:
    """Fail before any model loads when `logging.report_to` names a package that is missing."""
    for name in report_to:
        package, extra = _REPORTERS[name]
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(package, extra, f"logging.report_to: {name}")


def redacted(value: Any, key: str = "") -> Any:
    """`value` (the resolved config) with secrets masked, for what leaves the machine: values
    of secret-named keys, token-shaped strings, user:password and query values in URLs."""
    from swallowctl.ppo.rewards import redact_url

    if isinstance(value, dict):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    if _SECRET_KEY.search(key) or _TOKEN_LIKE.search(text):
        return "***"
    return redact_url(text) if re.match(r"[a-z][a-z0-9+.-]*://", text, re.I) else text


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

    def __init__(
        self,
        run_dir: Path,
        report_to: list[str],
        *,
        resume_from: int | None,
        config: dict[str, Any] | None = None,
    ) -> None:
        check_reporters(report_to)
        self.run_dir = run_dir
        if resume_from is not None:
            truncate_after(run_dir / METRICS, resume_from)
            truncate_after(run_dir / SAMPLES, resume_from)
        self._metrics = open(run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._samples = open(run_dir / SAMPLES, "a", encoding="utf-8")  # noqa: SIM115
        self._tb: Any = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"),
                purge_step=(resume_from + 1 if resume_from is not None else None),
            )
        self._wandb: Any = None
        if "wandb" in report_to:
            self._wandb = self._start_wandb(config or {}, resume=resume_from is not None)

    def _start_wandb(self, config: dict[str, Any], *, resume: bool) -> Any:
        """A W&B run (online, or offline with WANDB_MODE=offline) under the run directory
        (unless WANDB_DIR says where), continued on --resume."""
        import wandb

        id_file = self.run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            config=redacted(config),
            # Not sent: the command line and console (a --set can hold a token), git remotes
            # (URLs with credentials), code. Sent: the masked config and the metrics.
            settings=wandb.Settings(
                console="off", x_disable_meta=True, disable_git=True, save_code=False
            ),
        )

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
