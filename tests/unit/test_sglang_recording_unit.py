"""SchedulerRecording without a server: layer mapping, staging, per-forward copy, lifecycle, and
what happens when our code fails inside SGLang's scheduler (faults injected by monkeypatching).

The real-server behaviour is in tests/integration/test_sglang_recording.py; this pins the pieces
SGLang cannot exercise on CPU (dense layers: SGLang 0.5.23's Qwen MoE models ignore mlp_only_layers).
"""

import logging
import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from routing_replay.sglang.client import decode_inline, routing_record
from routing_replay.sglang.options import RecordingOptions
from routing_replay.sglang.recording import SchedulerRecording, staging_rows
from routing_replay.wire import RoutingCollector, RoutingDeliveryFailed, RoutingRecord
from routing_replay.wire import format as wire_format
from routing_replay.wire.worker import BackgroundThreadDied

CONFIG = SimpleNamespace(model_type="qwen3_moe", num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                         mlp_only_layers=[0, 2], decoder_sparse_step=1)


class CaptureMode:
    """SGLang's capture-mode flag, as the scheduler reads it (on while SGLang captures its graphs)."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self) -> bool:
        return self.on


def recording(options: RecordingOptions = RecordingOptions(record_routing=True), sends: bool = False,
              fused_shared_experts: int = 0, capture_mode: CaptureMode | None = None,
              num_slots: int = 64) -> SchedulerRecording:
    return SchedulerRecording(options, CONFIG, num_slots=num_slots, max_batch=16, device="cpu", sends=sends,
                              fused_shared_experts=fused_shared_experts, in_graph_capture=capture_mode or CaptureMode())


def forward(rec: SchedulerRecording, slots: list[int], per_layer: dict[int, torch.Tensor], padded: int = 0):
    batch = SimpleNamespace(out_cache_loc=torch.tensor(slots), out_cache_loc_virtual=None,
                            num_token_non_padded=None)

    def run():
        for layer_id, ids in per_layer.items():
            rows = torch.cat([ids, torch.randint(0, 8, (padded, 2))]) if padded else ids  # garbage padding rows
            rec.capture(layer_id, rows)
        return "logits"

    return rec.run_forward(batch, run)


def test_rows_map_to_routers_by_layer_index_on_a_model_with_dense_layers():
    rec = recording()
    assert rec.layout.num_layers == 2 and rec.router_of_layer == {1: 0, 3: 1}
    ids1, ids3 = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [6, 7]])
    forward(rec, [10, 11], {1: ids1, 3: ids3}, padded=3)
    rows = rec.main.gather([10, 11]).wait()
    assert rows.complete
    assert torch.equal(rows.ids[:, 0].long(), ids1) and torch.equal(rows.ids[:, 1].long(), ids3)
    forward(rec, [12], {1: ids1[:1], 2: ids1[:1]})  # a layer without a router: counted, never raised into SGLang
    assert rec.failures.by_reason == {"capturing a layer's routing: RuntimeError": 1}
    assert not rec.main.gather([12]).wait().valid.any()  # the whole forward stays unrecorded


def test_staging_is_cleared_between_forwards_and_large_eager_batches_record_directly():
    rec = recording()
    staging = rec.staging
    forward(rec, [1, 2], {1: torch.tensor([[0, 1], [2, 3]]), 3: torch.tensor([[0, 1], [2, 3]])})
    forward(rec, [5, 6], {1: torch.tensor([[4, 5], [6, 7]])})  # layer 3 not routed in this forward
    assert rec.main.gather([5, 6]).wait().valid.tolist() == [[True, False], [True, False]]
    big = list(range(20, 60))  # more tokens than the 16 staging rows: straight into the main recorder
    forward(rec, big, {1: torch.zeros(40, 2, dtype=torch.int64), 3: torch.ones(40, 2, dtype=torch.int64)})
    rows = rec.main.gather(big).wait()
    assert rows.complete and rows.ids[:, 1].eq(1).all() and rows.ids[:, 0].eq(0).all()
    assert rec.staging is staging and staging.num_slots == 16  # never replaced: graphs keep its address
    assert not staging.gather(range(16)).wait().valid.any()


def test_rows_a_graph_replay_staged_beyond_its_tokens_never_reach_a_later_forward():
    """A graph replay records every row of its padded batch (the valid-row count is frozen in the
    graph); the copy takes only the forward's tokens, and the whole staging is cleared after it."""
    rec = recording()
    batch = SimpleNamespace(out_cache_loc=torch.tensor([1, 2]), out_cache_loc_virtual=None, num_token_non_padded=None)

    def replay_of_a_4_row_graph():
        for layer in (0, 1):  # what the graph's captured record calls write, at replay
            rec.staging.record(layer, rec.positions[:4], torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]))

    rec.run_forward(batch, replay_of_a_4_row_graph)
    forward(rec, [10, 11, 12, 13], {1: IDS})  # eager, only the first MoE layer routed
    rows = rec.main.gather([10, 11, 12, 13]).wait()
    assert rows.valid.tolist() == [[True, False]] * 4  # no stale layer-1 rows from the replay
    assert rec.main.gather([1, 2]).wait().complete


