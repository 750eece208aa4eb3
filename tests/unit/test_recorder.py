"""RoutingRecorder on CPU against the pure-Python ReferenceRecorder."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routing_replay.capture import (
    InvalidRoutingInput,
    MissingRoutingError,
    RoutingLayout,
    RoutingRecorder,
)
from tests.unit.routing_reference import ReferenceRecorder

LAYOUTS = {
    "8e-top2": RoutingLayout(num_layers=3, top_k=2, num_experts=8),
    "qwen3-30b-a3b": RoutingLayout(num_layers=48, top_k=8, num_experts=128),
    "deepseek-v3-256e": RoutingLayout(num_layers=58, top_k=8, num_experts=256),
    "512e-int16": RoutingLayout(num_layers=5, top_k=8, num_experts=512),
    "over-32-layers": RoutingLayout(num_layers=70, top_k=1, num_experts=4),
}


def random_topk(gen: torch.Generator, n: int, layout: RoutingLayout, dtype=torch.int64) -> torch.Tensor:
    """[n, K] distinct expert ids per row, like a real top-k."""
    scores = torch.rand((n, layout.num_experts), generator=gen)
    return scores.topk(layout.top_k, dim=-1).indices.to(dtype)


def assert_matches(recorder: RoutingRecorder, reference: ReferenceRecorder, slots: list[int]) -> None:
    rows = recorder.gather(slots).wait()
    ids, valid = reference.expected(slots)
    assert torch.equal(rows.valid, valid)
    assert torch.equal(rows.ids.to(torch.int64)[valid], ids[valid])
    assert rows.ids.dtype == recorder.layout.dtype


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_round_trip_equals_reference(name, index_dtype):
    layout = LAYOUTS[name]
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    recorder = RoutingRecorder(layout, num_slots=300)
    reference = ReferenceRecorder(300, layout.num_layers, layout.top_k)
    slots = torch.randperm(300, generator=gen)[:97].to(index_dtype)
    for layer in range(layout.num_layers):
        ids = random_topk(gen, 97, layout, index_dtype)
        recorder.record(layer, slots, ids)
        reference.record(layer, slots.tolist(), ids.tolist())
    assert_matches(recorder, reference, slots.tolist())
    assert recorder.gather(slots).wait().complete


def test_highest_expert_id_survives_uint8_and_int16():
    for experts in (256, 512):
        layout = RoutingLayout(num_layers=1, top_k=2, num_experts=experts)
        recorder = RoutingRecorder(layout, num_slots=4)
        recorder.record(0, torch.tensor([1]), torch.tensor([[experts - 1, 0]]))
        assert recorder.gather([1]).wait().ids.tolist() == [[[experts - 1, 0]]]


def test_cached_prefix_rows_written_by_one_request_are_read_by_another():
    layout = LAYOUTS["8e-top2"]
    gen = torch.Generator().manual_seed(1)
    recorder = RoutingRecorder(layout, num_slots=64)
    reference = ReferenceRecorder(64, layout.num_layers, layout.top_k)
    prefix, first_tail, second_tail = [10, 11, 12, 13], [20, 21], [30, 31, 32]
    for slots in (prefix + first_tail, second_tail):  # the second request only prefills its tail
        for layer in range(layout.num_layers):
            ids = random_topk(gen, len(slots), layout)
            recorder.record(layer, torch.tensor(slots), ids)
            reference.record(layer, slots, ids.tolist())
    second = prefix + second_tail
    assert_matches(recorder, reference, second)
    assert recorder.gather(second).wait().complete


def test_unwritten_rows_are_reported_missing():
    layout = LAYOUTS["8e-top2"]
    recorder = RoutingRecorder(layout, num_slots=8)
    recorder.record(0, torch.tensor([1, 2]), torch.tensor([[0, 1], [2, 3]]))
    recorder.record(2, torch.tensor([1]), torch.tensor([[4, 5]]))
    rows = recorder.gather([1, 2, 5]).wait()
    assert not rows.complete
    assert rows.missing().tolist() == [[0, 1], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    with pytest.raises(MissingRoutingError, match="6 of 9 .* \\(row 0, layer 1\\)"):
        rows.require_complete()


def test_reset_marks_slots_unwritten_and_they_can_be_reused():
    layout = LAYOUTS["8e-top2"]
    recorder = RoutingRecorder(layout, num_slots=8)
    for layer in range(3):
        recorder.record(layer, torch.tensor([4, 5]), torch.tensor([[0, 1], [2, 3]]))
    recorder.reset(torch.tensor([4]))
    rows = recorder.gather([4, 5]).wait()
    assert rows.valid.tolist() == [[False] * 3, [True] * 3]
    recorder.record(1, torch.tensor([4]), torch.tensor([[6, 7]]))
    rows = recorder.gather([4]).wait()
    assert rows.valid.tolist() == [[False, True, False]]
    assert rows.ids[0, 1].tolist() == [6, 7]


def test_padded_rows_marked_minus_one_are_skipped_not_errors():
    layout = LAYOUTS["8e-top2"]
    recorder = RoutingRecorder(layout, num_slots=8)
    # CUDA-graph padding: the padded rows usually point at a dummy slot (0 in SGLang) or garbage.
    recorder.record(0, torch.tensor([3, 0, 999]), torch.tensor([[1, 2], [-1, -1], [-1, -1]]))
    rows = recorder.gather([3, 0]).wait()
    assert rows.valid[:, 0].tolist() == [True, False]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_valid_row_count_is_honoured(as_tensor):
    layout = LAYOUTS["8e-top2"]
    recorder = RoutingRecorder(layout, num_slots=8)
    valid = torch.tensor(2, dtype=torch.int32) if as_tensor else 2
    # rows past the count hold garbage that would be an error if it were looked at
    recorder.record(0, torch.tensor([1, 2, 3, 4]), torch.tensor([[0, 1], [2, 3], [99, 99], [0, -1]]), valid_rows=valid)
    assert recorder.gather([1, 2, 3, 4]).wait().valid[:, 0].tolist() == [True, True, False, False]


def test_bad_batch_writes_nothing():
    layout = LAYOUTS["8e-top2"]
    recorder = RoutingRecorder(layout, num_slots=8)
    with pytest.raises(InvalidRoutingInput):
        recorder.record(0, torch.tensor([1, 2]), torch.tensor([[0, 1], [2, 8]]))
    assert not recorder.gather([1, 2]).wait().valid.any()


def _record_call(recorder, **overrides):
    args = {
        "layer_id": 0,
        "slots": torch.tensor([1, 2]),
        "topk_ids": torch.tensor([[0, 1], [2, 3]]),
    }
    args.update(overrides)
    recorder.record(**args)


BAD_RECORD_CALLS = {
    "expert id too large": ({"topk_ids": torch.tensor([[0, 1], [2, 8]])}, r"topk_ids\[1, 1\] = 8 is not an expert id"),
    "negative expert id": ({"topk_ids": torch.tensor([[0, -2], [2, 3]])}, r"topk_ids\[0, 1\] = -2 is not an expert id"),
    "partial padding": ({"topk_ids": torch.tensor([[0, 1], [-1, 3]])}, "mixes the padding mark -1"),
    "slot too large": ({"slots": torch.tensor([1, 8])}, r"slots\[1\] = 8 is outside the recorder's slots 0..7"),
    "negative slot": ({"slots": torch.tensor([-1, 2])}, r"slots\[0\] = -1 is outside"),
    "float ids": ({"topk_ids": torch.tensor([[0.0, 1.0], [2.0, 3.0]])}, "topk_ids must be int32 or int64"),
    "uint8 ids": ({"topk_ids": torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8)}, "topk_ids must be int32 or int64"),
    "1-D ids": ({"topk_ids": torch.tensor([0, 1])}, "topk_ids must be 2-D"),
    "wrong top_k": ({"topk_ids": torch.tensor([[0, 1, 2], [2, 3, 4]])}, "3 columns, the layout's top_k is 2"),
    "row mismatch": ({"slots": torch.tensor([1, 2, 3])}, "slots has 3 rows but topk_ids has 2"),
    "2-D slots": ({"slots": torch.tensor([[1, 2]])}, "slots must be 1-D"),
    "non-contiguous ids": ({"topk_ids": torch.tensor([[0, 2], [1, 3]]).t()}, "topk_ids' rows must each be contiguous"),
    "overlapping rows": ({"topk_ids": torch.tensor([0, 1, 2]).as_strided((2, 2), (1, 1))}, "rows must each be contiguous"),
    "non-contiguous slots": ({"slots": torch.tensor([1, 0, 2, 0])[::2]}, "slots must be contiguous"),
    "list slots": ({"slots": [1, 2]}, "slots must be a torch.Tensor"),
    "wrong device": ({"slots": torch.tensor([1, 2], device="meta")}, "slots is on meta but the recorder is on cpu"),
    "layer too large": ({"layer_id": 3}, "layer_id 3 is outside 0..2"),
    "negative layer": ({"layer_id": -1}, "layer_id -1 is outside 0..2"),
    "float layer": ({"layer_id": 1.0}, "layer_id must be an int"),
    "negative valid rows": ({"valid_rows": -1}, "valid_rows must be a non-negative int"),
    "2-element valid rows": ({"valid_rows": torch.tensor([1, 2])}, "valid_rows must hold one element"),
}


@pytest.mark.parametrize("case", BAD_RECORD_CALLS)
def test_bad_record_input_raises_the_documented_exception(case):
    overrides, message = BAD_RECORD_CALLS[case]
    recorder = RoutingRecorder(LAYOUTS["8e-top2"], num_slots=8)
    with pytest.raises(InvalidRoutingInput, match=message):
        _record_call(recorder, **overrides)


@pytest.mark.parametrize("op", ["gather", "reset"])
def test_out_of_range_slots_in_gather_and_reset_raise(op):
    recorder = RoutingRecorder(LAYOUTS["8e-top2"], num_slots=8)
    with pytest.raises(InvalidRoutingInput, match=r"slots\[1\] = 8 is outside"):
        getattr(recorder, op)([0, 8])
    with pytest.raises(InvalidRoutingInput, match="slots must be int32 or int64"):
        getattr(recorder, op)(torch.tensor([0.5]))


def test_bad_constructor_arguments():
    with pytest.raises(InvalidRoutingInput, match="layout must be a RoutingLayout"):
        RoutingRecorder((2, 2, 8), num_slots=4)
    with pytest.raises(InvalidRoutingInput, match="num_slots must be a positive int"):
        RoutingRecorder(LAYOUTS["8e-top2"], num_slots=0)
    with pytest.raises(ValueError, match="unsupported device meta"):
        RoutingRecorder(LAYOUTS["8e-top2"], num_slots=4, device="meta")


def test_memory_is_the_compact_buffer_plus_a_bitmask():
    layout = LAYOUTS["qwen3-30b-a3b"]
    recorder = RoutingRecorder(layout, num_slots=1000)
    assert recorder.ids.dtype == torch.uint8
    assert recorder.nbytes == 1000 * (384 + 8) + recorder.error_counts.nbytes


def test_record_inside_torch_compile_writes_the_buffer():
    layout = LAYOUTS["8e-top2"]
    recorder = RoutingRecorder(layout, num_slots=8)

    @torch.compile(fullgraph=True, backend="eager")
    def forward_step(slots, ids, valid):
        recorder.record(1, slots, ids, valid_rows=valid)
        return ids.sum()

    forward_step(torch.tensor([2, 3, 4]), torch.tensor([[5, 6], [7, 0], [1, 1]]), torch.tensor(2))
    rows = recorder.gather([2, 3, 4]).wait()
    assert rows.valid[:, 1].tolist() == [True, True, False]
    assert rows.ids[:2, 1].tolist() == [[5, 6], [7, 0]]


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(0, 2), st.lists(st.integers(0, 15), min_size=1, max_size=6),
                  st.integers(0, 6), st.booleans()),
        st.tuples(st.just("reset"), st.lists(st.integers(0, 15), max_size=4)),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, seed=st.integers(0, 2**16))
def test_random_sequences_of_record_and_reset_match_the_reference(ops, seed):
    layout = LAYOUTS["8e-top2"]
    gen = torch.Generator().manual_seed(seed)
    recorder = RoutingRecorder(layout, num_slots=16)
    reference = ReferenceRecorder(16, layout.num_layers, layout.top_k)
    for op in ops:
        if op[0] == "reset":
            recorder.reset(op[1])
            reference.reset(op[1])
            continue
        _, layer, slots, valid_rows, pad_last = op
        ids = random_topk(gen, len(slots), layout)
        if pad_last:
            ids[-1] = -1
        recorder.record(layer, torch.tensor(slots), ids, valid_rows=valid_rows)
        reference.record(layer, slots, ids.tolist(), valid_rows=valid_rows)
    assert_matches(recorder, reference, list(range(16)))


def test_copy_rows_moves_whole_rows_between_recorders():
    layout = LAYOUTS["8e-top2"]
    staging, main = RoutingRecorder(layout, num_slots=4), RoutingRecorder(layout, num_slots=16)
    for layer in range(layout.num_layers):
        staging.record(layer, torch.tensor([0, 1, 2]), torch.tensor([[layer, 1], [2, 3], [-1, -1]]))
    main.copy_rows_from(staging, torch.arange(3), torch.tensor([9, 4, 12]))
    rows = main.gather([9, 4, 12]).wait()
    assert rows.valid.tolist() == [[True] * 3, [True] * 3, [False] * 3]  # padding stays unwritten
    assert rows.ids[0, :, 0].tolist() == [0, 1, 2]
    with pytest.raises(InvalidRoutingInput, match=r"slots\[1\] = 16 is outside"):
        main.copy_rows_from(staging, [0, 1], [3, 16])
    with pytest.raises(InvalidRoutingInput, match="same layout"):
        main.copy_rows_from(RoutingRecorder(LAYOUTS["512e-int16"], 4), [0], [0])


def test_gathered_rows_own_their_memory():
    # The CPU gather allocates its outputs natively and hands them to torch (DLPack): each gather's
    # tensors are fresh, writable, contiguous, and outlive the recorder.
    layout = LAYOUTS["qwen3-30b-a3b"]
    recorder = RoutingRecorder(layout, num_slots=8)
    recorder.record(0, torch.tensor([2]), torch.arange(8)[None])
    first, second = recorder.gather([2]).wait(), recorder.gather([2]).wait()
    assert first.ids.data_ptr() != second.ids.data_ptr() and first.valid.data_ptr() != second.valid.data_ptr()
    first.ids.fill_(99)
    first.valid.fill_(False)
    assert second.ids[0, 0].tolist() == list(range(8)) and second.valid[0].tolist() == [True] + [False] * 47
    assert recorder.gather([2]).wait().ids[0, 0].tolist() == list(range(8))
    del recorder
    assert second.ids.is_contiguous() and second.valid.is_contiguous()
    assert (second.ids.dtype, second.valid.dtype, second.ids.device) == (torch.uint8, torch.bool, torch.device("cpu"))
    assert second.ids.sum().item() == sum(range(8)) and second.valid.sum().item() == 1


def test_empty_gather_returns_zero_rows():
    layout = LAYOUTS["deepseek-v3-256e"]
    rows = RoutingRecorder(layout, num_slots=4).gather(torch.tensor([], dtype=torch.int32)).wait()
    assert rows.ids.shape == (0, 58, 8) and rows.valid.shape == (0, 58)
    assert rows.complete


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "512e-int16", "over-32-layers"])
def test_large_gather_equals_reference(name):
    # Over 64 KiB the native copy runs with the GIL released: same rows as the small path.
    layout = LAYOUTS[name]
    gen = torch.Generator().manual_seed(3)
    recorder = RoutingRecorder(layout, num_slots=1024)  # gathering all of them copies 72 KiB or more
    reference = ReferenceRecorder(1024, layout.num_layers, layout.top_k)
    slots = torch.randperm(1024, generator=gen)[:200]
    for layer in range(0, layout.num_layers, 2):  # every other layer: the flags alternate
        ids = random_topk(gen, 200, layout)
        recorder.record(layer, slots, ids)
        reference.record(layer, slots.tolist(), ids.tolist())
    assert_matches(recorder, reference, torch.randperm(1024, generator=gen).tolist())


def test_clear_marks_everything_unwritten():
    recorder = RoutingRecorder(LAYOUTS["8e-top2"], num_slots=4)
    recorder.record(0, torch.tensor([1, 2]), torch.tensor([[0, 1], [2, 3]]))
    recorder.clear()
    assert not recorder.gather([1, 2]).wait().valid.any()


def test_a_column_slice_of_wider_ids_is_recorded_without_a_copy():
    """SGLang's fused shared experts append a column (id = num_experts); recording topk_ids[:, :K]
    must store the routed columns exactly, without copying the slice."""
    layout = LAYOUTS["8e-top2"]
    wide = torch.tensor([[0, 1, 8], [2, 3, 8], [4, 5, 8]], dtype=torch.int32)
    recorder = RoutingRecorder(layout, num_slots=8)
    recorder.record(0, torch.tensor([5, 6, 7]), wide[:, :2])
    rows = recorder.gather([5, 6, 7]).wait()
    assert rows.valid[:, 0].all() and rows.ids[:, 0].tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(InvalidRoutingInput, match="3 columns, the layout's top_k is 2"):
        recorder.record(0, torch.tensor([5, 6, 7]), wide)


def test_debug_mode_rejects_a_slot_repeated_among_real_rows(monkeypatch):
    import routing_replay.capture.recorder as recorder_module

    recorder = RoutingRecorder(LAYOUTS["8e-top2"], num_slots=8)
    ids = torch.tensor([[0, 1], [2, 3], [-1, -1]])
    recorder.record(0, torch.tensor([4, 4, 5]), ids)  # default: the CPU keeps the last row
    assert recorder.gather([4]).wait().ids[0, 0].tolist() == [2, 3]
    monkeypatch.setattr(recorder_module, "_DEBUG", True)
    with pytest.raises(InvalidRoutingInput, match="slot 4 appears in 2 rows of one record call"):
        recorder.record(0, torch.tensor([4, 4, 5]), ids)
    recorder.record(0, torch.tensor([4, 5, 4]), ids)  # a padding row may share a slot
    recorder.record(0, torch.tensor([4, 4, 5]), ids, valid_rows=torch.tensor(1))  # rows past valid_rows: ignored


def test_cpu_gathers_report_no_counted_errors_and_errors_need_a_wait():
    recorder = RoutingRecorder(LAYOUTS["8e-top2"], num_slots=8)
    handle = recorder.gather([1])
    with pytest.raises(RuntimeError, match="call wait\\(\\) first"):
        handle.errors
    handle.wait()
    assert handle.errors == {} and recorder.take_errors(recorder.error_snapshot()) == {}


def test_error_deltas_report_each_counted_error_once_in_any_snapshot_order():
    """The counts only grow on the device; the host reports the increase over what it reported.
    (CPU recorder with counts written by hand: the CUDA kernels are what increments them.)"""
    recorder = RoutingRecorder(LAYOUTS["8e-top2"], num_slots=8)

    class Snapshot:
        def __init__(self, counts):
            self._counts = counts

        def counts(self):
            return self._counts

    early, late = Snapshot([0, 2, 0, 0]), Snapshot([0, 3, 1, 0])
    assert recorder.take_errors(late) == {"expert id out of range": 3, "slot out of range": 1}
    assert recorder.take_errors(early) == {}  # older snapshot: nothing new
    assert recorder.take_errors(Snapshot([0, 3, 1, 2])) == {"row mixing -1 padding with expert ids": 2}
