"""Statistics of a log ratio log(p/q) over valid tokens: for the mismatch factor
(log pi_old - log mu_old) and the staleness factor (log pi_theta - log pi_old) alike.

- ``mean_abs``: mean |log p - log q|
- ``k3``: mean of r - log r - 1 with r = p / q (a low-variance KL(q || p) estimator, >= 0)
- ``beyond_tau``: fraction of tokens with r > tau or r < 1 / tau, for each tau
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ratio_stats(log_ratio: torch.Tensor, mask: torch.Tensor, taus: Sequence[float] = (2.0, 5.0)) -> dict[str, float]:
    valid = log_ratio.detach().float()[mask.bool()]
    if valid.numel() == 0:
        raise ValueError("no valid tokens to measure")
    stats = {"mean_abs": float(valid.abs().mean()), "k3": float((valid.exp() - valid - 1).mean())}
    for tau in taus:
        stats[f"beyond_{tau:g}"] = float((valid.abs() > torch.log(torch.tensor(tau))).float().mean())
    return stats
