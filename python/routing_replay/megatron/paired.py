"""Paired routing diagnostics: the trainer's own top-k sets against the rollout's, same tokens.

Megatron's routers see a batch's tokens sequence-major (row ``s * B + b``). A log-prob at position
``t`` depends on the routing of every token at or before ``t`` of its sequence (through
attention), so a position is *affected* by a flip when any layer's own top-k set differs from the
rollout's at any position ``<= t``. Unaffected positions are computed identically under both
routings: their mismatch is the same, and what replay changes is carried by the affected ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingFlips:
    flipped: list[int]
    """Per layer: (token, layer) pairs where the own top-k set differs from the rollout's."""
    compared: list[int]
    """Per layer: (token, layer) pairs with a rollout row to compare with."""
    affected: torch.Tensor
    """``[B, S - 1]`` bool in log-prob positions: a flip at or before the scored position."""


def same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: row ``i`` of ``a`` and ``b`` ``[N, K]`` hold the same experts, in any order."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def routing_flips(own: Sequence[torch.Tensor], rollout: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                  batch_size: int) -> RoutingFlips:
    """``own[l]``, ``rollout[l]`` ``[S * B, K]`` and ``masks[l]`` ``[S * B]`` (True where the rollout
    recorded a row) per router, for a batch of one sequence per row. ``rollout`` may be in any
    integer dtype (``RouterIndices.indices``: the compact uint8 / int16 views) and on any device: the
    comparison runs where ``own`` is."""
    flipped, compared, any_layer = [], [], None
    for own_l, rollout_l, mask_l in zip(own, rollout, masks, strict=True):
        differs = ~same_sets(own_l, rollout_l.to(own_l.device)) & mask_l.to(own_l.device)
        flipped.append(int(differs.sum()))
        compared.append(int(mask_l.sum()))
        any_layer = differs if any_layer is None else any_layer | differs
    per_position = any_layer.view(-1, batch_size).T.int()  # [B, S]
    affected = per_position.cummax(dim=1).values.bool()
    return RoutingFlips(flipped, compared, affected[:, :-1].cpu())
