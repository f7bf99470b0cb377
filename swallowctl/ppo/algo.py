"""PPO for language models as pure tensor math: no model, tokenizer, config or Accelerate.

Read top to bottom in the order the trainer uses it: masked statistics -> log-probs and entropy
of the logits -> KL penalty and reward shaping -> GAE -> whitening -> the clipped losses ->
entropy bonus -> controllers -> learning-rate factor -> metric names.

Formulas and metric definitions follow TRL 1.12 (`trl/experimental/ppo/ppo_trainer.py`) so that
runs stay comparable, minus its known faults, each marked "TRL fault" where we differ.

Conventions (every function):
- Per-token tensors are [B, T] over the RESPONSE tokens only (B rollouts, T response positions).
- `mask` is a bool [B, T]: True on real response tokens, the stop/EOS token included when it was
  generated; False on padding after it. Real tokens come first in each row; a False between two
  True positions ends the episode there (GAE does not bootstrap across it).
- Padding may hold garbage (NaN, inf, huge numbers): it never leaks into a result. Masked
  positions are selected away with `torch.where` before any arithmetic (`0 * nan` is nan), and
  per-token outputs are 0 at padding.
- An empty response (a row with no True) has no action to credit: its per-token outputs are all
  0 and it adds nothing to any masked mean. Our rollout never produces one (an immediate EOS is
  a one-token response), but a caller-built mask might.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

import torch

KLEstimator = Literal["k1", "k3"]
Schedule = Literal["constant", "linear", "cosine", "polynomial"]

SumAll = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over every process

WHITEN_EPS: Final = 1e-8  # TRL 1.12 masked_whiten: rsqrt(var + 1e-8)


# --------------------------------------------------------------------------------------------
# Masked statistics (TRL 1.12 masked_mean / masked_var / masked_whiten, NaN-safe)
# --------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is True.

    x, mask: same shape (e.g. [B, T]). dim=None -> 0-d tensor; dim=d -> `x` reduced over d.
    An empty selection gives 0, not TRL's 0/0 = nan, so a micro-batch of empty rows gives a zero
    loss and zero gradient instead of poisoning the optimizer.
    """
    x_real = torch.where(mask, x, 0)
    if dim is None:
        return x_real.sum() / mask.sum().clamp(min=1)
    return x_real.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is True -> 0-d tensor.

    unbiased=True applies Bessel's correction n / (n - 1) as TRL does. With fewer than 2 real
    values the correction is undefined (TRL raises or divides by zero): we return the biased
    variance, which is 0 for one value, so whitening maps that single value to 0.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased:
        bessel = torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
        variance = variance * bessel
    return variance


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_all: SumAll | None = None
) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the real positions; padding returned as 0.

    x, mask: [B, T] (any equal shapes). mean and the unbiased var are taken over every real
    position of the whole tensor (the rollout batch), as TRL. shift_mean=False adds the mean
    back: scale only (TRL's reward whitening). TRL leaves padding whitened garbage and lets
    every caller mask it; we return 0 there because every caller wants that.
    `sum_all` (an all-reduce sum over processes) takes mean and var over the batch of every
    process, so N processes x B rows whiten as one process with N x B rows.
    """
    if sum_all is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = sum_all(mask.sum().to(x.dtype))
        mean = sum_all(torch.where(mask, x, 0).sum()) / n.clamp(min=1)
        var = sum_all(torch.where(mask, (x - mean) ** 2, 0).sum()) / n.clamp(min=1)
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


# --------------------------------------------------------------------------------------------
# Log-probs and entropy of logits, without a full fp32 copy (DESIGN: never hold B x T x 128k fp32)
# --------------------------------------------------------------------------------------------
#
# Autograd through `log_softmax(logits.float())` keeps an fp32 [B, T, V] tensor alive until the
# backward pass (4 bytes per logit). These two autograd Functions instead keep only the logits
# the caller already has (bf16: 2 bytes) plus [B, T] fp32 statistics, and recompute the softmax
# block by block in fp32 during the backward pass. Peak extra memory: one fp32 block of
# about `chunk_tokens` x V. The saved logits keep their storage alive: if they are a slice of a
# bigger tensor (e.g. prompt + response logits), that whole base stays alive, so compute logits
# for the response positions only (transformers: `logits_to_keep=T + 1`, then drop the last).


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is computed in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _blocks(batch: int, length: int, chunk_tokens: int) -> Iterator[tuple[slice, slice]]:
    """(rows, positions) slices covering [batch, length] with about `chunk_tokens` per block.

    Slicing rows and positions (not `reshape(-1, V)`) keeps each block a view: reshaping a
    non-contiguous logits slice would copy all of it.
    """
    rows = max(1, chunk_tokens // max(length, 1))
    cols = max(1, min(length, chunk_tokens))
    for b in range(0, batch, rows):
        for t in range(0, length, cols):
            yield slice(b, b + rows), slice(t, t + cols)


class _TokenLogProb(torch.autograd.Function):
    """log softmax(logits / tau)[token], block-wise in fp32; backward recomputes the softmax."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, tau: float, chunk_tokens: int
    ) -> torch.Tensor:
        batch, length, _ = logits.shape
        dtype = _compute_dtype(logits)
        logprobs = logits.new_empty((batch, length), dtype=dtype)
        lse = logits.new_empty((batch, length), dtype=dtype)
        for rows, cols in _blocks(batch, length, chunk_tokens):
            z = logits[rows, cols].to(dtype) / tau  # the only fp32 copy: one block
            lse[rows, cols] = torch.logsumexp(z, dim=-1)
            picked = z.gather(-1, tokens[rows, cols].unsqueeze(-1)).squeeze(-1)
            logprobs[rows, cols] = picked - lse[rows, cols]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.tau, ctx.chunk_tokens = tau, chunk_tokens
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows, cols in _blocks(logits.shape[0], logits.shape[1], ctx.chunk_tokens):
            # d(z_y - logsumexp z)/dz_j = 1[j = y] - p_j; dz/dlogits = 1 / tau
            z = logits[rows, cols].to(lse.dtype) / ctx.tau
            g = grad[rows, cols].unsqueeze(-1)
            block = -torch.exp(z - lse[rows, cols].unsqueeze(-1)) * g
            block.scatter_add_(-1, tokens[rows, cols].unsqueeze(-1), g)
            grad_logits[rows, cols] = (block / ctx.tau).to(logits.dtype)
        return grad_logits, None, None, None


