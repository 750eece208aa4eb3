"""Mergeable statistics of a log ratio log r = log p - log q over valid tokens: for the mismatch
factor (log pi_old - log mu_old), the staleness factor (log pi_theta - log pi_old) and their product.

A ``RatioStats`` holds sums and counts, never means, so statistics aggregate exactly over
micro-batches and data-parallel ranks: merged stats equal the stats of all their tokens at once.
A ``MiniBatchStats`` gathers those of one mini-batch (``minibatch.loss_and_metrics`` fills it) and
``mini_batch_metrics`` flattens it into the run's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

TAUS = (2.0, 5.0)
"""``beyond_<tau>``: the share of tokens with r > tau or r < 1 / tau."""

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
HISTOGRAM_DECADES = (-9, 3)
HISTOGRAM_BINS_PER_DECADE = 20
HISTOGRAM_EDGES = torch.logspace(*HISTOGRAM_DECADES, (HISTOGRAM_DECADES[1] - HISTOGRAM_DECADES[0])
                                 * HISTOGRAM_BINS_PER_DECADE + 1, dtype=torch.float64)
"""|log r| bins: [0, 1e-9) (underflow, holds exact zeros), 240 log-spaced bins of [1e-9, 1e3), and
[1e3, inf) (overflow). A quantile is reported as its bin's geometric centre (capped at the max), so
within [1e-9, 1e3) it is within a factor 10 ** (1 / 40) ~ 1.059 of the exact order statistic
(relative error < 6%); below 1e-9 it reads 0, at or above 1e3 it reads the max."""


def _bin_centres() -> list[float]:
    edges = HISTOGRAM_EDGES.tolist()
    # inf: an overflow quantile is capped at the max by ``_quantile``
    return [0.0, *(math.sqrt(lo * hi) for lo, hi in zip(edges, edges[1:])), math.inf]


BIN_CENTRES = _bin_centres()


def _log_threshold(ratio: float, dtype: torch.dtype) -> float:
    """log(ratio) rounded to the log ratio's precision, so that a ratio equal to a bound at that
    precision (a truncated weight, a ratio of exactly tau) is not counted beyond it; -inf for <= 0."""
    return float(torch.tensor(math.log(ratio), dtype=dtype)) if ratio > 0 else -math.inf


@dataclass(frozen=True)
class RatioStats:
    """Sums over the valid tokens of one log ratio log r = log p - log q (float64 throughout).

    ``summary()`` gives, all over tokens: ``mean`` and ``std`` (population) of log r; ``mean_abs``,
    ``p50``, ``p90``, ``p99`` and ``max`` of |log r|; ``k1`` = mean(-log r) and ``k3`` =
    mean(r - 1 - log r) (>= 0, lower variance), both estimators of KL(q || p) when the tokens are
    sampled from q; ``beyond_<tau>`` and ``outside_<bound>`` as shares of tokens.

    For the mismatch factor (p = pi_old, q = mu_old) the tokens are the engine's samples, so k1 and
    k3 estimate KL(mu_old || pi_old). For the staleness factor (p = pi_theta, q = pi_old) the tokens
    still come from mu_old, not pi_old: a biased estimate of KL(pi_old || pi_theta) unless each
    token is weighted by pi_old / mu_old.

    Only k3 exponentiates: it is inf when some log r > 709, where r itself exceeds float64.
    """

    tokens: int
    sum_log: float
    sum_squared_log: float
    sum_abs_log: float
    sum_k3: float
    max_abs_log: float
    beyond: tuple[int, ...]
    """Counts beyond each of ``TAUS``."""
    outside: Mapping[str, int]
    """Counts of r outside each named bound [lower, upper]."""
    histogram: tuple[int, ...]
    """Counts of |log r| per bin of ``HISTOGRAM_EDGES`` (underflow first, overflow last)."""

    @classmethod
    def empty(cls) -> RatioStats:
        """No tokens: the identity of ``merge`` (whatever bounds the other side has)."""
        return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, (0,) * len(TAUS), {}, (0,) * len(BIN_CENTRES))

    @classmethod
    def from_log_ratio(cls, log_ratio: torch.Tensor, mask: torch.Tensor,
                       bounds: Mapping[str, tuple[float, float]] = {}) -> RatioStats:
        """``log_ratio`` and ``mask`` of one shape; ``bounds`` name intervals [lower, upper] on r
        (a lower bound <= 0 is no lower bound)."""
        log_r = log_ratio.detach().to("cpu", torch.float64)[mask.bool().cpu()]  # statistics on the CPU
        magnitude = log_r.abs()

        def outside(lower: float, upper: float) -> int:
            below = log_r < _log_threshold(lower, log_ratio.dtype)
            return int((below | (log_r > _log_threshold(upper, log_ratio.dtype))).sum())

        return cls(
            tokens=log_r.numel(),
            sum_log=float(log_r.sum()),
            sum_squared_log=float(log_r.square().sum()),
            sum_abs_log=float(magnitude.sum()),
            sum_k3=float((torch.expm1(log_r) - log_r).sum()),  # expm1: exact near r = 1
            max_abs_log=float(magnitude.max()) if log_r.numel() else 0.0,
            beyond=tuple(int((magnitude > _log_threshold(tau, log_ratio.dtype)).sum()) for tau in TAUS),
            outside={name: outside(lower, upper) for name, (lower, upper) in bounds.items()},
            histogram=tuple(torch.bincount(torch.bucketize(magnitude, HISTOGRAM_EDGES, right=True),
                                           minlength=len(BIN_CENTRES)).tolist()),
        )

    def merge(self, other: RatioStats) -> RatioStats:
        if not other.tokens:
            return self
        if not self.tokens:
            return other
        if self.outside.keys() != other.outside.keys():
            raise ValueError(f"cannot merge stats with bounds {sorted(self.outside)} and {sorted(other.outside)}")
        return RatioStats(
            tokens=self.tokens + other.tokens,
            sum_log=self.sum_log + other.sum_log,
            sum_squared_log=self.sum_squared_log + other.sum_squared_log,
            sum_abs_log=self.sum_abs_log + other.sum_abs_log,
            sum_k3=self.sum_k3 + other.sum_k3,
            max_abs_log=max(self.max_abs_log, other.max_abs_log),
            beyond=tuple(a + b for a, b in zip(self.beyond, other.beyond)),
            outside={name: count + other.outside[name] for name, count in self.outside.items()},
            histogram=tuple(a + b for a, b in zip(self.histogram, other.histogram)),
        )

    __add__ = merge

    def summary(self) -> dict[str, float]:
        if not self.tokens:
            raise ValueError("no valid tokens to measure")
        n = self.tokens
        mean = self.sum_log / n
        return {
            "tokens": float(n),
            "mean": mean,
            "mean_abs": self.sum_abs_log / n,
            "std": math.sqrt(max(self.sum_squared_log / n - mean * mean, 0.0)),  # rounding can dip below 0
            **{name: self._quantile(q) for name, q in QUANTILES.items()},
            "max": self.max_abs_log,
            "k1": -mean,
            "k3": self.sum_k3 / n,
            **{f"beyond_{tau:g}": count / n for tau, count in zip(TAUS, self.beyond)},
            **{f"outside_{name}": count / n for name, count in self.outside.items()},
        }

    def _quantile(self, q: float) -> float:
        """|log r| at the ceil(q * n)-th smallest token (numpy's ``inverted_cdf``), to bin resolution."""
        rank = max(math.ceil(q * self.tokens), 1)
        seen = 0
        for count, centre in zip(self.histogram, BIN_CENTRES):
            seen += count
            if seen >= rank:
                return min(centre, self.max_abs_log)
        raise AssertionError("histogram holds fewer counts than tokens")


@dataclass(frozen=True)
class MiniBatchStats:
    """Sums over valid tokens (every field shares ``mismatch.tokens``); ``+`` merges."""

    mismatch: RatioStats
    """log pi_old - log mu_old, bounds ``correction`` = [lower, upper] on each token's own rho."""
    staleness: RatioStats
    """log pi_theta - log pi_old, bounds ``clip`` = [1 - eps_low, 1 + eps_high]."""
    ratio: RatioStats
    """log pi_theta - log mu_old: the seed's ratio, whose size bounds the surrogate's validity."""
    clipped_tokens: int
    """Tokens where the clipped branch was taken."""
    weight_sum: float
    """Sum of the correction weights."""
    changed_tokens: int
    """Tokens whose weight differs from their own rho: truncated, masked, set by the sequence, capped."""
    capped_tokens: int
    """Tokens whose log rho at the correction level exceeds ``corrections.MAX_LOG_WEIGHT``: the cap
    sets their weight in mode ``none``; truncation or masking acts on them in the others."""
    loss: float
    """Sum of the loss contributions: each is already divided by the global token count, so the
    merged sum is the mini-batch's loss."""

    @classmethod
    def empty(cls) -> MiniBatchStats:
        return cls(RatioStats.empty(), RatioStats.empty(), RatioStats.empty(), 0, 0.0, 0, 0, 0.0)

    def merge(self, other: MiniBatchStats) -> MiniBatchStats:
        return MiniBatchStats(
            mismatch=self.mismatch + other.mismatch,
            staleness=self.staleness + other.staleness,
            ratio=self.ratio + other.ratio,
            clipped_tokens=self.clipped_tokens + other.clipped_tokens,
            weight_sum=self.weight_sum + other.weight_sum,
            changed_tokens=self.changed_tokens + other.changed_tokens,
            capped_tokens=self.capped_tokens + other.capped_tokens,
            loss=self.loss + other.loss,
        )

    __add__ = merge


def mini_batch_metrics(index: int, stats: MiniBatchStats) -> dict[str, float]:
    """Flat metrics of mini-batch ``index``: ``{mismatch,staleness,ratio}/mb{i}/<RatioStats.summary key>``,
    ``clip_fraction/mb{i}``, ``correction/mb{i}/{weight_mean,changed,capped}`` (shares of tokens
    but the mean) and ``loss/mb{i}``. Raises ValueError for stats of no tokens."""
    factors = {"mismatch": stats.mismatch, "staleness": stats.staleness, "ratio": stats.ratio}
    out = {f"{name}/mb{index}/{key}": value
           for name, factor in factors.items() for key, value in factor.summary().items()}
    tokens = stats.mismatch.tokens
    out[f"clip_fraction/mb{index}"] = stats.clipped_tokens / tokens
    out[f"correction/mb{index}/weight_mean"] = stats.weight_sum / tokens
    out[f"correction/mb{index}/changed"] = stats.changed_tokens / tokens
    out[f"correction/mb{index}/capped"] = stats.capped_tokens / tokens
    out[f"loss/mb{index}"] = stats.loss
    return out
