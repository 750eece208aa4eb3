"""Token-order mapping for replay: rollout rows placed in Megatron's sequence-major order (compact
until the device, equal to the former int64 host placement), and context parallelism against
megatron-core's own split."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from routing_replay.megatron.replay import RecordedRouting, RouterIndices, rollout_to_router_indices
from tests.support.token_order import context_parallel_positions, context_parallel_rows, sequence_parallel_shard


def int64_host_placement(rows, starts, seq_len, valid=None, placements=None):
    """The placement as it was before ids stayed compact (the reference): the whole batch widened
    to int64 on the host, then copied per layer."""
    placements = list(placements) if placements is not None else [(i, 0) for i in range(len(rows))]
    batch = 1 + max(row for row, _ in placements)
    layers, top_k = rows[0].shape[1], rows[0].shape[2]
    indices = torch.zeros(seq_len, batch, layers, top_k, dtype=torch.int64)
    mask = torch.zeros(seq_len, batch, layers, dtype=torch.bool)
    for i, (sample, start, (b, offset)) in enumerate(zip(rows, starts, placements)):
        begin, end = offset + start, offset + start + sample.shape[0]
        indices[begin:end, b] = sample.long()
        present = torch.ones(sample.shape[:2], dtype=torch.bool)
        if valid is not None and valid[i] is not None:
            present = valid[i].bool()
        mask[begin:end, b] = present
    flat_ids, flat_mask = indices.reshape(seq_len * batch, layers, top_k), mask.reshape(seq_len * batch, layers)
    return [flat_ids[:, l].contiguous() for l in range(layers)], [flat_mask[:, l].contiguous() for l in range(layers)]


class Allocations(TorchDispatchMode):
    """Every tensor an op creates with storage of its own (views and in-place writes create none)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.created.append((t.dtype, t.untyped_storage().nbytes()))
        return out


def random_rollout(gen: torch.Generator, lengths, starts, dtype: torch.dtype, experts: int, layers=3, top_k=2):
    """Rows per sample as the wire delivers them (``dtype``), every other sample with a validity mask."""
    rows = [torch.randint(0, experts, (n, layers, top_k), generator=gen).to(dtype) for n in lengths]
    valid = [torch.rand(n, layers, generator=gen) < 0.8 if i % 2 else None for i, n in enumerate(lengths)]
    return rows, valid


@pytest.mark.parametrize(("dtype", "experts"), [(torch.uint8, 256), (torch.int16, 1000)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_placement_equals_the_int64_host_reference_and_stays_compact(dtype, experts, packed):
    gen = torch.Generator().manual_seed(7)
    lengths, starts = [5, 9, 3, 7], [0, 2, 1, 0]
    placements = [(0, 0), (0, 6), (1, 0), (1, 5)] if packed else None  # row, offset: two samples per row
    seq_len = 17 if packed else 12
    rows, valid = random_rollout(gen, lengths, starts, dtype, experts)
    want_ids, want_masks = int64_host_placement(rows, starts, seq_len, valid, placements)
    with Allocations() as seen:
        got = rollout_to_router_indices(rows, starts, seq_len, valid, placements)
    assert got.ids.dtype == dtype and got.tokens == want_ids[0].shape[0]
    for layer, (ids, mask) in enumerate(zip(got.indices, got.masks)):
        assert torch.equal(mask, want_masks[layer]), f"layer {layer}: masks differ"
        assert torch.equal(ids.long(), want_ids[layer]), f"layer {layer}: ids differ"
    # On the CPU the only tensors built are the compact ids and the mask: no int64 copy, no per-sample copies.
    batch = 2 if packed else 4
    assert sorted(seen.created, key=str) == sorted([(dtype, seq_len * batch * 3 * 2 * dtype.itemsize),
                                                    (torch.bool, seq_len * batch * 3)], key=str)


def test_placement_refuses_rows_beyond_the_batch_and_mixed_dtypes():
    rows = [torch.zeros(4, 2, 2, dtype=torch.uint8), torch.zeros(3, 2, 2, dtype=torch.int16)]
    with pytest.raises(ValueError, match="sample 1: expert ids of dtype torch.int16"):
        rollout_to_router_indices(rows, [0, 0], 8)
    with pytest.raises(ValueError, match="sample 0: rows reach position 6 beyond the batch's 5 positions"):
        rollout_to_router_indices(rows[:1], [2], 5)
    with pytest.raises(ValueError, match=r"mask must be bool \(4, 2\)"):
        RouterIndices(torch.zeros(4, 2, 2, dtype=torch.uint8), torch.ones(4, 3, dtype=torch.bool))


def test_recorded_routing_is_stored_compact_and_replaced_in_any_micro_batch():
    gen = torch.Generator().manual_seed(3)
    seq_len, batch, layers, top_k = 6, 3, 2, 2
    recorded = [torch.randint(0, 300, (seq_len * batch, top_k), generator=gen) for _ in range(layers)]  # int64
    store = RecordedRouting(num_experts=300)
    store.add(["a", "b", "c"], recorded, [6, 4, 5])
    assert {tuple(store._rows[k].shape) for k in "abc"} == {(6, 2, 2), (4, 2, 2), (5, 2, 2)}
    assert {store._rows[k].dtype for k in "abc"} == {torch.int16}  # 300 experts: int16, as on the wire
    got = store.indices_for(["c", "a"], seq_len=6)
    per_sample = [torch.stack([r.view(seq_len, batch, top_k)[:n, b] for r in recorded], 1) for b, n in ((2, 5), (0, 6))]
    want_ids, want_masks = int64_host_placement(per_sample, [0, 0], 6)
    assert got.ids.dtype == torch.int16
    assert all(torch.equal(g.long(), w) for g, w in zip(got.indices, want_ids))
    assert all(torch.equal(g, w) for g, w in zip(got.masks, want_masks))
    with pytest.raises(ValueError, match="outside 0..7"):
        RecordedRouting(num_experts=8).add(["a", "b", "c"], recorded, [6, 4, 5])


@pytest.mark.parametrize("cp_size", [2, 4])
def test_context_parallel_positions_match_megatrons_split(cp_size, monkeypatch):
    from megatron.core import parallel_state, utils

    seq_len = 8 * cp_size
    for rank in range(cp_size):
        monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp_size)
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda r=rank: r)
        theirs = utils.get_batch_on_this_cp_rank({"tokens": torch.arange(seq_len)[None]})["tokens"][0]
        assert torch.equal(context_parallel_positions(seq_len, cp_size, rank), theirs)


def test_context_parallel_rows_follow_positions_sequence_major():
    batch, seq_len = 3, 8
    rows = torch.arange(seq_len * batch).view(seq_len * batch, 1)  # row s * B + b holds s * B + b
    local = context_parallel_rows(rows, batch, cp_size=2, cp_rank=1)
    positions = context_parallel_positions(seq_len, 2, 1)
    assert local.view(-1, batch).tolist() == [[int(s) * batch + b for b in range(batch)] for s in positions]


def test_uneven_splits_are_refused():
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 2"):
        context_parallel_positions(6, 2, 0)
    with pytest.raises(ValueError, match="do not split evenly"):
        sequence_parallel_shard(torch.zeros(5, 2), 0, 2)
