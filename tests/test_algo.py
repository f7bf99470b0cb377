"""Hand-computed checks of swallowctl.ppo.algo (pure tensor math, CPU, well under a second).

Shared fixture, B=2 rollouts, T=3 response positions:
  row 0 fills all 3 positions (truncated, no EOS);
  row 1 stops early: EOS at position 1, position 2 is padding.
Padding holds NaN on purpose: nothing may leak out of it.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from swallowctl.ppo import algo

NAN = float("nan")
MASK = torch.tensor([[True, True, True], [True, True, False]])


def t(rows: list[Any]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected: list[Any] | float) -> None:
    torch.testing.assert_close(
        actual.double(),
        t(expected) if isinstance(expected, list) else torch.tensor(expected, dtype=torch.float64),
        atol=1e-6,
        rtol=1e-6,
    )


# ------------------------------------------------------------------------- masked statistics

X = t([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])  # real values 1..5, NaN in the padding


def test_masked_mean_ignores_nan_padding() -> None:
    close(algo.masked_mean(X, MASK), 3.0)  # (1+2+3+4+5) / 5
    close(algo.masked_mean(X, MASK, dim=1), [2.0, 4.5])  # (1+2+3)/3, (4+5)/2
    close(algo.masked_mean(X, MASK, dim=0), [2.5, 3.5, 3.0])  # column 2 only has row 0


def test_masked_mean_empty_selection_is_zero_not_nan() -> None:
    empty = torch.zeros(2, 3, dtype=torch.bool)
    close(algo.masked_mean(X, empty), 0.0)
    close(algo.masked_mean(X, torch.tensor([[True] * 3, [False] * 3]), dim=1), [2.0, 0.0])


def test_masked_var_unbiased_and_biased() -> None:
    # deviations from 3: -2,-1,0,1,2 -> squares sum 10; biased 10/5 = 2, unbiased 10/4 = 2.5
    close(algo.masked_var(X, MASK), 2.5)
    close(algo.masked_var(X, MASK, unbiased=False), 2.0)


def test_masked_var_fewer_than_two_values() -> None:
    one = torch.tensor([[True, False, False], [False, False, False]])
    close(algo.masked_var(X, one), 0.0)  # one value: no spread, no division by zero
    close(algo.masked_var(X, torch.zeros(2, 3, dtype=torch.bool)), 0.0)


def test_masked_whiten() -> None:
    s = math.sqrt(2.5 + 1e-8)  # unbiased var 2.5, TRL's eps
    close(algo.masked_whiten(X, MASK), [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    # shift_mean=False keeps the mean 3: scale only
    close(
        algo.masked_whiten(X, MASK, shift_mean=False),
        [[3 - 2 / s, 3 - 1 / s, 3.0], [3 + 1 / s, 3 + 2 / s, 0.0]],
    )


def test_whiten_advantages_mean_zero_var_one_padding_zero() -> None:
    adv = t([[0.3, -1.0, 2.0], [5.0, 0.1, NAN]])
    w = algo.whiten_advantages(adv, MASK)
    real = w[MASK]
    close(real.mean(), 0.0)
    close(real.var(unbiased=True), 1.0)  # up to eps 1e-8
    assert w[1, 2].item() == 0.0


def test_whiten_rewards_keeps_mean() -> None:
    w = algo.whiten_rewards(X, MASK)
    close(w[MASK].mean(), 3.0)
    assert w[1, 2].item() == 0.0


# ------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_of_hand_values() -> None:
    # logits [0, ln 3] -> p = [1/4, 3/4]
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    close(algo.logprobs_of(logits, tokens, 1.0), [[math.log(0.75), math.log(0.25)]])
    # temperature 2: z = [0, ln 3 / 2] -> p1 = sqrt 3 / (1 + sqrt 3)
    r3 = math.sqrt(3.0)
    close(algo.logprobs_of(logits, tokens, 2.0), [[math.log(r3 / (1 + r3)), -math.log(1 + r3)]])


def test_logprobs_of_bf16_in_float32_out_and_matches_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    for chunk in (1, 2, 7, 1024):  # blocks of 1 position up to the whole tensor
        out = algo.logprobs_of(logits, tokens, 0.7, chunk_tokens=chunk)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_logprobs_of_gradient_matches_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda x: algo.logprobs_of(x, tokens, 0.8, chunk_tokens=2), (logits,)
    )


def test_logprobs_of_on_noncontiguous_slice() -> None:
    # the trainer slices the response positions out of [B, L, V] logits
    g = torch.Generator().manual_seed(2)
    full = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    logits = full[:, 2:5]
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(algo.logprobs_of(logits, tokens, 1.0, chunk_tokens=2), expected)


def test_logprobs_of_keeps_no_fp32_copy_of_the_logits_for_backward() -> None:
    # Autograd through log_softmax(logits.float()) would save a [B, T, V] fp32 tensor.
    logits = torch.randn(2, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 64, (2, 4))
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logp = algo.logprobs_of(logits, tokens, 1.0)
        ent = algo.entropy_of(logits, 1.0)
    big_fp32 = [s for s in saved if s.dtype == torch.float32 and s.numel() >= logits.numel()]
    assert big_fp32 == []
    (logp.sum() + ent.sum()).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_entropy_of_uniform_is_log_v() -> None:
    logits = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    out = algo.entropy_of(logits, 0.7)
    assert out.dtype == torch.float32
    close(out, [[math.log(8.0)] * 3] * 2)  # 2.0794415


def test_entropy_of_hand_value_and_gradient() -> None:
    # p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351
    logits = t([[[0.0, math.log(3.0)]]])
    close(algo.entropy_of(logits, 1.0), [[0.25 * math.log(4) + 0.75 * math.log(4 / 3)]])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: algo.entropy_of(y, 1.3, chunk_tokens=4), (x,))


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature"):
        algo.logprobs_of(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


# ------------------------------------------------------------------------- KL and rewards

LOGPROBS = t([[-1.0, -2.0, -0.5], [-1.0, -3.0, NAN]])
REF_LOGPROBS = t([[-1.5, -1.0, -0.5], [-2.0, -3.0, NAN]])
# log r = ref - logprobs = [[-0.5, 1, 0], [-1, 0, pad]]


def test_kl_k1() -> None:
    close(algo.kl_per_token(LOGPROBS, REF_LOGPROBS, MASK, "k1"), [[0.5, -1.0, 0.0], [1.0, 0, 0]])


def test_kl_k3() -> None:
    # (e^x - 1) - x: x=-0.5 -> 0.6065307 - 1 + 0.5 = 0.1065307; x=1 -> e - 2 = 0.7182818;
    # x=-1 -> 0.3678794 - 1 + 1 = 0.3678794
    k3 = algo.kl_per_token(LOGPROBS, REF_LOGPROBS, MASK, "k3")
    close(k3, [[0.1065307, 0.7182818, 0.0], [0.3678794, 0.0, 0.0]])


def test_kl_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="k1"):
        algo.kl_per_token(LOGPROBS, REF_LOGPROBS, MASK, "k2")  # type: ignore[arg-type]


def test_last_token_index() -> None:
    mask = torch.tensor(
        [[True, True, True], [True, True, False], [True, False, False], [False, False, False]]
    )
    assert algo.last_token_index(mask).tolist() == [2, 1, 0, -1]  # -1: empty row


def test_shape_rewards_score_on_last_real_token() -> None:
    scores = torch.tensor([1.0, 2.0])
    rewards, non_score, kl = algo.shape_rewards(scores, LOGPROBS, REF_LOGPROBS, MASK, 0.1, "k1")
    # non-score = -0.1 * k1 = [[-0.05, 0.1, 0], [-0.1, 0, 0]]
    close(non_score, [[-0.05, 0.1, 0.0], [-0.1, 0.0, 0.0]])
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    # row 0: score 1 on position 2; row 1 stopped early: score 2 on its EOS (position 1),
    # NOT on position 2 after it (where TRL 1.12 put it)
    close(rewards, [[-0.05, 0.1, 1.0], [-0.1, 2.0, 0.0]])


def test_shape_rewards_empty_row_gets_nothing() -> None:
    mask = torch.tensor([[True, False], [False, False]])
    lp = t([[-1.0, NAN], [NAN, NAN]])
    rewards, _, _ = algo.shape_rewards(torch.tensor([3.0, 5.0]), lp, lp, mask, 0.1, "k3")
    close(rewards, [[3.0, 0.0], [0.0, 0.0]])  # the 5.0 has no token to go to


# ------------------------------------------------------------------------- GAE


def test_gae_gamma_1_lam_095_by_hand() -> None:
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, NAN]])
    values = t([[0.5, 0.6, 0.7], [0.2, 0.4, NAN]])
    adv, ret = algo.gae(rewards, values, MASK, gamma=1.0, lam=0.95)
    # row 0: d2 = 1 + 0 (terminal) - 0.7 = 0.3          A2 = 0.3
    #        d1 = 0 + 0.7 - 0.6 = 0.1                    A1 = 0.1 + 0.95 * 0.3   = 0.385
    #        d0 = 0 + 0.6 - 0.5 = 0.1                    A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # row 1 ends at its EOS (position 1): the next value is 0, the padding adds nothing
    #        d1 = 2 + 0 - 0.4 = 1.6                      A1 = 1.6
    #        d0 = 0 + 0.4 - 0.2 = 0.2                    A0 = 0.2 + 0.95 * 1.6   = 1.72
    close(adv, [[0.46575, 0.385, 0.3], [1.72, 1.6, 0.0]])
    close(ret, [[0.96575, 0.985, 1.0], [1.92, 2.0, 0.0]])  # A + V, 0 at padding


def test_gae_hole_in_mask_ends_the_episode() -> None:
    # mask [T, F, T]: position 0 is an episode of its own, nothing flows back across the hole
    #   t=2: d2 = 1 - 0.7 = 0.3              A2 = 0.3
    #   t=0: d0 = 0 + 0 (next not real) - 0.5  A0 = -0.5 (no 0.95 * A1 term)
    rewards = t([[0.0, NAN, 1.0]])
    values = t([[0.5, NAN, 0.7]])
    mask = torch.tensor([[True, False, True]])
    adv, _ = algo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[-0.5, 0.0, 0.3]])


def test_gae_lam_1_gives_discounted_return() -> None:
    # lam = 1: returns are the discounted reward-to-go: 1 * 0.9^2, 1 * 0.9, 1
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.3, -2.0, 5.0]])
    _, ret = algo.gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=1.0)
    close(ret, [[0.81, 0.9, 1.0]])


# ------------------------------------------------------------------------- losses


def test_policy_loss_clipping_by_hand() -> None:
    # ratios 1.5, 0.5, 1.1, 0.5 on real tokens; cliprange 0.2 -> clip to [0.8, 1.2]
    #   (1.5, A=+1): -1.5 vs -1.2 -> -1.2  clipped (above the clip)
    #   (0.5, A=+1): -0.5 vs -0.8 -> -0.5  not clipped (pessimistic term is the unclipped one)
    #   (1.1, A=-1):  1.1 vs  1.1 ->  1.1  inside the clip
    #   (0.5, A=-1):  0.5 vs  0.8 ->  0.8  clipped (below the clip)
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05; clipfrac = 2/4
    old = t([[0.0, 0.0, 0.0, 0.0, NAN]])
    new = torch.log(t([[1.5, 0.5, 1.1, 0.5, 1.0]]))
    new[0, 4] = NAN
    new.requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0, NAN]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = algo.policy_loss(new, old, adv, mask, cliprange=0.2)
    close(out.loss, 0.05)
    close(out.clipfrac, 0.5)
    close(out.ratio_mean, 0.9)  # (1.5 + 0.5 + 1.1 + 0.5) / 4
    # 0.5 * mean(ln^2): (0.1644020 + 0.4804530 + 0.0090840 + 0.4804530) / 4 / 2
    close(out.approxkl, 0.5 * (0.1644020 + 0.4804530 + 0.0090840 + 0.4804530) / 4)
    out.loss.backward()
    assert new.grad is not None
    # d/dlogp of -A ratio / 4 = -A ratio / 4 on unclipped tokens, 0 on clipped ones and padding
    close(new.grad, [[0.0, -0.125, 0.275, 0.0, 0.0]])


def test_value_loss_clipping_by_hand() -> None:
    # c = 0.2
    #   v=1.0, old=0.5, R=2.0: clip -> 0.7; (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 1.69 clipped
    #   v=0.0, old=0.5, R=0.0: clip -> 0.3; 0 vs 0.09                      -> 0.09 clipped
    #   v=1.0, old=0.5, R=0.5: clip -> 0.7; 0.25 vs 0.04                   -> 0.25 unclipped
    # loss = 0.5 * (1.69 + 0.09 + 0.25) / 3 = 0.3383333; clipfrac = 2/3
    new = t([[1.0, 0.0, 1.0, NAN]]).requires_grad_(True)
    old = t([[0.5, 0.5, 0.5, NAN]])
    ret = t([[2.0, 0.0, 0.5, NAN]])
    mask = torch.tensor([[True, True, True, False]])
    out = algo.value_loss(new, old, ret, mask, cliprange_value=0.2)
    close(out.loss, 0.5 * (1.69 + 0.09 + 0.25) / 3)
    close(out.clipfrac, 2 / 3)
    out.loss.backward()
    assert new.grad is not None
    # only the unclipped token moves V: d/dv 0.5 (v - R)^2 / 3 = (1.0 - 0.5) / 3
    close(new.grad, [[0.0, 0.0, 0.5 / 3, 0.0]])


def test_entropy_bonus_plain() -> None:
    entropy = t([[2.0, 1.0, NAN]]).requires_grad_(True)
    mask = torch.tensor([[True, True, False]])
    bonus = algo.entropy_bonus(entropy, mask, coef=0.1)
    close(bonus, 0.15)  # 0.1 * (2 + 1) / 2
    bonus.backward()
    assert entropy.grad is not None
    close(entropy.grad, [[0.05, 0.05, 0.0]])


def test_entropy_bonus_cap_keeps_a_gradient() -> None:
    entropy = t([[2.0, 1.0, NAN]]).requires_grad_(True)
    mask = torch.tensor([[True, True, False]])
    bonus = algo.entropy_bonus(entropy, mask, coef=0.1, max_bonus=0.05)
    close(bonus, 0.05)  # 0.15 capped to 0.05
    bonus.backward()
    assert entropy.grad is not None
    # scaled by 0.05 / 0.15 = 1/3, not zeroed as a hard clamp would: 0.05 / 3 per real token
    close(entropy.grad, [[0.05 / 3, 0.05 / 3, 0.0]])
    # a cap above the bonus changes nothing
    close(algo.entropy_bonus(entropy, mask, coef=0.1, max_bonus=1.0), 0.15)


def test_losses_finite_with_nan_padding_everywhere() -> None:
    new = t([[-1.0, NAN], [NAN, NAN]]).requires_grad_(True)
    values = t([[0.5, NAN], [NAN, NAN]]).requires_grad_(True)
    mask = torch.tensor([[True, False], [False, False]])  # second row is empty
    nans = t([[0.0, NAN], [NAN, NAN]])
    loss = (
        algo.policy_loss(new, nans - 1.0, nans + 1.0, mask, 0.2).loss
        + algo.value_loss(values, nans, nans, mask, 0.2).loss
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert new.grad is not None and values.grad is not None
    assert torch.isfinite(new.grad).all() and torch.isfinite(values.grad).all()


def test_rollout_metrics_by_hand() -> None:
    scores = torch.tensor([1.0, 2.0])
    _, non_score, kl = algo.shape_rewards(scores, LOGPROBS, REF_LOGPROBS, MASK, 0.1, "k1")
    m = algo.rollout_metrics(scores, LOGPROBS, kl, non_score, MASK)
    close(m["objective/kl"], 0.25)  # sums 0.5 - 1 + 0 = -0.5 and 1 -> mean 0.25
    close(m["objective/entropy"], 3.75)  # sums of -logprob: 3.5 and 4
    close(m["objective/non_score_reward"], -0.025)  # sums 0.05 and -0.1
    close(m["objective/rlhf_reward"], 1.475)  # -0.025 + 1.5
    close(m["objective/scores"], 1.5)
    assert set(m) <= set(algo.METRIC_NAMES)


# ------------------------------------------------------------------------- controllers


def test_adaptive_kl_sequence() -> None:
    ctl = algo.AdaptiveKL(coef=0.1, target=6.0, min_coef=0.05, max_coef=0.2)
    # band: raise above 1.5 * 6 = 9, lower below 6 / 1.5 = 4
    assert ctl.update(9.0) == pytest.approx(0.1)  # on the edge: unchanged
    assert ctl.update(4.0) == pytest.approx(0.1)  # on the edge: unchanged
    assert ctl.update(10.0) == pytest.approx(0.15)  # 0.1 * 1.5
    assert ctl.update(10.0) == pytest.approx(0.2)  # 0.225 clamped to max
    assert ctl.update(1.0) == pytest.approx(0.17)  # 0.2 * 0.85
    assert ctl.update(1.0) == pytest.approx(0.1445)  # 0.17 * 0.85
    assert ctl.update(NAN) == pytest.approx(0.1445)  # no information: unchanged
    for _ in range(20):
        ctl.update(0.0)
    assert ctl.coef == pytest.approx(0.05)  # clamped to min
    resumed = algo.AdaptiveKL(coef=0.1, target=6.0, min_coef=0.05, max_coef=0.2)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.coef == ctl.coef


def test_adaptive_kl_rejects_bad_factors() -> None:
    with pytest.raises(ValueError):
        algo.AdaptiveKL(coef=0.1, target=6.0, up=0.5)


def test_entropy_coef_sequence() -> None:
    ctl = algo.EntropyCoef(initial=0.01, target=1.0, beta=0.5, min_coef=0.001, max_coef=0.05)
    assert ctl.update(0.0) == pytest.approx(0.01 * math.exp(0.5))  # below target: up, 0.016487
    assert ctl.update(2.0) == pytest.approx(0.01)  # above target by as much: back down
    assert ctl.update(1.0) == pytest.approx(0.01)  # on target: unchanged
    hot = algo.EntropyCoef(initial=0.01, target=1.0, beta=2.0, max_coef=0.05)
    assert hot.update(0.0) == pytest.approx(0.05)  # 0.01 e^2 = 0.0739 clamped to max
    assert hot.update(-1e9) == pytest.approx(0.05)  # overflow-safe
    resumed = algo.EntropyCoef(initial=0.01, target=1.0, beta=0.5)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.coef == pytest.approx(0.01)


def test_phase_coef() -> None:
    phases, bounds = [0.05, 0.03, 0.01], [0.1, 0.3]
    got = [algo.phase_coef(phases, bounds, p) for p in (0.0, 0.099, 0.1, 0.29, 0.3, 1.0)]
    assert got == [0.05, 0.05, 0.03, 0.03, 0.01, 0.01]
    with pytest.raises(ValueError):
        algo.phase_coef([0.1, 0.2], [0.1, 0.3], 0.5)
    with pytest.raises(ValueError):
        algo.phase_coef([0.1, 0.2, 0.3], [0.3, 0.1], 0.5)


def test_entropy_monitor_sequence() -> None:
    mon = algo.EntropyMonitor(floor=0.5, patience=2, warmup=2)
    entropies = [0.1, 0.1, 0.1, 0.6, 0.1, 0.1, 0.1]
    # updates 1-2: warmup; 3: 1 below; 4: reset; 5: 1 below; 6: 2 below -> collapse; 7: still
    assert [mon.update(h) for h in entropies] == [False, False, False, False, False, True, True]
    resumed = algo.EntropyMonitor(floor=0.5, patience=2, warmup=2)
    resumed.load_state_dict(mon.state_dict())
    assert resumed.update(0.1) is True
    nan_mon = algo.EntropyMonitor(floor=0.5, patience=1)
    assert nan_mon.update(NAN) is True  # a NaN entropy is not a healthy one


# ------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "polynomial"])
def test_lr_factor_warmup(schedule: algo.Schedule) -> None:
    # total 100, warmup 10: 0 at step 0, half at 5, full at 10
    assert algo.lr_factor(0, 100, 10, schedule) == 0.0
    assert algo.lr_factor(5, 100, 10, schedule) == pytest.approx(0.5)
    assert algo.lr_factor(10, 100, 10, schedule) == pytest.approx(1.0)


def test_lr_factor_decays() -> None:
    f = algo.lr_factor
    # p = (55 - 10) / 90 = 0.5; p = (40 - 10) / 90 = 1/3
    assert f(55, 100, 10, "constant", min_ratio=0.1) == 1.0
    assert f(55, 100, 10, "linear") == pytest.approx(0.5)
    assert f(55, 100, 10, "linear", min_ratio=0.1) == pytest.approx(0.55)  # 0.1 + 0.9 * 0.5
    assert f(55, 100, 10, "cosine") == pytest.approx(0.5)  # (1 + cos(pi/2)) / 2
    assert f(40, 100, 10, "cosine") == pytest.approx(0.75)  # (1 + cos(pi/3)) / 2
    assert f(55, 100, 10, "polynomial") == pytest.approx(0.25)  # 0.5^2
    assert f(55, 100, 10, "polynomial", power=1.0) == pytest.approx(0.5)
    decaying: list[algo.Schedule] = ["linear", "cosine", "polynomial"]
    for schedule in decaying:
        assert f(100, 100, 10, schedule, min_ratio=0.2) == pytest.approx(0.2)
        assert f(150, 100, 10, schedule, min_ratio=0.2) == pytest.approx(0.2)
    assert f(0, 100, 0, "linear") == 1.0  # no warmup: full lr at once


def test_lr_factor_drives_lambdalr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: algo.lr_factor(s, 4, 2, "linear"))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])  # warmup 2, then linear to step 4


def test_lr_factor_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        algo.lr_factor(0, 10, 2, "step")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        algo.lr_factor(0, 10, 20, "linear")


# ------------------------------------------------------------------------- metric names


def test_metric_names_are_frozen() -> None:
    # Renaming a metric breaks users' dashboards: change this list only on purpose.
    assert algo.METRIC_NAMES == (
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "policy/entropy_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/ratio_var",
        "val/num_eos_tokens",
        "lr",
        "episode",
        "objective/kl_coef",
        "objective/entropy_coef",
        "time/rollout_s",
        "time/update_s",
        "throughput/episodes_per_s",
        "throughput/tokens_per_s",
        "memory/peak_bytes",
    )
