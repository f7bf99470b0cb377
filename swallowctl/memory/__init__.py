"""tune-memory: estimate the GPU memory of a PPO (QLoRA) run and find settings that fit.

- `estimate(arch, settings)`: bytes per term for each phase of an update (phases.py, with
  the per-term formulas and their sources in terms.py);
- `tune_config(cfg, model=, vram_gib=)`: the fastest fitting settings, or what to give up
  (tuner.py);
- `write_changes(path, changes)`: the suggestion written into a config, comments kept
  (yamledit.py);
- `renderables(result)` / `to_json(result)`: what the command prints (render.py).

Pure Python: nothing here imports torch (GPU detection does, only when no budget is given).
"""

from swallowctl.memory.phases import Estimate, Phase, Term, estimate
from swallowctl.memory.terms import GIB, RewardModel, Settings, lora_param_count
from swallowctl.memory.tuner import (
    Advice,
    Budget,
    TuneResult,
    resolve_budget,
    settings_from_config,
    tune,
    tune_config,
)
from swallowctl.memory.yamledit import write_changes

__all__ = [
    "GIB",
    "Advice",
    "Budget",
    "Estimate",
    "Phase",
    "RewardModel",
    "Settings",
    "Term",
    "TuneResult",
    "estimate",
    "lora_param_count",
    "resolve_budget",
    "settings_from_config",
    "tune",
    "tune_config",
    "write_changes",
]
