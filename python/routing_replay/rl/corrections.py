"""Train-inference correction of the mismatch factor rho_t = pi_old(y_t) / mu_old(y_t).

mode:
  ``none``      w = rho (the plain importance weight)
  ``truncate``  w = min(rho, upper)                          (truncated IS, TIS)
  ``mask``      w = rho if lower <= rho <= upper else 0      (masked IS, IcePop)
level:
  ``token``     each token uses its own rho_t
  ``sequence``  every token of a sequence uses prod_t rho_t
  ``geometric`` every token uses exp(mean_t log rho_t)

Weights are constants for the gradient (they correct the sampling distribution, not the policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("none", "truncate", "mask")
LEVELS = ("token", "sequence", "geometric")


@dataclass(frozen=True)
class Correction:
    mode: str = "truncate"
    """none | truncate | mask"""
    level: str = "token"
    """token | sequence | geometric"""
    upper: float = 2.0
    """C: the truncation bound, or the upper mask bound."""
    lower: float = 0.5
    """The lower mask bound (mask mode only)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"correction.mode must be one of {MODES}, got {self.mode!r}")
        if self.level not in LEVELS:
            raise ValueError(f"correction.level must be one of {LEVELS}, got {self.level!r}")
        if not 0 < self.lower <= 1 <= self.upper:
            raise ValueError(f"correction bounds need 0 < lower <= 1 <= upper, got {self.lower}, {self.upper}")


def weights(log_rho: torch.Tensor, mask: torch.Tensor, correction: Correction) -> torch.Tensor:
    """``[B, T]`` correction weights (detached) from ``log_rho = log pi_old - log mu_old``."""
    log_rho = log_rho.detach().float() * mask
    if correction.level == "token":
        level_log = log_rho
    else:
        total = log_rho.sum(dim=1, keepdim=True)
        if correction.level == "geometric":
            total = total / mask.sum(dim=1, keepdim=True).clamp(min=1)
        level_log = total.expand_as(log_rho)
    rho = level_log.exp()
    if correction.mode == "truncate":
        rho = rho.clamp(max=correction.upper)
    elif correction.mode == "mask":
        rho = torch.where((rho >= correction.lower) & (rho <= correction.upper), rho, torch.zeros_like(rho))
    return rho * mask
