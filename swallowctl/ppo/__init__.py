"""PPO on one shared 4-bit base: data, rewards, policy, rollout, pure tensor math, the trainer."""
