"""Paired routing diagnostics: flips per layer, and which scored positions a flip can reach."""

import torch

from routing_replay.megatron.paired import routing_flips, same_sets


def sequence_major(per_row: list[torch.Tensor]) -> torch.Tensor:
    """[B] rows of [S, K] -> Megatron's [S * B, K] (row s * B + b)."""
    return torch.stack(per_row, dim=1).reshape(-1, per_row[0].shape[-1])


def test_same_sets_ignores_order():
    a = torch.tensor([[1, 2], [3, 4], [5, 6]])
    b = torch.tensor([[2, 1], [3, 5], [6, 5]])
    assert same_sets(a, b).tolist() == [True, False, True]


def test_a_flip_reaches_its_position_and_every_later_one_of_its_sequence_only():
    # Two sequences (B = 2) of 4 tokens, two layers, top-2; rows are s * B + b.
    sequence = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    rollout = [sequence_major([sequence, sequence]) for _ in range(2)]
    own = [layer.flip(-1).clone() for layer in rollout]  # the same sets, in another order
    own[1][1 * 2 + 0] = torch.tensor([3, 4])  # layer 1, position 1 of sequence 0: a flip
    masks = [torch.ones(8, dtype=torch.bool) for _ in range(2)]
    masks[1][3 * 2 + 1] = False  # layer 1, position 3 of sequence 1: no rollout row...
    own[1][3 * 2 + 1] = torch.tensor([9, 9])  # ...so a different own set there is not a flip
    flips = routing_flips(own, rollout, masks, batch_size=2)
    assert flips.flipped == [0, 1] and flips.compared == [8, 7]
    # log-prob positions 0..2 score tokens 1..3 from the hidden states at positions 0..2
    assert flips.affected.tolist() == [[False, True, True], [False, False, False]]


def test_flips_against_compact_rollout_ids_equal_those_against_int64():
    """The trainer compares its own int64 top-k with the rollout's uint8 ``RouterIndices`` views."""
    from routing_replay.megatron.replay import rollout_to_router_indices

    gen = torch.Generator().manual_seed(0)
    rows = [torch.rand(n, 2, 16, generator=gen).argsort(-1)[..., :2].to(torch.uint8) for n in (5, 3)]
    routing = rollout_to_router_indices(rows, [0, 1], seq_len=6)
    own = [torch.where(torch.rand(12, 1, generator=gen) < 0.3, torch.tensor([14, 15]), ids.long())
           for ids in routing.indices]
    compact = routing_flips(own, routing.indices, routing.masks, batch_size=2)
    wide = routing_flips(own, [ids.long() for ids in routing.indices], routing.masks, batch_size=2)
    assert routing.ids.dtype == torch.uint8 and compact.flipped == wide.flipped and sum(compact.flipped) > 0
    assert compact.compared == wide.compared == [8, 8] and torch.equal(compact.affected, wide.affected)
