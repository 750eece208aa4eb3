"""Train-inference correction of the mismatch factor rho_t = pi_old(y_t) / mu_old(y_t).

mode:
  ``none``      w = rho (the plain importance weight)
  ``truncate``  w = min(rho, upper)                          (truncated IS, TIS)
  ``mask``      w = rho if lower <= rho <= upper else 0      (masked IS, IcePop)
level:
  ``token``     each token uses its own rho_t
  ``sequence``  every token of a sequence uses prod_t rho_t
  ``geometric`` every token uses exp(mean_t log rho_t)

Weights are constants for the gradient (they correct the sampling distribution, not the policy),
and finite: their log is capped at ``MAX_LOG_WEIGHT`` (which binds only in mode ``none``). The
settings, ``Correction``, live in ``rl.settings`` (torch-free: the job configuration imports them).
"""

from __future__ import annotations

import math

import torch

from routing_replay.rl.settings import Correction

MAX_LOG_WEIGHT = math.log(torch.finfo(torch.float32).max) / 2
"""Cap on a weight's log (~44.4, a weight of ~1.8e19): half the float32 exponent range, so a weight
times a staleness ratio, an advantage and a token count stays finite, and so does the squared
gradient norm. It binds only in mode ``none`` (truncation and masking bound weights far lower):
a sequence whose summed log rho is 90 would otherwise weigh inf and make the loss NaN."""


def level_log_rho(log_rho: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``[B, T]`` float64 log rho at the correction level: each token's own, its sequence's sum, or
    its sequence's mean; 0 at padding (whatever ``log_rho`` holds there, even inf or nan)."""
    valid = mask.bool()
    own = torch.where(valid, log_rho.detach().to(torch.float64), 0.0)
    if level == "token":
        return own
    total = own.sum(dim=1, keepdim=True)
    if level == "geometric":
        total = total / valid.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(valid, total.expand_as(own), 0.0)


def weights(log_rho: torch.Tensor, mask: torch.Tensor, correction: Correction) -> torch.Tensor:
    """``[B, T]`` float32 correction weights (detached, 0 at padding) from
    ``log_rho = log pi_old - log mu_old``; log weights are capped at ``MAX_LOG_WEIGHT``."""
    level_log = level_log_rho(log_rho, mask, correction.level)
    # Padding holds 0, so exp never sees its values. Rounded to float32 before the bounds, so a
    # ratio equal to a bound at the log ratios' precision counts as inside it.
    rho = level_log.clamp(max=MAX_LOG_WEIGHT).exp().float()
    if correction.mode == "truncate":
        rho = rho.clamp(max=correction.upper)
    elif correction.mode == "mask":
        rho = torch.where((rho >= correction.lower) & (rho <= correction.upper), rho, 0.0)
    return torch.where(mask.bool(), rho, 0.0)
