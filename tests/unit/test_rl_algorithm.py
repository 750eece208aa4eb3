"""The RL maths against slow references and hand-computed values."""

import math
from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from routing_replay.rl import advantages, corrections, identity, objective
from routing_replay.rl.minibatch import loss_and_metrics
from routing_replay.rl.settings import Clip, Correction, CorrectionLevel, CorrectionMode


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
    w = corrections.weights(LOG_RHO, MASK, Correction(mode, level, upper=2.0, lower=0.5))
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)


def test_sequence_level_truncation_and_masking_act_on_the_product():
    log_rho = torch.log(torch.tensor([[3.0, 2.0]]))  # product 6
    mask = torch.ones(1, 2)
    assert corrections.weights(log_rho, mask, Correction("truncate", "sequence", upper=2.0)).tolist() == [[2.0, 2.0]]
    assert corrections.weights(log_rho, mask, Correction("mask", "sequence", upper=5.0)).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize(
    ("make", "field", "problem"),
    [
        (lambda: Correction(mode="clip"), "mode", "Input should be 'none', 'truncate' or 'mask'"),
        (lambda: Correction(level="batch"), "level", "Input should be 'token', 'sequence' or 'geometric'"),
        (lambda: Correction(upper=0.9), "upper", "Input should be greater than or equal to 1"),
        (lambda: Correction(lower=0.0), "lower", "Input should be greater than 0"),
        (lambda: Correction(upper=math.inf), "upper", "Input should be a finite number"),
        (lambda: Clip(low=-0.1), "low", "Input should be greater than or equal to 0"),
        (lambda: Clip(high=math.nan), "high", "Input should be greater than or equal to 0"),
        (lambda: Clip(low="0.2"), "low", "Input should be a valid number"),
    ],
)
def test_bad_settings_name_the_field(make, field, problem):
    # The same checks as the job configuration's train.correction and train.clip: they are these types.
    with pytest.raises(ValidationError) as error:
        make()
    assert [(e["loc"], e["msg"]) for e in error.value.errors()] == [((field,), problem)]


def test_an_infinite_clip_never_binds():
    assert identity.NEVER_CLIP == Clip(low=1.0, high=math.inf)


def test_clipping_by_hand():
    logp_old = torch.zeros(1, 4)
    logp_theta = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    weights, mask = torch.ones(1, 4), torch.ones(1, 4)
    clip = Clip(low=0.2, high=0.2)
    positive = objective.token_loss(logp_theta, logp_old, weights, torch.tensor([1.0]), mask, clip)
    # A > 0: min(s, clip(s)) = [0.5, 0.9, 1.1, 1.2]
    assert positive.loss.item() == pytest.approx(-(0.5 + 0.9 + 1.1 + 1.2) / 4)
    assert positive.clipped.tolist() == [[False, False, False, True]]
    negative = objective.token_loss(logp_theta, logp_old, weights, torch.tensor([-1.0]), mask, clip)
    # A < 0: min(-s, -clip(s)) = [-0.8, -0.9, -1.1, -1.5]
    assert negative.loss.item() == pytest.approx((0.8 + 0.9 + 1.1 + 1.5) / 4)
    assert negative.clipped.tolist() == [[True, False, False, False]]


def test_objective_is_the_seeds_factorisation_without_correction_or_clipping():
    """(pi_old / mu_old) x (pi_theta / pi_old) = pi_theta / mu_old (eq. 8)."""
    gen = torch.Generator().manual_seed(0)
    logp_mu, logp_old = torch.randn(3, 5, generator=gen) * 0.1, torch.randn(3, 5, generator=gen) * 0.1
    logp_theta = logp_old + torch.randn(3, 5, generator=gen) * 0.01
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 5)
    w = corrections.weights(logp_old - logp_mu, mask, Correction("none"))
    terms = objective.token_loss(logp_theta, logp_old, w, adv, mask, Clip(low=10.0, high=10.0))
    direct = -(torch.exp(logp_theta - logp_mu) * adv[:, None]).mean()
    assert terms.loss.item() == pytest.approx(direct.item(), rel=1e-5)


@pytest.mark.parametrize("mode", get_args(CorrectionMode))
@pytest.mark.parametrize("level", get_args(CorrectionLevel))
@pytest.mark.parametrize("summed_log_rho", [90.0, 1000.0])
def test_huge_mismatch_gives_a_finite_loss_and_gradient(mode, level, summed_log_rho):
    """exp(90) overflows float32 and padding holds junk: weights stay finite (capped), padding never
    reaches an exp, the loss and its gradient are finite."""
    log_rho = torch.tensor([[summed_log_rho / 2, summed_log_rho / 2, math.inf],
                            [summed_log_rho, 0.1, math.nan],
                            [-summed_log_rho, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    logp_old = torch.zeros(3, 3)
    logp_theta = torch.tensor([[0.1, -0.1, 1000.0], [0.0, 0.2, -1000.0], [0.1, 0.0, 0.0]]).requires_grad_()
    correction = Correction(mode, level, upper=2.0, lower=0.5)
    weights = corrections.weights(log_rho, mask, correction)
    assert torch.isfinite(weights).all() and weights.max() <= math.exp(corrections.MAX_LOG_WEIGHT) * 1.0001
    loss, stats = loss_and_metrics(logp_theta, logp_old, logp_old - log_rho, torch.tensor([1.0, -2.0, 0.5]), mask,
                                   Clip(), correction)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp_theta.grad).all()
    assert (logp_theta.grad[~mask] == 0).all()
    # beyond the cap (44.4): rows 0 and 1 at every level but row 1's second token (0.1) at token level
    assert stats.capped_tokens == {"token": 3, "sequence": 4, "geometric": 4}[level]


def test_token_level_gradient_equals_sequence_level_at_ratio_one_and_parts_as_ratios_grow():
    """Eq. 6-7: grad mean_i A_i sum_t r_it = grad mean_i A_i prod_t r_it at r = 1; the gap is first
    order in the policy's distance from the behaviour policy."""
    points = identity.token_vs_sequence_gradients([0.0, 1e-3, 1e-2, 1.0])
    at_one, nearest, near, far = points
    assert at_one.mean_abs_log_ratio == 0.0
    assert at_one.cosine == pytest.approx(1.0, abs=1e-12) and at_one.relative_norm < 1e-12
    assert nearest.relative_norm < near.relative_norm / 5 and near.relative_norm < 0.05
    assert near.cosine > 0.999
    assert far.mean_abs_log_ratio > 0.5 and far.cosine < 0.8 and far.relative_norm > 0.5
    assert [p.mean_abs_log_ratio for p in points] == sorted(p.mean_abs_log_ratio for p in points)
