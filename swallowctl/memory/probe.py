"""`tune-memory --probe`: measure what the estimate predicts, on the real model, on CUDA.

Runs one real rollout + update (the configured trainer's own code: PPO, GRPO or RLOO) at the
suggested settings and at one step larger, reads torch's peak allocated / reserved memory, and
reports estimate vs measured. An OOM at the suggestion backs off (half the micro-batch) until a
setting runs.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from swallowctl.core.config import SwallowConfig
from swallowctl.core.errors import RuntimeFailure
from swallowctl.memory.terms import GIB
from swallowctl.memory.tuner import TuneResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeRun:
    label: str  # "suggested", "one step larger", "backed off"
    changes: dict[str, Any]  # config keys set for this run
    estimate_gib: float | None
    allocated_gib: float | None  # torch.cuda.max_memory_allocated
    reserved_gib: float | None  # torch.cuda.max_memory_reserved (what nvidia-smi sees, minus ctx)
    oom: bool


def apply_changes(cfg: SwallowConfig, changes: dict[str, Any]) -> SwallowConfig:
    """A copy of `cfg` with dotted keys set (validated on assignment)."""
    out = cfg.model_copy(deep=True)
    for key, value in changes.items():
        section, name = key.split(".", 1)
        setattr(getattr(out, section), name, value)
    return out


def one_step_larger(cfg: SwallowConfig) -> dict[str, Any] | None:
    """Double the micro-batch, keeping the effective batch (grad accumulation halves)."""
    p = cfg.ppo
    if p.grad_accum_steps % 2:
        return None
    return {
        "ppo.per_device_train_batch_size": p.per_device_train_batch_size * 2,
        "ppo.grad_accum_steps": p.grad_accum_steps // 2,
    }


def probe(cfg: SwallowConfig, result: TuneResult) -> list[ProbeRun]:
    """Measure the suggestion (or the current settings when nothing fits) and one step larger."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeFailure(
            "--probe measures a real rollout and update on a CUDA GPU; there is none here",
            hint="run without --probe for the estimate, or on the GPU machine you will train on",
        )
    base = apply_changes(cfg, result.changes)
    runs = [_measure("suggested", base, result.changes, result)]
    while runs[-1].oom and base.ppo.per_device_train_batch_size > 1:
        half = {
            "ppo.per_device_train_batch_size": base.ppo.per_device_train_batch_size // 2,
            "ppo.grad_accum_steps": base.ppo.grad_accum_steps * 2,
        }
        base = apply_changes(base, half)
        runs.append(_measure("backed off", base, {**result.changes, **half}, result))
    larger = one_step_larger(base)
    if larger is not None and not runs[-1].oom:
        runs.append(_measure("one step larger", apply_changes(base, larger), larger, result))
    return runs


def _measure(
    label: str, cfg: SwallowConfig, changes: dict[str, Any], result: TuneResult
) -> ProbeRun:
    import torch

    from swallowctl.memory.phases import estimate
    from swallowctl.memory.tuner import settings_from_config
    from swallowctl.ppo import trainer_class

    estimate_gib = estimate(result.architecture, settings_from_config(cfg)).peak_bytes / GIB
    with tempfile.TemporaryDirectory(prefix="swallowctl-probe-") as tmp:
        trial = apply_changes(
            cfg, {"output.dir": tmp, "ppo.total_updates": 1, "logging.report_to": []}
        )
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        oom = False
        try:
            # One rollout + one whole update of the configured algorithm (PPO's or TRL's), then
            # final/ in the temporary run directory; run() closes its own logs and rewards.
            trainer_class(trial)(trial).run()
        except torch.cuda.OutOfMemoryError:
            oom = True
            log.warning("%s settings ran out of memory", label)
        finally:
            allocated = torch.cuda.max_memory_allocated() / GIB
            reserved = torch.cuda.max_memory_reserved() / GIB
            gc.collect()
            torch.cuda.empty_cache()
    return ProbeRun(label, changes, estimate_gib, allocated, reserved, oom)
