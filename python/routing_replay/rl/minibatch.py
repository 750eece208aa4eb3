"""One mini-batch of the update: the loss of the seed's token-level objective and its metrics.

The ratio pi_theta / mu_old is factored as (pi_old / mu_old) x (pi_theta / pi_old): the first,
the train-inference mismatch, is corrected (``corrections``); the second, the staleness, is
PPO-clipped (``objective``). Both are measured with ``metrics.ratio_stats`` on every mini-batch,
so a run shows how staleness grows with the mini-batch index while mismatch does not.
"""

from __future__ import annotations

import torch

from routing_replay.rl import corrections, metrics, objective


def loss_and_metrics(logp_theta: torch.Tensor, logp_old: torch.Tensor, logp_rollout: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, clip: objective.Clip,
                     correction: corrections.Correction, num_tokens: int | None = None,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """``logp_*`` and ``mask`` ``[B, T]`` (theta with grad), ``advantages`` ``[B]``. Metrics:
    ``mismatch/*`` of log pi_old - log mu_old, ``staleness/*`` of log pi_theta - log pi_old,
    ``clip_fraction``, ``correction/weight_mean`` and ``correction/changed`` (fraction of tokens
    whose weight differs from their own ratio: truncated, masked, or set by the sequence)."""
    log_rho = logp_old.detach() - logp_rollout
    weights = corrections.weights(log_rho, mask, correction)
    terms = objective.token_loss(logp_theta, logp_old, weights, advantages, mask, clip, num_tokens)
    valid = mask.bool()
    rho = log_rho.float().exp()
    stats = {
        **{f"mismatch/{k}": v for k, v in metrics.ratio_stats(log_rho, valid).items()},
        **{f"staleness/{k}": v for k, v in metrics.ratio_stats(logp_theta.detach() - logp_old, valid).items()},
        "clip_fraction": float(terms.clip_fraction),
        "correction/weight_mean": float(weights[valid].mean()),
        "correction/changed": float((~torch.isclose(weights[valid], rho[valid], rtol=1e-5)).float().mean()),
    }
    return terms.loss, stats
