"""SGLang's recording on CUDA, without SGLang (the lent GPU machines have none): the scheduler-side
pieces driven the way SGLang drives them. CUDA-graph capture with SGLang's capture-mode flag and
replays at changing batch sizes; a finishing request never waits behind a forward queued after its
rows, and a sink-only one not even for its own rows; bad ids counted by the kernels fail the
delivery of the requests over them.

Skipped without a GPU (tests/conftest.py); run on a lent GPU machine (scripts/gpu_check.sh).
"""

import time
from types import SimpleNamespace

import pytest
import torch

from routing_replay.sglang.options import RecordingOptions
from routing_replay.sglang.recording import SchedulerRecording
from routing_replay.wire import RoutingCollector
from tests.unit.test_sglang_recording_unit import CONFIG, IDS, CaptureMode, finished_request

pytestmark = pytest.mark.gpu


def cuda_recording(capture_mode: CaptureMode | None = None) -> SchedulerRecording:
    return SchedulerRecording(RecordingOptions(record_routing=True), CONFIG, num_slots=64, max_batch=16,
                              device="cuda", sends=False, fused_shared_experts=0,
                              in_graph_capture=capture_mode or CaptureMode())


def batch(slots: list[int], non_padded: torch.Tensor | None = None) -> SimpleNamespace:
    return SimpleNamespace(out_cache_loc=torch.tensor(slots, device="cuda"), out_cache_loc_virtual=None,
                           num_token_non_padded=non_padded)


def request_pool(first_slot: int = 0) -> SimpleNamespace:
    """Request 0's tokens in slots first_slot, first_slot + 1, ..."""
    pool = SimpleNamespace(req_to_token=torch.arange(first_slot, first_slot + 64, device="cuda").view(1, 64))
    torch.cuda.synchronize()
    return pool


def finish(rec: SchedulerRecording, pool: SimpleNamespace, rid: str = "r1") -> dict:
    req = finished_request(rid=rid)
    rec.request_finished(req, pool, lambda: "v1")
    [descriptor] = rec.descriptor_for(req)
    return descriptor


def test_graph_captured_in_capture_mode_records_each_replays_real_rows():
    mode = CaptureMode()
    rec = cuda_recording(mode)
    ids = torch.zeros((16, 2), dtype=torch.int64, device="cuda")
    non_padded = torch.zeros(1, dtype=torch.int32, device="cuda")

    def model():
        for layer in (1, 3):
            rec.capture(layer, ids)

    mode.on = True  # SGLang's model_capture_mode: the model is called directly, outside forwards
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model()
    mode.on = False
    gen = torch.Generator().manual_seed(0)
    start = 0
    for real in (5, 16, 3):
        ids.copy_(torch.randint(0, 8, (16, 2), generator=gen))
        non_padded.fill_(real)
        rec.run_forward(batch(list(range(start, start + real)), non_padded), graph.replay)
        rows = rec.main.gather(torch.arange(start, start + real, device="cuda")).wait()
        assert rows.complete and torch.equal(rows.ids[:, 0].long(), ids[:real].cpu())
        assert not rec.staging.gather(range(16)).wait().valid.any()
        start += real
    assert not rec.main.gather(range(start, 64)).wait().valid.any()


def test_a_finishing_request_does_not_wait_for_a_forward_queued_after_its_rows():
    rec = cuda_recording()
    forward_stream = torch.cuda.Stream()
    with torch.cuda.stream(forward_stream):
        rec.run_forward(batch([0, 1, 2, 3]), lambda: [rec.capture(layer, IDS.cuda()) for layer in (1, 3)])
    pool = request_pool()
    forward_stream.synchronize()  # SGLang waits for a batch's result before it processes it
    with torch.cuda.stream(forward_stream):
        torch.cuda._sleep(1 << 31)  # about a second: the next forward, queued by overlap scheduling
        started = time.perf_counter()
        descriptor = finish(rec, pool)
        took = time.perf_counter() - started
    assert took < 0.3, f"the finishing request waited {took:.2f} s behind the queued forward"
    assert descriptor["delivery"] == "inline" and descriptor["missing"] == 0


def test_a_sink_only_request_is_answered_before_its_rows_reach_the_host():
    with RoutingCollector() as collector:
        options = RecordingOptions(record_routing=True, routing_sink=collector.address, routing_shm=False)
        rec = SchedulerRecording(options, CONFIG, num_slots=64, max_batch=16, device="cuda", sends=True,
                                 fused_shared_experts=0, in_graph_capture=CaptureMode())
        try:
            pool = request_pool()

            def slow_forward():
                for layer in (1, 3):
                    rec.capture(layer, IDS.cuda())
                torch.cuda._sleep(1 << 31)  # about a second before the forward's rows are copied

            rec.run_forward(batch([0, 1, 2, 3]), slow_forward)
            req = finished_request({"key": "k1"})
            started = time.perf_counter()
            rec.request_finished(req, pool, lambda: "v1")
            took = time.perf_counter() - started
            [descriptor] = rec.descriptor_for(req)
            sample = collector.get("k1", timeout=60, token_ids=[11, 12, 13, 14, 15])
        finally:
            rec.close()
    assert took < 0.3, f"the scheduler thread waited {took:.2f} s for the request's rows"
    assert descriptor["delivery"] == "queued" and sample.valid is None
    assert torch.equal(sample.routing.long(), torch.stack([IDS, IDS], 1))


def test_ids_the_kernels_skip_fail_the_delivery_of_the_requests_over_them():
    rec = cuda_recording()
    bad = torch.tensor([[0, 1], [2, 9]], device="cuda")  # expert 9 of 8: counted on the device, not raised
    rec.run_forward(batch([0, 1]), lambda: [rec.capture(layer, bad) for layer in (1, 3)])
    rec.run_forward(batch([2, 3]), lambda: [rec.capture(layer, IDS[2:].cuda()) for layer in (1, 3)])
    descriptor = finish(rec, request_pool())
    assert descriptor["delivery"] == "failed" and "2 x expert id out of range" in descriptor["error"]  # 2 layers
    assert descriptor["missing"] == 8
    rec.run_forward(batch([10, 11, 12, 13]), lambda: [rec.capture(layer, IDS.cuda()) for layer in (1, 3)])
    assert set(rec.lost) == {0, 1}  # settled by the next forward at the latest (the delivery thread may be first)
    assert finish(rec, request_pool(10), rid="r2")["missing"] == 0  # others are delivered
