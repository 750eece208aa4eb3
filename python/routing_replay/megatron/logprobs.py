"""Per-token log-probabilities and entropy of response tokens under a megatron-core GPTModel.

Sequences are right-padded into ``[B, S]``; position ``t`` of the result scores token ``t + 1``
given tokens ``0..t`` (the first token has no log-prob). Padding is masked out of attention, so a
sequence's log-probs do not depend on what it is batched with. ``temperature`` divides the logits
first: mu_old from SGLang depends on the sampling temperature, so the trainer applies the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor
    """``[B, S]`` int64, right-padded."""
    lengths: torch.Tensor
    """``[B]`` int64: real tokens per sequence."""

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], pad_id: int = 0) -> Batch:
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
        tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.int64)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
        return cls(tokens, lengths)

    @property
    def valid(self) -> torch.Tensor:
        """``[B, S]`` bool: real (non-padding) positions."""
        return torch.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    def attention_mask(self) -> torch.Tensor:
        """``[B, 1, S, S]`` bool, True = masked: causal, and padding keys hidden."""
        seq = self.tokens.shape[1]
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        return (causal[None] | ~self.valid[:, None, :])[:, None]


@dataclass(frozen=True)
class TokenScores:
    logprobs: torch.Tensor
    """``[B, S - 1]``: log p(token t+1 | tokens <= t)."""
    entropy: torch.Tensor
    """``[B, S - 1]``: entropy of the distribution that scored token t+1."""
    valid: torch.Tensor
    """``[B, S - 1]`` bool: both tokens are real."""


def score(model, batch: Batch, temperature: float = 1.0) -> TokenScores:
    """Runs ``model`` over ``batch`` and scores every next token (grad flows when enabled)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    seq = batch.tokens.shape[1]
    positions = torch.arange(seq)[None].expand_as(batch.tokens)
    logits = model(batch.tokens, positions, attention_mask=batch.attention_mask())
    return scores_from_logits(logits[..., : getattr(model, "vocab_size", logits.shape[-1])], batch, temperature)


def scores_from_logits(logits: torch.Tensor, batch: Batch, temperature: float = 1.0) -> TokenScores:
    log_probs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    targets = batch.tokens[:, 1:].unsqueeze(-1)
    token_logprobs = log_probs.gather(-1, targets).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return TokenScores(token_logprobs, entropy, batch.valid[:, 1:])