class _Entropy(torch.autograd.Function):
    """H(softmax(logits / tau)) = logsumexp z - sum_j p_j z_j, block-wise in fp32."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tau: float, chunk_tokens: int) -> torch.Tensor:
        batch, length, _ = logits.shape
        dtype = _compute_dtype(logits)
        entropy = logits.new_empty((batch, length), dtype=dtype)
        lse = logits.new_empty((batch, length), dtype=dtype)
        for rows, cols in _blocks(batch, length, chunk_tokens):
            z = logits[rows, cols].to(dtype) / tau
            lse[rows, cols] = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse[rows, cols].unsqueeze(-1))
            entropy[rows, cols] = lse[rows, cols] - (p * z).sum(-1)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.tau, ctx.chunk_tokens = tau, chunk_tokens
        return entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows, cols in _blocks(logits.shape[0], logits.shape[1], ctx.chunk_tokens):
            # dH/dz_j = -p_j (log p_j + H), with log p_j = z_j - logsumexp z
            log_p = logits[rows, cols].to(lse.dtype) / ctx.tau - lse[rows, cols].unsqueeze(-1)
            block = -torch.exp(log_p) * (log_p + entropy[rows, cols].unsqueeze(-1))
            block = block * grad[rows, cols].unsqueeze(-1) / ctx.tau
            grad_logits[rows, cols] = block.to(logits.dtype)
        return grad_logits, None, None


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Log-probability of each sampled token under softmax(logits / temperature).

    logits: [B, T, V], any float dtype (bf16 is the usual); row t predicts tokens[:, t].
    tokens: [B, T] int64. Returns [B, T] float32 (float64 for float64 logits), differentiable
    with respect to `logits`. Computed in fp32 blocks of about `chunk_tokens` positions.

    The first PPO ratio exp(new - old) is 1 only if `temperature` here equals the one used to
    sample (and any top-p/top-k filtering applied at sampling is applied to `logits` before this
    call: that is the caller's job). Padding positions get a meaningless value: mask them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out: torch.Tensor = _TokenLogProb.apply(logits, tokens.long(), float(temperature), chunk_tokens)
    return out


def entropy_of(logits: torch.Tensor, temperature: float, chunk_tokens: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: logsumexp z - sum_j p_j z_j.

    logits: [B, T, V], any float dtype. Returns [B, T] float32, differentiable (for the entropy
    bonus). Same formula as TRL's `entropy = logsumexp(logits) - sum(softmax * logits)`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out: torch.Tensor = _Entropy.apply(logits, float(temperature), chunk_tokens)
    return out


# --------------------------------------------------------------------------------------------
# KL penalty and reward shaping
# --------------------------------------------------------------------------------------------


def kl_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimated on the sampled tokens -> [B, T], 0 at padding.

    With log r = log pi_ref(x) - log pi(x) and x ~ pi (John Schulman, "Approximating KL
    Divergence", 2020): k1 = -log r (unbiased, can be negative); k3 = (r - 1) - log r (unbiased,
    always >= 0, lower variance). Same as TRL 1.12.
    """
    log_r = torch.where(mask, ref_logprobs - logprobs, 0)
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1(x) = exp(x) - 1, exact near 0
    raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row -> [B] int64; -1 for an empty row.

    mask: [B, T] bool. -1 means "no token" and must not be used to index directly (Python would
    wrap it to the last position); `shape_rewards` handles it by crediting nothing.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=-1)


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every real token, plus the score on the last one.

    scores: [B] sequence scores; logprobs, ref_logprobs: [B, T]; mask: [B, T] bool.
    Returns (rewards, non_score_reward, kl), each [B, T] float and 0 at padding.
    r_t = -beta KL_t + 1[t = last] score (Ziegler et al. 2019, eq. 2, per token as in TRL 1.12).
    TRL fault fixed: TRL adds the score one position AFTER the EOS token (a padding position
    whose value it then bootstraps); we add it on the last real token, the EOS when there is one.
    An empty row receives no score: there is no token to credit.
    """
    kl = kl_per_token(logprobs, ref_logprobs, mask, estimator)
    non_score_reward = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device)
    is_last = positions == last_token_index(mask).unsqueeze(-1)  # all False for an empty row
    score_reward = torch.where(is_last, scores.to(non_score_reward.dtype).unsqueeze(-1), 0)
    return non_score_reward + score_reward, non_score_reward, kl


# --------------------------------------------------------------------------------------------
# Generalized advantage estimation and whitening
# --------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16, computed by its backward recursion).

    rewards, values: [B, T] float; mask: [B, T] bool. Returns (advantages, returns), [B, T],
    0 at padding. The episode ends after the last real token: the value there is 0 (terminal),
    and padding contributes nothing. TRL fault fixed: TRL runs the recursion over padding too and
    bootstraps from the value of the position after EOS. returns = advantages + values
    (the lambda-return, the value target).
    """
    real = mask.to(rewards.dtype)
    r = torch.where(mask, rewards, 0)
    v = torch.where(mask, values, 0)
    length = rewards.shape[-1]
    advantages = torch.zeros_like(r)
    last_gae_lam = torch.zeros_like(r[:, 0])
    for t in reversed(range(length)):
        next_real = real[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae_lam)
        next_value = v[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae_lam)
        delta = r[:, t] + gamma * next_value - v[:, t]  # TD residual (sec. 3), V(terminal) = 0
        last_gae_lam = delta + gamma * lam * next_real * last_gae_lam  # eq. 16, backwards
        advantages[:, t] = last_gae_lam
    advantages = torch.where(mask, advantages, 0)
    return advantages, advantages + v


