"""The RL maths against slow references and hand-computed values."""

import math

import pytest
import torch

from routing_replay.rl import advantages, corrections, metrics, objective


def test_group_normalised_advantages_against_a_loop():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 7.0])
    got = advantages.group_normalized(rewards, group_size=4)
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 4)
        for i, r in enumerate(group):
            assert got[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-5)
    assert torch.equal(advantages.group_normalized(torch.ones(4), 2), torch.zeros(4))  # no signal, no push
    assert advantages.group_normalized(rewards, 4, normalize_std=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="groups of 3"):
        advantages.group_normalized(rewards, 3)


LOG_RHO = torch.log(torch.tensor([[0.5, 1.0, 3.0], [2.0, 0.25, 1.0]]))
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "level", "expected"),
    [
        ("none", "token", [[0.5, 1.0, 3.0], [2.0, 0.25, 0.0]]),
        ("truncate", "token", [[0.5, 1.0, 2.0], [2.0, 0.25, 0.0]]),
        ("mask", "token", [[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]]),
        ("none", "sequence", [[1.5, 1.5, 1.5], [0.5, 0.5, 0.0]]),
        ("truncate", "sequence", [[1.5, 1.5, 1.5], [0.5, 0.5, 0.0]]),
        ("mask", "sequence", [[1.5, 1.5, 1.5], [0.5, 0.5, 0.0]]),
        ("none", "geometric", [[1.5 ** (1 / 3)] * 3, [0.5 ** 0.5, 0.5 ** 0.5, 0.0]]),
    ],
)
def test_correction_weights_by_hand(mode, level, expected):
    w = corrections.weights(LOG_RHO, MASK, corrections.Correction(mode, level, upper=2.0, lower=0.5))
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)


def test_sequence_level_truncation_and_masking_act_on_the_product():
    log_rho = torch.log(torch.tensor([[3.0, 2.0]]))  # product 6
    mask = torch.ones(1, 2)
    assert corrections.weights(log_rho, mask, corrections.Correction("truncate", "sequence", upper=2.0)).tolist() == [[2.0, 2.0]]
    assert corrections.weights(log_rho, mask, corrections.Correction("mask", "sequence", upper=5.0)).tolist() == [[0.0, 0.0]]


def test_bad_correction_settings_name_the_field():
    with pytest.raises(ValueError, match="correction.mode"):
        corrections.Correction(mode="clip")
    with pytest.raises(ValueError, match="correction.level"):
        corrections.Correction(level="batch")
    with pytest.raises(ValueError, match="bounds"):
        corrections.Correction(upper=0.9)


def test_clipping_by_hand():
    logp_old = torch.zeros(1, 4)
    logp_theta = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    weights, mask = torch.ones(1, 4), torch.ones(1, 4)
    clip = objective.Clip(low=0.2, high=0.2)
    positive = objective.token_loss(logp_theta, logp_old, weights, torch.tensor([1.0]), mask, clip)
    # A > 0: min(s, clip(s)) = [0.5, 0.9, 1.1, 1.2]
    assert positive.loss.item() == pytest.approx(-(0.5 + 0.9 + 1.1 + 1.2) / 4)
    assert positive.clip_fraction.item() == 0.25
    negative = objective.token_loss(logp_theta, logp_old, weights, torch.tensor([-1.0]), mask, clip)
    # A < 0: min(-s, -clip(s)) = [-0.8, -0.9, -1.1, -1.5]
    assert negative.loss.item() == pytest.approx((0.8 + 0.9 + 1.1 + 1.5) / 4)
    assert negative.clip_fraction.item() == 0.25


def test_objective_is_the_seeds_factorisation_without_correction_or_clipping():
    """(pi_old / mu_old) x (pi_theta / pi_old) = pi_theta / mu_old (eq. 8)."""
    gen = torch.Generator().manual_seed(0)
    logp_mu, logp_old = torch.randn(3, 5, generator=gen) * 0.1, torch.randn(3, 5, generator=gen) * 0.1
    logp_theta = logp_old + torch.randn(3, 5, generator=gen) * 0.01
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 5)
    w = corrections.weights(logp_old - logp_mu, mask, corrections.Correction("none"))
    terms = objective.token_loss(logp_theta, logp_old, w, adv, mask, objective.Clip(low=10.0, high=10.0))
    direct = -(torch.exp(logp_theta - logp_mu) * adv[:, None]).mean()
    assert terms.loss.item() == pytest.approx(direct.item(), rel=1e-5)


def _policy_logps(theta: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A toy policy: per-position logits theta [T, V]; log-probs of the given tokens [B, T]."""
    return torch.log_softmax(theta, -1)[torch.arange(tokens.shape[1]), tokens]


def test_token_level_gradient_equals_sequence_level_to_first_order():
    """Eq. 6-7: grad sum_t r_t A = grad prod_t r_t A when every ratio is 1, and they differ only at
    second order in the policy change."""
    gen = torch.Generator().manual_seed(1)
    theta_old = torch.randn(6, 10, generator=gen)
    tokens = torch.randint(0, 10, (4, 6), generator=gen)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    logp_old = _policy_logps(theta_old, tokens).detach()

    def grads(delta: float):
        direction = torch.randn(6, 10, generator=torch.Generator().manual_seed(2))
        out = []
        for sequence_level in (False, True):
            theta = (theta_old + delta * direction).requires_grad_()
            log_ratio = _policy_logps(theta, tokens) - logp_old
            value = (log_ratio.sum(1).exp() * adv).sum() if sequence_level else (log_ratio.exp() * adv[:, None]).sum()
            value.backward()
            out.append(theta.grad)
        return out

    token_grad, sequence_grad = grads(0.0)
    assert torch.allclose(token_grad, sequence_grad, atol=1e-6)
    gaps = [(lambda g: (g[0] - g[1]).norm().item())(grads(d)) for d in (1e-2, 1e-3)]
    assert gaps[1] < gaps[0] / 5  # shrinks with the step: first-order agreement


def test_ratio_statistics_by_hand():
    log_ratio = torch.log(torch.tensor([[1.0, 2.5, 0.1, 6.0]]))
    stats = metrics.ratio_stats(log_ratio, torch.tensor([[1, 1, 1, 0]]))
    values = [1.0, 2.5, 0.1]
    assert stats["mean_abs"] == pytest.approx(sum(abs(math.log(v)) for v in values) / 3, rel=1e-5)
    assert stats["k3"] == pytest.approx(sum(v - math.log(v) - 1 for v in values) / 3, rel=1e-5)
    assert stats["beyond_2"] == pytest.approx(2 / 3)  # 2.5 and 0.1 (= 1/10)
    assert stats["beyond_5"] == pytest.approx(1 / 3)  # 0.1; 6.0 is masked out
    with pytest.raises(ValueError, match="no valid tokens"):
        metrics.ratio_stats(log_ratio, torch.zeros(1, 4))