def test_staging_is_sized_once_for_the_largest_graph_batch():
    assert staging_rows(max_running_requests=48, chunked_prefill_size=16384, draft_tokens=None) == 16384
    assert staging_rows(max_running_requests=2048, chunked_prefill_size=4096, draft_tokens=8) == 16384
    assert staging_rows(max_running_requests=4, chunked_prefill_size=-1, draft_tokens=0) == 8192


def test_freed_slots_and_weight_changes_drop_rows():
    rec = recording()
    forward(rec, [1, 2], {1: torch.tensor([[0, 1], [2, 3]]), 3: torch.tensor([[0, 1], [2, 3]])})
    rec.slots_freed(torch.tensor([1]))
    assert rec.main.gather([1, 2]).wait().valid.all(1).tolist() == [False, True]
    rec.weights_changed()
    assert not rec.main.gather([2]).wait().valid.any()


def test_capture_outside_a_forward_is_ignored():
    rec = recording()
    rec.capture(1, torch.tensor([[0, 1]]))  # e.g. the draft model or a warm-up outside ModelRunner.forward
    assert not rec.staging.gather(range(16)).wait().valid.any()


def test_routing_is_recorded_into_cuda_graphs_captured_outside_forwards():
    """SGLang captures CUDA graphs by calling the model directly (no ModelRunner.forward), with its
    capture-mode flag on; the per-layer record must still be captured, with every row (padding is
    dropped at copy time), and what capture staged is cleared before the first forward."""
    mode = CaptureMode()
    rec = recording(capture_mode=mode)
    mode.on = True
    rec.capture(1, torch.tensor([[0, 1], [2, 3], [4, 5]]))  # e.g. a padded graph batch of 3
    staged = rec.staging.gather([0, 1, 2]).wait()
    assert staged.valid[:, 0].tolist() == [True, True, True]
    mode.on = False
    rec.capture(1, torch.tensor([[6, 7]]))  # outside capture and outside a forward: ignored
    assert rec.staging.gather([0]).wait().ids[0, 0].tolist() == [0, 1]
    forward(rec, [30, 31, 32], {3: IDS[:3]})
    assert rec.main.gather([30, 31, 32]).wait().valid.tolist() == [[False, True]] * 3


def test_fused_shared_expert_columns_are_dropped():
    """DeepSeek-V2/V3 and GLM-4.5 with fused shared experts pass top_k + 1 columns, the last one
    the shared expert's id (num_experts); the routed columns are recorded."""
    rec = recording(fused_shared_experts=1)
    shared = torch.full((4, 1), 8)
    forward(rec, [0, 1, 2, 3], {1: torch.cat([IDS, shared], 1).int(), 3: IDS.int()})  # SGLang passes either width
    rows = rec.main.gather([0, 1, 2, 3]).wait()
    assert rows.complete and torch.equal(rows.ids[:, 0].long(), IDS) and torch.equal(rows.ids[:, 1].long(), IDS)
    forward(rec, [4], {1: torch.tensor([[0, 1, 8, 8]])})  # neither width: counted, the forward dropped
    assert rec.failures.by_reason == {"capturing a layer's routing: RuntimeError": 1}
    assert "passed 4 top-k columns" in rec.lost[4]


# ---- failures of ours inside the scheduler -----------------------------------------------------------

POOL = SimpleNamespace(req_to_token=torch.arange(64).view(1, 64))  # request 0's tokens sit in slots 0, 1, ...
IDS = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])


def finished_request(routing=None, rid: str = "r1") -> SimpleNamespace:
    """A finished SGLang request of 5 tokens (so 4 rows) in request-pool row 0."""
    custom_params = {"routing_replay": routing or {"inline": True}}
    return SimpleNamespace(rid=rid, sampling_params=SimpleNamespace(custom_params=custom_params),
                           origin_input_ids=[11, 12, 13], output_ids_through_stop=[14, 15],
                           kv=SimpleNamespace(req_pool_idx=0), finished=lambda: True, finished_reason="length")


