"""Token-order mapping for replay under context parallelism, against megatron-core's own split."""

import pytest
import torch

from routing_replay.megatron.replay import context_parallel_positions, context_parallel_rows, sequence_parallel_shard


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
