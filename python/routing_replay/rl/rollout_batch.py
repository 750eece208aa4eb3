"""A rollout batch as the trainer receives it, and its tensors aligned to log-prob positions.

The trainer trains on exactly the token ids SGLang returned (never re-tokenised text): a
``Sample`` carries the prompt ids sent, the response ids returned and SGLang's log-prob of each
response token (mu_old). Log-prob position ``t`` scores token ``t + 1``, so response token ``j``
sits at position ``len(prompt) - 1 + j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    key: str
    """Unique per rollout attempt; also the routing's key on the wire."""
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    rollout_logprobs: tuple[float, ...]
    """mu_old: the engine's log-prob of each response token, at the sampling temperature."""
    reward: float = 0.0
    advantage: float = 0.0
    """Group-normalised; computed by the driver, which sees whole groups."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"sample {self.key!r}: empty prompt")
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(f"sample {self.key!r}: {len(self.rollout_logprobs)} rollout log-probs for "
                             f"{len(self.response_ids)} response tokens")

    @property
    def token_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.response_ids]


def response_tensors(samples: Sequence[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, mu)``, both ``[B, width]`` in log-prob positions: True / mu_old at response tokens."""
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    mu = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        begin = len(sample.prompt_ids) - 1
        end = begin + len(sample.response_ids)
        if end > width:
            raise ValueError(f"sample {sample.key!r}: {end} log-prob positions exceed the batch's {width}")
        mask[row, begin:end] = True
        mu[row, begin:end] = torch.tensor(sample.rollout_logprobs, dtype=torch.float32)
    return mask, mu


def split(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` contiguous, equal slices (mini-batches, data-parallel shares)."""
    if parts < 1 or count % parts:
        raise ValueError(f"{count} samples do not split into {parts} equal parts")
    size = count // parts
    return [range(i * size, (i + 1) * size) for i in range(parts)]