def whiten_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, sum_all: SumAll | None = None
) -> torch.Tensor:
    """Advantages normalised to mean 0, variance 1 over the rollout batch's real tokens, 0 at
    padding (TRL 1.12: masked_whiten then masked_fill). [B, T] -> [B, T]."""
    return masked_whiten(advantages, mask, shift_mean=True, sum_all=sum_all)


def whiten_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, sum_all: SumAll | None = None
) -> torch.Tensor:
    """Rewards scaled to variance 1 keeping their mean (TRL 1.12 `whiten_rewards`:
    masked_whiten(shift_mean=False)), 0 at padding. Applied before `gae`. [B, T] -> [B, T].
    TRL whitens over the mask extended one position past EOS (where it put the score); ours is
    the real tokens, where the score now is."""
    return masked_whiten(rewards, mask, shift_mean=False, sum_all=sum_all)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class PolicyLoss(NamedTuple):
    """`loss` carries the gradient; the rest are detached 0-d metrics (masked means)."""

    loss: torch.Tensor  # loss/policy_avg
    clipfrac: torch.Tensor  # policy/clipfrac_avg
    approxkl: torch.Tensor  # policy/approxkl_avg
    ratio_mean: torch.Tensor  # val/ratio


class ValueLoss(NamedTuple):
    """`loss` carries the gradient; `clipfrac` is a detached 0-d metric."""

    loss: torch.Tensor  # loss/value_avg
    clipfrac: torch.Tensor  # val/clipfrac_avg


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLoss:
    """Clipped surrogate objective (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7), negated into a loss and averaged over the real tokens.

    All inputs [B, T]; `mask` bool. loss = masked_mean(max(-A ratio, -A clip(ratio, 1 - eps,
    1 + eps))). clipfrac: share of real tokens where the clipped term is the larger one.
    approxkl = 0.5 * mean((log ratio)^2) (Schulman 2020, "k2"). TRL fault fixed: TRL averages
    approxkl, entropy and ratio over padding too; ours are over real tokens only.
    """
    log_ratio = torch.where(mask, new_logprobs - old_logprobs, 0)  # before exp: nan-safe grads
    adv = torch.where(mask, advantages, 0)
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLoss(loss, clipfrac, approxkl, ratio_mean)


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLoss:
    """Clipped value loss as TRL 1.12 (from OpenAI baselines' ppo2; cf. Engstrom et al. 2020,
    "Implementation Matters in Deep Policy Gradients").

    All inputs [B, T]. loss = 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c)
    - R)^2)); clipfrac: share of real tokens where the clipped term is the larger one. TRL
    averages over the mask extended one position past EOS; ours is the real tokens (the value
    after the last one is 0 by definition).
    """
    v = torch.where(mask, new_values, 0)
    v_old = torch.where(mask, old_values, 0)
    ret = torch.where(mask, returns, 0)
    v_clipped = torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value)
    vf_losses1 = (v - ret) ** 2
    vf_losses2 = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return ValueLoss(loss, clipfrac)


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, coef: float, max_bonus: float | None = None
) -> torch.Tensor:
    """The entropy term to SUBTRACT from the loss: coef * masked_mean(entropy) -> 0-d tensor.

    (Schulman et al. 2017, eq. 9: L = L_clip - c1 L_VF + c2 S; TRL 1.12 has no such term.)
    With `max_bonus`, a bonus above it is scaled down to exactly max_bonus as
    bonus * (max_bonus / bonus.detach()): the value is capped but the gradient keeps its
    direction (scaled), where a hard clamp would give zero gradient.
    """
    bonus = coef * masked_mean(entropy, mask)
    if max_bonus is None:
        return bonus
    value = bonus.detach()
    # torch.where, not `if value > max_bonus`: no host-device sync; the unused branch may be inf
    scale = torch.where(value > max_bonus, max_bonus / value, torch.ones_like(value))
    return bonus * scale


