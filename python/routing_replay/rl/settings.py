"""The algorithm's settings, without torch: the job configuration (``config``) imports them for
its dry run. ``corrections`` and ``objective`` take them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from routing_replay.settings import SETTINGS

CorrectionMode = Literal["none", "truncate", "mask"]
CorrectionLevel = Literal["token", "sequence", "geometric"]


@dataclass(frozen=True, config=SETTINGS)
class Correction:
    """The correction of the mismatch factor pi_old / mu_old (``corrections.weights``); the job's
    ``train.correction``."""

    mode: CorrectionMode = "truncate"
    """none (the plain ratio) | truncate (min(rho, upper): TIS) | mask (rho inside [lower, upper], else 0: IcePop)"""
    level: CorrectionLevel = "token"
    """token (each token's own ratio) | sequence (the sequence's product) | geometric (its geometric mean)"""
    upper: float = Field(default=2.0, ge=1.0, strict=True)
    """C: the truncation bound, or the upper mask bound."""
    lower: float = Field(default=0.5, gt=0.0, le=1.0, strict=True)
    """The lower mask bound (mask mode only)."""


@dataclass(frozen=True, config={**SETTINGS, "allow_inf_nan": True})
class Clip:
    """PPO clipping of the staleness factor pi_theta / pi_old to [1 - low, 1 + high]
    (``objective.token_loss``); the job's ``train.clip``. Infinity is allowed (``.inf``: no bound);
    NaN fails the bounds."""

    low: float = Field(default=0.2, ge=0, strict=True)
    high: float = Field(default=0.28, ge=0, strict=True)
