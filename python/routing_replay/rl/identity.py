"""The token-level surrogate's gradient against the sequence-level objective's, as ratios leave 1.

The sequence-level objective is J(theta) = mean_i A_i prod_t r_it with r_it = pi_theta(y_it) /
mu_old(y_it). The project's token-level loss (no correction, clipping that never binds) is
-mean_i A_i sum_t r_it when normalised by the number of sequences. At r = 1 both gradients are
mean_i A_i sum_t grad log pi_theta(y_it): the first-order identity that makes the token-level
surrogate valid. Away from 1 they part: the sequence's product weighs each token's gradient by the
other tokens' ratios, the token sum does not.

``token_vs_sequence_gradients`` measures how far, for a tabular softmax policy (one row of logits
per position) moved away from the behaviour policy that sampled the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from routing_replay.rl import corrections, objective
from routing_replay.rl.minibatch import loss_and_metrics

NEVER_CLIP = objective.Clip(low=1.0, high=math.inf)
"""Staleness clipped to [0, inf]: never binds."""


class IdentityPoint(NamedTuple):
    distance: float
    """Scale of the step from the behaviour policy's logits."""
    mean_abs_log_ratio: float
    """Mean |log pi_theta / mu_old| over the sampled tokens."""
    cosine: float
    """Cosine similarity of the token-level and sequence-level gradients."""
    relative_norm: float
    """|g_token - g_sequence| / |g_sequence|."""


def _log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probs of ``tokens`` under per-position logits ``[T, V]``."""
    return torch.log_softmax(logits, dim=-1)[torch.arange(tokens.shape[1]), tokens]


def token_vs_sequence_gradients(distances: Sequence[float], *, sequences: int = 16, length: int = 8,
                                vocabulary: int = 6, seed: int = 0) -> list[IdentityPoint]:
    """One point per distance: logits theta = theta_behaviour + distance * direction (a fixed random
    direction), tokens sampled once from the behaviour policy; float64 throughout."""
    generator = torch.Generator().manual_seed(seed)
    behaviour = torch.randn(length, vocabulary, generator=generator, dtype=torch.float64)
    direction = torch.randn(length, vocabulary, generator=generator, dtype=torch.float64)
    probabilities = torch.softmax(behaviour, dim=-1)
    tokens = torch.multinomial(probabilities, sequences, replacement=True, generator=generator).T
    advantages = torch.randn(sequences, generator=generator)  # float32, as the loss takes them
    logp_behaviour = _log_probs(behaviour, tokens)
    mask = torch.ones(sequences, length, dtype=torch.bool)
    points = []
    for distance in distances:
        theta = (behaviour + distance * direction).requires_grad_()
        logp = _log_probs(theta, tokens)
        # pi_old = mu_old: the ratio is all staleness, uncorrected and unclipped
        loss, stats = loss_and_metrics(logp, logp_behaviour, logp_behaviour, advantages, mask, NEVER_CLIP,
                                       corrections.Correction("none"), num_tokens=sequences)
        token_gradient = -torch.autograd.grad(loss, theta, retain_graph=True)[0]
        objective_value = (advantages.double() * (logp - logp_behaviour).sum(dim=1).exp()).mean()
        sequence_gradient = torch.autograd.grad(objective_value, theta)[0]
        cosine = torch.nn.functional.cosine_similarity(token_gradient.flatten(), sequence_gradient.flatten(), dim=0)
        relative_norm = (token_gradient - sequence_gradient).norm() / sequence_gradient.norm()
        points.append(IdentityPoint(distance, stats.ratio.summary()["mean_abs"], float(cosine), float(relative_norm)))
    return points
