"""One step's metrics as mergeable sums: exact over micro-batches and data-parallel ranks.

Each trainer rank fills a ``StepStats`` over its micro-batches; the driver merges the ranks' and
flattens the result into the run's metrics. Nothing is a mean of means: ratio statistics are
``RatioStats`` (sums and histograms), shares are (numerator, denominator) counts, totals add up,
times take the slowest rank's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from routing_replay.rl.metrics import MiniBatchStats, RatioStats, mini_batch_metrics


@dataclass
class StepStats:
    ratios: dict[str, RatioStats] = field(default_factory=dict)
    """Flattened as ``{name}/{stat}`` for every statistic of ``RatioStats.summary``."""
    shares: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(numerator, denominator): flattened as their quotient."""
    totals: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    """Per-rank values of which the largest counts: phase times (the slowest rank's), and values
    every rank computes alike (global gradient norms)."""
    mini_batches: dict[int, MiniBatchStats] = field(default_factory=dict)

    def add_ratio(self, name: str, stats: RatioStats) -> None:
        self.ratios[name] = self.ratios[name] + stats if name in self.ratios else stats

    def add_share(self, name: str, numerator: float, denominator: float) -> None:
        num, den = self.shares.get(name, (0.0, 0.0))
        self.shares[name] = (num + float(numerator), den + float(denominator))

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def add_mini_batch(self, index: int, stats: MiniBatchStats) -> None:
        self.mini_batches[index] = self.mini_batches[index] + stats if index in self.mini_batches else stats

    def merge(self, other: StepStats) -> StepStats:
        merged = StepStats(dict(self.ratios), dict(self.shares), dict(self.totals), dict(self.maxima),
                           dict(self.mini_batches))
        for name, stats in other.ratios.items():
            merged.add_ratio(name, stats)
        for name, (num, den) in other.shares.items():
            merged.add_share(name, num, den)
        for name, value in other.totals.items():
            merged.add_total(name, value)
        for name, value in other.maxima.items():
            merged.maxima[name] = max(value, merged.maxima.get(name, value))
        for index, stats in other.mini_batches.items():
            merged.add_mini_batch(index, stats)
        return merged

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, stats in self.ratios.items():
            if stats.tokens:
                out.update({f"{name}/{stat}": value for stat, value in stats.summary().items()})
        out.update({name: num / den for name, (num, den) in self.shares.items() if den})
        out.update(self.totals)
        out.update(self.maxima)
        for index, stats in self.mini_batches.items():
            out.update(mini_batch_metrics(index, stats))
        return out


def merged(per_rank: Iterable[StepStats]) -> StepStats:
    total = StepStats()
    for stats in per_rank:
        total = total.merge(stats)
    return total


def paired_ratios(flat: dict[str, float]) -> dict[str, float]:
    """What the paired diagnostics mean, from their flattened statistics: ``paired/k3_reduction``
    (k3 of the mismatch under the trainer's own routing over k3 under the rollout's: what replaying
    the rollout's routing removes) and ``paired/flipped_k3_share`` (the share of the own-routing
    k3, summed over tokens, carried by tokens affected by a routing flip)."""
    out = {}
    own, rollout = flat.get("paired/own/k3"), flat.get("paired/rollout/k3")
    if own is not None and rollout:
        out["paired/k3_reduction"] = own / rollout
    flipped = flat.get("paired/own/flipped/k3", 0.0) * flat.get("paired/own/flipped/tokens", 0.0)
    if own:
        out["paired/flipped_k3_share"] = flipped / (own * flat["paired/own/tokens"])
    return out
