"""The token-level surrogate with both factors explicit.

    loss = - sum_t w_t * min(s_t * A, clip(s_t, 1 - eps_low, 1 + eps_high) * A) / N

where s_t = pi_theta(y_t) / pi_old(y_t) is the staleness factor (PPO-clipped), w_t the corrected
mismatch factor pi_old / mu_old (``corrections.weights``), A the sequence's advantage broadcast to
its tokens, and N the number of valid tokens in the global batch (token-mean). With no correction
and no clipping active, w_t * s_t = pi_theta / mu_old: the seed's objective. The settings, ``Clip``,
live in ``rl.settings`` (torch-free: the job configuration imports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routing_replay.rl.settings import Clip


@dataclass(frozen=True)
class LossTerms:
    loss: torch.Tensor
    clipped: torch.Tensor
    """``[B, T]`` bool: valid tokens where the clipped branch was taken (they pass no gradient)."""


def token_loss(logp_theta: torch.Tensor, logp_old: torch.Tensor, correction_weights: torch.Tensor,
               advantages: torch.Tensor, mask: torch.Tensor, clip: Clip, num_tokens: int | None = None) -> LossTerms:
    """``logp_*``, ``correction_weights``, ``mask`` are ``[B, T]``; ``advantages`` is ``[B]``.
    ``num_tokens`` normalises across mini-batches (default: this batch's valid tokens)."""
    valid = mask.bool()
    # exp only of valid tokens' log ratios: padding's may be inf, and inf * 0 is nan (in the
    # gradient too, unless torch.where selects before exp)
    staleness = torch.exp(torch.where(valid, logp_theta - logp_old.detach(), 0.0))
    adv = advantages[:, None].float()
    unclipped = staleness * adv
    clipped = staleness.clamp(1 - clip.low, 1 + clip.high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    total = num_tokens if num_tokens is not None else valid.sum().clamp(min=1)
    loss = -torch.where(valid, correction_weights.detach() * surrogate, 0.0).sum() / total
    return LossTerms(loss, (clipped < unclipped) & valid)
