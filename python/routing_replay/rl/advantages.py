"""Group-normalised advantages (GRPO): A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

Rewards come in groups of G responses to the same prompt, contiguous: ``rewards[g*G : (g+1)*G]``.
With ``normalize_std=False`` only the group mean is subtracted (Dr. GRPO).
"""

from __future__ import annotations

import torch


def group_normalized(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.view(-1)
