"""PPO on one shared 4-bit base: data, rewards, policy, rollout, pure tensor math, the trainer;
GRPO and RLOO through TRL (critic_free.py) behind the same interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swallowctl.core.config import SwallowConfig
    from swallowctl.ppo.critic_free import CriticFreeTrainer
    from swallowctl.ppo.trainer import PPOTrainer


def trainer_class(cfg: SwallowConfig) -> type[PPOTrainer] | type[CriticFreeTrainer]:
    """The trainer of `ppo.algorithm`: ours for ppo, TRL's for grpo / rloo."""
    if cfg.ppo.algorithm == "ppo":
        from swallowctl.ppo.trainer import PPOTrainer

        return PPOTrainer
    from swallowctl.ppo.critic_free import CriticFreeTrainer

    return CriticFreeTrainer