def finish(rec: SchedulerRecording, req: SimpleNamespace) -> dict:
    rec.request_finished(req, POOL, lambda: "v1")
    [descriptor] = rec.descriptor_for(req)
    return descriptor


def raising(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def test_a_failed_delivery_is_the_requests_descriptor_with_every_row_missing(monkeypatch):
    rec = recording()
    forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
    monkeypatch.setattr(rec.main, "gather", raising(RuntimeError("gather broke")))
    descriptor = finish(rec, finished_request())
    assert descriptor["delivery"] == "failed" and "gather broke" in descriptor["error"]
    assert (descriptor["key"], descriptor["rows"], descriptor["missing"]) == ("r1", 4, 4 * 2)
    assert descriptor["scheduler_errors"] == 1 and "inline" not in descriptor
    monkeypatch.undo()
    healthy = finish(rec, finished_request(rid="r2"))  # generation and recording go on
    assert healthy["delivery"] == "inline" and healthy["missing"] == 0 and healthy["scheduler_errors"] == 1


def counting_calls(monkeypatch, module, *names: str) -> Counter:
    """Wraps the real ``module.name`` functions to count their calls by (name, calling thread)."""
    calls: Counter = Counter()
    for name in names:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            thread = threading.current_thread()
            calls[_name, "scheduler" if thread is threading.main_thread() else thread.name.split("-")[1]] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_the_record_made_when_a_request_finishes_is_what_the_collector_receives(monkeypatch):
    """One record per sample: made once off the scheduler thread (one checksum pass, one token
    hash), sent unchanged by the real sender (no second checksum), received field for field by a
    real collector, and returned as the descriptor's fields of an inline request."""
    calls = counting_calls(monkeypatch, wire_format, "checksum", "token_hash")
    tokens = [11, 12, 13, 14, 15]
    with RoutingCollector() as collector:
        rec = recording(RecordingOptions(record_routing=True, routing_sink=collector.address, routing_shm=False),
                        sends=True)
        try:
            forward(rec, [0, 1, 2], {1: IDS[:3], 3: IDS[:3]})
            forward(rec, [3], {1: IDS[3:]})  # the last row misses its second MoE layer: a mask travels
            descriptor = finish(rec, finished_request({"inline": True, "key": "sample-7"}))
            sample = collector.get("sample-7", timeout=10)  # so the sender has done its part
        finally:
            rec.close()
    # Once in the delivery thread, nothing in the sender; once more in the collector: its verification.
    assert calls == {("checksum", "delivery"): 1, ("token_hash", "delivery"): 1, ("checksum", "collector"): 1}
    assert descriptor["delivery"] == "queued" and descriptor["sink"] == collector.address
    record = routing_record(descriptor)
    assert isinstance(sample.record, RoutingRecord) and sample.record == record
    assert wire_format.encode(sample.record) == wire_format.encode(record)  # byte for byte on the wire
    assert (record.key, record.rows, record.num_tokens, record.missing, record.weight_version) == \
        ("sample-7", 4, 5, 1, "v1")
    assert record.token_hash == wire_format.token_hash(tokens)
    ids, valid = decode_inline(descriptor)
    assert torch.equal(sample.routing, ids) and torch.equal(sample.valid, valid)
    assert valid.tolist() == [[True, True]] * 3 + [[True, False]]


class HeldGather:
    """The main recorder's gather, its rows held back until ``release`` is set: the scheduler must
    answer without them."""

    def __init__(self, rec: SchedulerRecording, monkeypatch) -> None:
        self.release = threading.Event()
        self.waited = threading.Event()
        real = rec.main.gather

        def gather(slots, report_errors=True):
            handle = real(slots, report_errors)
            wait = handle.wait

            def held_wait(check_errors=True):
                self.waited.set()
                self.release.wait()
                return wait(check_errors)

            return SimpleNamespace(wait=held_wait)

        monkeypatch.setattr(rec.main, "gather", gather)


def sending_recording(collector: RoutingCollector) -> SchedulerRecording:
    return recording(RecordingOptions(record_routing=True, routing_sink=collector.address, routing_shm=False),
                     sends=True)


def test_the_scheduler_queues_a_sink_delivery_without_waiting_for_its_rows(monkeypatch):
    """The descriptor of a sink-only request says ``queued`` while its rows have not even reached
    the host; the record the delivery thread makes then reaches the collector intact."""
    from routing_replay.orchestration.engines import EngineRoutingFailed, check_routing_delivered

    with RoutingCollector() as collector:
        rec = sending_recording(collector)
        try:
            forward(rec, [0, 1, 2, 3], {1: IDS})  # the second MoE layer unrecorded: 4 missing positions
            held = HeldGather(rec, monkeypatch)
            descriptor = finish(rec, finished_request({"key": "k1"}))
            assert not held.release.is_set()  # answered while the delivery holds the rows back
            assert descriptor == {"key": "k1", "rows": 4, "start": 0, "num_tokens": 5, "weight_version": "v1",
                                  "delivery": "queued", "sink": collector.address, "scheduler_errors": 0}
            check_routing_delivered(0, "k1", {"meta_info": {"routing_replay": [descriptor]}})
            with pytest.raises(EngineRoutingFailed, match="recorded as 'k1'"):
                check_routing_delivered(0, "k2", {"meta_info": {"routing_replay": [descriptor]}})
            with pytest.raises(EngineRoutingFailed, match="not queued for its sink"):
                not_sent = {**descriptor, "delivery": "none"}
                check_routing_delivered(0, "k1", {"meta_info": {"routing_replay": [not_sent]}})
            held.release.set()
            sample = collector.get("k1", timeout=30, token_ids=[11, 12, 13, 14, 15])
        finally:
            rec.close()
    assert (sample.record.missing, sample.record.weight_version) == (4, "v1")
    assert torch.equal(sample.routing[:, 0].long(), IDS) and sample.valid.tolist() == [[True, False]] * 4


def test_32_requests_finishing_at_once_are_each_delivered_their_own_rows():
    """32 requests finish in one go (each over its own slots, other experts per request): every
    record the collector receives holds exactly its request's rows, none lost or swapped."""
    pool = SimpleNamespace(req_to_token=torch.arange(64 * 32).view(32, 64))  # request i in slots 64i, 64i + 1, ...
    expected = {}
    with RoutingCollector() as collector:
        rec = recording(RecordingOptions(record_routing=True, routing_sink=collector.address, routing_shm=False),
                        sends=True, num_slots=64 * 32)
        try:
            for i in range(32):
                ids = torch.randint(0, 8, (4, 2), generator=torch.Generator().manual_seed(i))
                expected[f"s{i}"] = ids
                forward(rec, list(range(64 * i, 64 * i + 4)), {1: ids, 3: ids.flip(1)})
            for i in range(32):
                req = finished_request({"key": f"s{i}"}, rid=f"r{i}")
                req.kv = SimpleNamespace(req_pool_idx=i)
                rec.request_finished(req, pool, lambda: "v1")
                assert rec.descriptor_for(req)[0]["delivery"] == "queued"
            samples = collector.take(list(expected), timeout=60)
        finally:
            rec.close()
    for key, ids in expected.items():
        assert samples[key].valid is None
        assert torch.equal(samples[key].routing.long(), torch.stack([ids, ids.flip(1)], 1)), key


def test_a_delivery_that_fails_after_the_response_reaches_the_consumer_at_once(monkeypatch):
    """What fails on the delivery thread (here: making the record) is counted, and the sink gets a
    ``failed`` notice naming it: the trainer's take raises it instead of waiting out its timeout."""
    from routing_replay.sglang import delivery

    with RoutingCollector() as collector:
        rec = sending_recording(collector)
        try:
            forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
            with monkeypatch.context() as patch:
                patch.setattr(delivery.RoutingRecord, "of", raising(RuntimeError("record broke")))
                assert finish(rec, finished_request({"key": "k1"}))["delivery"] == "queued"
                with pytest.raises(RoutingDeliveryFailed, match="'k1': delivering a request's routing failed: "
                                                               "RuntimeError: record broke"):
                    collector.take(["k1"], timeout=600)
            assert finish(rec, finished_request({"key": "k2"}, rid="r2"))["delivery"] == "queued"  # goes on
            assert collector.get("k2", timeout=30).record.missing == 0
        finally:
            rec.close()
    assert rec.failures.by_reason == {"delivering a request's routing: RuntimeError": 1}


class DeathOfTheThread(BaseException):
    """Not an Exception: nothing inside the delivery catches it, so the thread dies of it."""


def test_a_dead_delivery_thread_fails_what_it_held_on_the_sink_and_every_later_request(monkeypatch):
    with RoutingCollector() as collector:
        rec = sending_recording(collector)
        try:
            forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
            monkeypatch.setattr(rec.delivery, "_deliver", raising(DeathOfTheThread("gone")))
            assert finish(rec, finished_request({"key": "k1"}))["delivery"] == "queued"
            with pytest.raises(RoutingDeliveryFailed, match=r"'k1': the routing delivery thread died: "
                                                            r"DeathOfTheThread\('gone'\)"):
                collector.take(["k1"], timeout=600)  # at once, not after the timeout
            later = finish(rec, finished_request({"key": "k2"}, rid="r2"))
        finally:
            rec.close()
    assert later["delivery"] == "failed" and "background thread 'routing-delivery' died" in later["error"]


def test_rows_a_late_counted_capture_error_lost_fail_exactly_their_requests():
    """CUDA counts bad ids instead of raising, and a forward's counts may reach the host only after
    the request finished: the delivery thread reads them and fails the requests over that forward's
    slots (on the sink, naming the reason); the others are delivered."""
    from routing_replay.capture.recorder import ErrorSnapshot
    from routing_replay.sglang.delivery import DeliveryThread, ForwardCheck, PendingDelivery
    from routing_replay.wire import RoutingSender

    rec = recording()
    forward(rec, list(range(8)), {1: torch.cat([IDS, IDS]), 3: torch.cat([IDS, IDS])})
    counted = SimpleNamespace(take_errors=lambda snapshot: {"expert id out of range": 2})
    bad_forward = ForwardCheck(torch.tensor([2, 3]), torch.tensor([2, 3]), ((counted, ErrorSnapshot()),))
    with RoutingCollector() as collector, RoutingSender() as sender:
        thread = DeliveryThread(sender, rec.failures.count)
        for key, slots in (("over-it", [0, 1, 2, 3]), ("beside-it", [4, 5, 6, 7])):
            thread.put(PendingDelivery(key, [1, 2, 3, 4, 5], 0, "v1", 8, rec.main.gather(slots), torch.tensor(slots),
                                       (bad_forward,), collector.address))
        thread.close()
        with pytest.raises(RoutingDeliveryFailed, match="'over-it': routing of this request was lost: the CUDA "
                                                        "recorder skipped bad input in a forward: 2 x expert id"):
            collector.take(["over-it"], timeout=600)
        assert collector.get("beside-it", timeout=30).record.missing == 0
    assert rec.failures.total == 0  # bad input from the engine, not a failure of ours


def test_a_dead_sender_thread_fails_the_delivery_naming_it():
    rec = recording()
    forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
    rec.sender = SimpleNamespace(never_answered=raising(BackgroundThreadDied("routing-sender", OSError("socket gone"))))
    descriptor = finish(rec, finished_request({"sink": "tcp://127.0.0.1:9"}))
    assert descriptor["delivery"] == "failed" and "BackgroundThreadDied" in descriptor["error"]
    assert "routing-sender" in descriptor["error"] and descriptor["missing"] == 8


def test_a_failed_capture_or_copy_leaves_that_forwards_rows_unrecorded_and_returns_its_result(monkeypatch):
    rec = recording()
    for target, method in ((rec.staging, "record"), (rec.main, "copy_rows_from")):
        with monkeypatch.context() as patch:
            patch.setattr(target, method, raising(RuntimeError(f"{method} broke")))
            assert forward(rec, [0, 1], {1: IDS[:2], 3: IDS[:2]}) == "logits"
        assert not rec.main.gather([0, 1]).wait().valid.any()
        assert not rec.staging.gather([0, 1]).wait().valid.any()  # nothing staged leaks into the next forward
    assert rec.failures.by_reason == {"capturing a layer's routing: RuntimeError": 1,
                                      "copying a forward's rows: RuntimeError": 1}
    assert "copy_rows_from broke" in rec.lost[0]  # a request over these rows would be delivered as failed
    rec.slots_freed(torch.tensor([0, 1]))  # SGLang frees them before it writes them again
    forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
    assert finish(rec, finished_request())["missing"] == 0


def test_a_failure_while_a_cuda_graph_is_captured_is_raised(monkeypatch):
    """At start-up: SGLang must refuse to start rather than serve graphs that record nothing."""
    mode = CaptureMode()
    rec = recording(capture_mode=mode)
    mode.on = True
    monkeypatch.setattr(rec.staging, "record", raising(RuntimeError("record broke")))
    with pytest.raises(RuntimeError, match="record broke"):
        rec.capture(1, IDS)


def test_a_capture_error_fails_the_delivery_of_the_requests_over_those_rows_and_recording_goes_on():
    """Bad ids from the engine: the forward's result is returned, the requests whose rows it held
    are delivered as failed naming the reason (all rows missing), others are delivered, and the
    slots are usable again once SGLang frees them."""
    rec = recording()
    assert forward(rec, [0, 1], {1: IDS[:2], 3: torch.tensor([[0, 1], [2, 9]])}) == "logits"  # expert 9 of 8
    forward(rec, [2, 3], {1: IDS[2:], 3: IDS[2:]})
    descriptor = finish(rec, finished_request())  # its rows sit in slots 0..3
    assert descriptor["delivery"] == "failed" and descriptor["missing"] == 4 * 2
    assert "topk_ids[1, 1] = 9 is not an expert id" in descriptor["error"]
    assert set(rec.lost) == {0, 1}
    forward(rec, [10, 11, 12, 13], {1: IDS, 3: IDS})
    other = finished_request(rid="r2")
    other_pool = SimpleNamespace(req_to_token=torch.arange(10, 74).view(1, 64))
    rec.request_finished(other, other_pool, lambda: "v1")
    assert rec.descriptor_for(other)[0]["missing"] == 0
    rec.slots_freed(torch.tensor([0, 1]))
    assert rec.lost == {}
    forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
    assert finish(rec, finished_request(rid="r3"))["missing"] == 0


def test_sglangs_own_forward_failure_propagates_and_drops_what_was_staged():
    rec = recording()
    batch = SimpleNamespace(out_cache_loc=torch.tensor([0, 1]), out_cache_loc_virtual=None, num_token_non_padded=None)

    def crash():
        rec.capture(1, IDS[:2])
        raise MemoryError("out of memory in SGLang's forward")

    with pytest.raises(MemoryError):
        rec.run_forward(batch, crash)
    assert not rec.staging.gather([0, 1]).wait().valid.any() and not rec.main.gather([0, 1]).wait().valid.any()
    assert rec.failures.total == 0  # not ours


def test_slots_that_cannot_be_reset_drop_every_row_and_then_recording_stops(monkeypatch):
    rec = recording()
    forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
    monkeypatch.setattr(rec.main, "reset", raising(RuntimeError("reset broke")))
    rec.slots_freed(torch.tensor([0]))
    assert not rec.main.gather([0, 1, 2, 3]).wait().valid.any()  # stale rows are never delivered as current
    assert rec.broken is None
    monkeypatch.setattr(rec.main, "clear", raising(RuntimeError("clear broke")))
    rec.slots_freed(torch.tensor([1]))
    assert "clear broke" in rec.broken
    monkeypatch.undo()
    forward(rec, [0, 1, 2, 3], {1: IDS, 3: IDS})
    descriptor = finish(rec, finished_request())
    assert descriptor["delivery"] == "failed" and "stopped (restart the server)" in descriptor["error"]
    assert descriptor["missing"] == 8 and descriptor["scheduler_errors"] == 3


def test_weights_changed_and_descriptor_lookups_never_raise(monkeypatch):
    rec = recording()
    monkeypatch.setattr(rec.main, "clear", raising(RuntimeError("clear broke")))
    rec.weights_changed()
    assert rec.weights_dropped == 1 and "clear broke" in rec.broken
    req = finished_request()
    req.finished = raising(RuntimeError("finished() broke"))
    [descriptor] = rec.descriptor_for(req)
    assert descriptor["delivery"] == "failed" and "finished() broke" in descriptor["error"]
    info = rec.with_descriptors({"other": [1]}, [req])
    assert info["other"] == [1] and info["routing_replay"][0][0]["delivery"] == "failed"


def test_failures_are_logged_in_full_once_per_reason_then_rate_limited(monkeypatch, caplog):
    rec = recording()
    monkeypatch.setattr(rec.main, "gather", raising(RuntimeError("gather broke")))
    with caplog.at_level(logging.WARNING, logger="routing_replay.sglang"):
        for i in range(250):
            finish(rec, finished_request(rid=f"r{i}"))
    logged = [r for r in caplog.records if "gather broke" in r.getMessage()]
    assert len(logged) == 10 + 2  # the 1st (with its traceback) to the 10th, then the 100th and 200th
    assert logged[0].exc_info is not None and all(r.exc_info is None for r in logged[1:])
    assert rec.failures.by_reason == {"delivering a request's routing: RuntimeError": 250}