# --------------------------------------------------------------------------------------------
# Rollout metrics (TRL 1.12 definitions)
# --------------------------------------------------------------------------------------------


def rollout_metrics(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    kl: torch.Tensor,
    non_score_reward: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The `objective/*` metrics of one rollout batch -> 0-d detached tensors (gather, then
    `.item()`, in the trainer).

    scores: [B]; logprobs, kl, non_score_reward: [B, T]; mask: [B, T] bool. Sums are per
    sequence, then averaged over the batch, as TRL. objective/entropy is the sampled-token
    estimate sum_t -log pi(x_t) (TRL fault fixed: TRL fills padding log-probs with 1.0, so each
    padding token subtracted 1 from it).
    """
    with torch.no_grad():
        non_score = torch.where(mask, non_score_reward, 0).sum(-1).mean()
        return {
            "objective/kl": torch.where(mask, kl, 0).sum(-1).mean(),
            "objective/entropy": torch.where(mask, -logprobs, 0).sum(-1).mean(),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": non_score + scores.float().mean(),
            "objective/scores": scores.float().mean(),
        }


# --------------------------------------------------------------------------------------------
# Controllers (checkpointed through state_dict / load_state_dict)
# --------------------------------------------------------------------------------------------


def _clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


@dataclass
class AdaptiveKL:
    """Adaptive KL penalty coefficient (Schulman et al. 2017, sec. 4, "Adaptive KL Penalty
    Coefficient", with configurable factors and bounds).

    Feed it the KL to the REFERENCE model in the unit of `target`: objective/kl, the per-sequence
    sum of the per-token KL averaged over the batch. Not policy/approxkl_avg (the drift between
    the rollout policy and the updated one), which ORIGIN's users drove theirs with by mistake.
    update(kl): kl > 1.5 target -> coef *= up; kl < target / 1.5 -> coef *= down; then clamp to
    [min_coef, max_coef]. A nan KL leaves coef unchanged.
    """

    coef: float
    target: float
    up: float = 1.5
    down: float = 0.85
    min_coef: float = 0.0
    max_coef: float = math.inf

    def __post_init__(self) -> None:
        if self.target <= 0 or self.up < 1 or not 0 < self.down <= 1:
            raise ValueError("AdaptiveKL needs target > 0, up >= 1 and 0 < down <= 1")
        if not 0 <= self.min_coef <= self.max_coef:
            raise ValueError("AdaptiveKL needs 0 <= min_coef <= max_coef")
        self.coef = _clamp(self.coef, self.min_coef, self.max_coef)

    def update(self, observed_kl: float) -> float:
        """One step of the controller after a rollout -> the new coefficient."""
        if observed_kl > 1.5 * self.target:
            self.coef *= self.up
        elif observed_kl < self.target / 1.5:
            self.coef *= self.down
        self.coef = _clamp(self.coef, self.min_coef, self.max_coef)
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


@dataclass
class EntropyCoef:
    """Entropy-bonus coefficient steered toward a target entropy.

    update(H): coef *= exp(beta * (target - H)), clamped to [min_coef, max_coef]: a gradient
    step on log(coef), as SAC tunes its temperature (Haarnoja et al. 2018, "Soft Actor-Critic
    Algorithms and Applications", sec. 5). Entropy below target raises the coefficient. Feed it
    the per-token entropy (policy/entropy_avg, nats), the unit of `target`.
    """

    initial: float
    target: float
    beta: float
    min_coef: float = 0.0
    max_coef: float = math.inf
    coef: float = field(init=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.beta < 0 or not 0 <= self.min_coef <= self.max_coef:
            raise ValueError("EntropyCoef needs initial > 0, beta >= 0, 0 <= min <= max")
        self.coef = _clamp(self.initial, self.min_coef, self.max_coef)

    def update(self, observed_entropy: float) -> float:
        """One step after an update -> the new coefficient (unchanged for a nan entropy)."""
        step = self.beta * (self.target - observed_entropy)
        if math.isnan(step):
            return self.coef
        # math.exp overflows past ~709; so large a step is clamped to max_coef anyway
        self.coef = _clamp(self.coef * math.exp(min(step, 700.0)), self.min_coef, self.max_coef)
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


def phase_coef(phases: list[float], boundaries: list[float], progress: float) -> float:
    """Piecewise-constant schedule: phases[i] while boundaries[i-1] <= progress < boundaries[i].

    phases: len(boundaries) + 1 values; boundaries: increasing fractions of training; progress:
    the fraction done (update / total_updates). E.g. phases [0.05, 0.03, 0.01], boundaries
    [0.1, 0.3]: 0.05 before 10 %, 0.03 from 10 % to before 30 %, 0.01 from 30 % on.
    """
    if len(phases) != len(boundaries) + 1:
        raise ValueError("phase_coef needs exactly one more phase than boundaries")
    if any(a >= b for a, b in itertools.pairwise(boundaries)):
        raise ValueError("phase_coef boundaries must be strictly increasing")
    return phases[sum(progress >= b for b in boundaries)]


@dataclass
class EntropyMonitor:
    """Entropy-collapse detector: the trainer stops when `update` returns True.

    The first `warmup` updates are ignored; after them, True once the entropy has been below
    `floor` (or nan) for `patience` consecutive updates, and on every update while it stays so.
    Feed it the per-token entropy (policy/entropy_avg), the unit of `floor`.
    """

    floor: float
    patience: int
    warmup: int = 0
    num_updates: int = field(default=0, init=False)
    num_below: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.patience < 1 or self.warmup < 0:
            raise ValueError("EntropyMonitor needs patience >= 1 and warmup >= 0")

    def update(self, entropy: float) -> bool:
        """Record one update's entropy -> True when training has collapsed."""
        self.num_updates += 1
        if self.num_updates <= self.warmup:
            return False
        self.num_below = 0 if entropy >= self.floor else self.num_below + 1  # nan counts as below
        return self.num_below >= self.patience

    def state_dict(self) -> dict[str, int]:
        return {"num_updates": self.num_updates, "num_below": self.num_below}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_updates = int(state["num_updates"])
        self.num_below = int(state["num_below"])


# --------------------------------------------------------------------------------------------
# Learning-rate schedule (a factor for torch.optim.lr_scheduler.LambdaLR)
# --------------------------------------------------------------------------------------------


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: Schedule,
    min_ratio: float = 0.0,
    power: float = 2.0,
) -> float:
    """Multiplier of the base learning rate at optimizer `step` (0-based, LambdaLR's count).

    1) warmup, step < warmup_steps: step / warmup_steps, rising from 0 (as transformers'
       schedulers, so the very first step has lr 0 when warmup_steps > 0);
    2) then, with progress p = (step - warmup) / (total - warmup) clipped to [0, 1]:
       constant: 1; linear: m + (1 - m)(1 - p); cosine: m + (1 - m)(1 + cos(pi p)) / 2
       (Loshchilov & Hutter 2017, eq. 5, one cycle); polynomial: m + (1 - m)(1 - p)^power,
       where m = min_ratio, reached at total_steps and kept after.
    power defaults to 2 (quadratic); transformers' default power is 1, which is just "linear".
    "constant" warms up too when warmup_steps > 0 (transformers' "constant_with_warmup").
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps or not 0 <= min_ratio <= 1:
        raise ValueError("lr_factor needs total >= 1, 0 <= warmup <= total, 0 <= min_ratio <= 1")
    if schedule not in ("constant", "linear", "cosine", "polynomial"):
        raise ValueError(f"unknown lr schedule {schedule!r}")
    if step < warmup_steps:
        return step / warmup_steps
    p = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        decay = 1.0 - p
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * p))
    else:  # polynomial
        decay = (1.0 - p) ** power
    return min_ratio + (1.0 - min_ratio) * decay


# --------------------------------------------------------------------------------------------
# Metric names
# --------------------------------------------------------------------------------------------

# Every metric the trainer logs (metrics.jsonl, TensorBoard), in logging order. The first block
# is TRL 1.12's names with TRL's definitions (less the faults noted above) so runs stay
# comparable; the second is ours. Per-reward-component means are logged beside these.
# Renaming or removing one is a BREAKING CHANGE for users' dashboards and scripts.
METRIC_NAMES: Final[tuple[str, ...]] = (
    # TRL 1.12
    "objective/kl",  # mean over rollouts of sum_t KL_t to the reference (rollout_metrics)
    "objective/entropy",  # mean over rollouts of sum_t -log pi(x_t)
    "objective/non_score_reward",  # mean over rollouts of sum_t -kl_coef KL_t
    "objective/rlhf_reward",  # objective/non_score_reward + objective/scores
    "objective/scores",  # mean sequence score (after missing_eos_penalty)
    "policy/approxkl_avg",  # mean over micro-batches of PolicyLoss.approxkl
    "policy/clipfrac_avg",  # mean over micro-batches of PolicyLoss.clipfrac
    "policy/entropy_avg",  # mean over micro-batches of masked_mean(entropy_of(...))
    "loss/policy_avg",  # mean over micro-batches of PolicyLoss.loss
    "loss/value_avg",  # mean over micro-batches of ValueLoss.loss
    "val/clipfrac_avg",  # mean over micro-batches of ValueLoss.clipfrac
    "val/ratio",  # mean over micro-batches of PolicyLoss.ratio_mean
    "val/ratio_var",  # unbiased variance over micro-batches of PolicyLoss.ratio_mean
    "val/num_eos_tokens",  # number of stop tokens in the rollout batch's responses
    "lr",  # learning rate used by this update
    "episode",  # rollouts generated so far, all processes
    # swallowctl
    "objective/kl_coef",  # KL coefficient used for this rollout's rewards
    "objective/entropy_coef",  # entropy-bonus coefficient used in this update
    "time/rollout_s",  # seconds spent generating, scoring and forward passes
    "time/update_s",  # seconds spent in the PPO epochs
    "throughput/episodes_per_s",  # rollouts per second of this update, all processes
    "throughput/tokens_per_s",  # real response tokens per second of this update
    "memory/peak_bytes",  # torch.cuda.max_memory_allocated over this update (0 on CPU)
)
