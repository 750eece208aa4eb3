"""Per-token log-probabilities and entropy of response tokens under a megatron-core GPTModel.

Sequences are right-padded into ``[B, S]`` (``Batch.from_sequences``) or packed several to a row
(``Batch.packed``: block-diagonal causal attention, positions restarting per sequence); position
``t`` of the result scores token ``t + 1`` given the tokens of its own sequence up to ``t``.
Padding and other sequences are masked out of attention, so a sequence's log-probs do not depend
on what it is batched with. ``temperature`` divides the logits
first: mu_old from SGLang depends on the sampling temperature, so the trainer applies the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor
    """``[B, S]`` int64."""
    segments: torch.Tensor
    """``[B, S]`` int64: which sequence of the row a position belongs to; -1 for padding."""
    placements: tuple[tuple[int, int], ...]
    """Per sequence, in input order: (row, offset of its first token)."""

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], pad_id: int = 0) -> Batch:
        """One sequence per row, right-padded."""
        return cls._build(sequences, [(i, 0) for i in range(len(sequences))], max(len(s) for s in sequences), pad_id)

    @classmethod
    def packed(cls, sequences: Sequence[Sequence[int]], row_len: int, pad_id: int = 0) -> Batch:
        """Sequences packed first-fit into rows of ``row_len`` tokens."""
        fill: list[int] = []
        placements = []
        for seq in sequences:
            if len(seq) > row_len:
                raise ValueError(f"a sequence of {len(seq)} tokens does not fit rows of {row_len}")
            row = next((r for r, used in enumerate(fill) if used + len(seq) <= row_len), len(fill))
            if row == len(fill):
                fill.append(0)
            placements.append((row, fill[row]))
            fill[row] += len(seq)
        return cls._build(sequences, placements, row_len, pad_id)

    @classmethod
    def _build(cls, sequences, placements, row_len: int, pad_id: int) -> Batch:
        rows = 1 + max(r for r, _ in placements)
        tokens = torch.full((rows, row_len), pad_id, dtype=torch.int64)
        segments = torch.full((rows, row_len), -1, dtype=torch.int64)
        for index, (seq, (row, offset)) in enumerate(zip(sequences, placements)):
            tokens[row, offset : offset + len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
            segments[row, offset : offset + len(seq)] = index
        return cls(tokens, segments, tuple(placements))

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]``: real tokens per row."""
        return self.valid.sum(1)

    @property
    def valid(self) -> torch.Tensor:
        """``[B, S]`` bool: real (non-padding) positions."""
        return self.segments >= 0

    def positions(self) -> torch.Tensor:
        """``[B, S]``: position of each token within its own sequence."""
        index = torch.arange(self.tokens.shape[1], device=self.tokens.device).expand_as(self.tokens)
        starts = torch.zeros_like(self.tokens)
        for row, offset in self.placements:
            starts[row, offset:] = offset
        return (index - starts).clamp(min=0)

    def attention_mask(self) -> torch.Tensor:
        """``[B, 1, S, S]`` bool, True = masked: causal, within one sequence, padding hidden."""
        seq = self.tokens.shape[1]
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=self.tokens.device), diagonal=1)
        other = self.segments[:, :, None] != self.segments[:, None, :]
        return (causal[None] | other | ~self.valid[:, None, :])[:, None]


@dataclass(frozen=True)
class TokenScores:
    logprobs: torch.Tensor
    """``[B, S - 1]``: log p(token t+1 | tokens <= t)."""
    entropy: torch.Tensor
    """``[B, S - 1]``: entropy of the distribution that scored token t+1."""
    valid: torch.Tensor
    """``[B, S - 1]`` bool: both tokens are real and belong to the same sequence."""

    def to(self, device: torch.device | str) -> TokenScores:
        return TokenScores(self.logprobs.to(device), self.entropy.to(device), self.valid.to(device))


def score(model, batch: Batch, temperature: float = 1.0) -> TokenScores:
    """Runs ``model`` over ``batch`` and scores every next token (grad flows when enabled)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = next(model.parameters()).device
    if batch.tokens.device != device:
        batch = Batch(batch.tokens.to(device), batch.segments.to(device), batch.placements)
    logits = model(batch.tokens, batch.positions(), attention_mask=batch.attention_mask())
    return scores_from_logits(logits[..., : getattr(model, "vocab_size", logits.shape[-1])], batch, temperature)


def scores_from_logits(logits: torch.Tensor, batch: Batch, temperature: float = 1.0) -> TokenScores:
    log_probs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    targets = batch.tokens[:, 1:].unsqueeze(-1)
    token_logprobs = log_probs.gather(-1, targets).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    same_sequence = (batch.segments[:, 1:] == batch.segments[:, :-1]) & batch.valid[:, 1:]
    return TokenScores(token_logprobs, entropy, same_sequence)
