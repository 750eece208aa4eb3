"""One mini-batch of the update: the loss of the seed's token-level objective and its statistics.

The ratio pi_theta / mu_old is factored as (pi_old / mu_old) x (pi_theta / pi_old): the first,
the train-inference mismatch, is corrected (``corrections``); the second, the staleness, is
PPO-clipped (``objective``). All three are measured on every mini-batch as mergeable sums
(``metrics.MiniBatchStats``): micro-batches and data-parallel ranks merge into the mini-batch's
exact figures, so a run shows how staleness grows with the mini-batch index while mismatch does not.
"""

from __future__ import annotations

import torch

from routing_replay.rl import corrections, objective
from routing_replay.rl.metrics import MiniBatchStats, RatioStats


def loss_and_metrics(logp_theta: torch.Tensor, logp_old: torch.Tensor, logp_rollout: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, clip: objective.Clip,
                     correction: corrections.Correction, num_tokens: int | None = None,
                     ) -> tuple[torch.Tensor, MiniBatchStats]:
    """``logp_*`` and ``mask`` ``[B, T]`` (theta with grad), ``advantages`` ``[B]``; ``num_tokens``
    is the global batch's valid tokens (default: this batch's)."""
    valid = mask.bool()
    log_rho = logp_old.detach() - logp_rollout
    weights = corrections.weights(log_rho, valid, correction)
    terms = objective.token_loss(logp_theta, logp_old, weights, advantages, valid, clip, num_tokens)
    own_rho = log_rho[valid].double().exp()  # valid tokens only: padding's may overflow
    level_log = corrections.level_log_rho(log_rho, valid, correction.level)
    stats = MiniBatchStats(
        mismatch=RatioStats.from_log_ratio(log_rho, valid, {"correction": (correction.lower, correction.upper)}),
        staleness=RatioStats.from_log_ratio(logp_theta - logp_old, valid, {"clip": (1 - clip.low, 1 + clip.high)}),
        ratio=RatioStats.from_log_ratio(logp_theta - logp_rollout, valid),
        clipped_tokens=int(terms.clipped.sum()),
        weight_sum=float(weights[valid].double().sum()),
        changed_tokens=int((~torch.isclose(weights[valid].double(), own_rho, rtol=1e-5)).sum()),
        capped_tokens=int((level_log[valid] > corrections.MAX_LOG_WEIGHT).sum()),
        loss=float(terms.loss.detach()),
    )
    return terms.loss, stats
