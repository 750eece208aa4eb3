"""The CUDA backend: parity with the CPU backend, counted errors, async gather, CUDA graphs.

Skipped without a GPU (tests/conftest.py); run on a lent GPU machine.
"""

import pytest
import torch

from routing_replay.capture import RoutingCaptureError, RoutingLayout, RoutingRecorder, cuda_backend_available

pytestmark = pytest.mark.gpu

LAYOUTS = [
    RoutingLayout(num_layers=3, top_k=2, num_experts=8),
    RoutingLayout(num_layers=48, top_k=8, num_experts=128),
    RoutingLayout(num_layers=5, top_k=8, num_experts=512),
    RoutingLayout(num_layers=40, top_k=1, num_experts=4),
]


def random_topk(n, layout, device, gen):
    scores = torch.rand((n, layout.num_experts), generator=gen)
    return scores.topk(layout.top_k, dim=-1).indices.to(device)


def test_cuda_module_is_built_and_usable():
    assert cuda_backend_available()


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_cuda_matches_cpu_backend(layout):
    gen = torch.Generator().manual_seed(0)
    cpu = RoutingRecorder(layout, num_slots=500)
    gpu = RoutingRecorder(layout, num_slots=500, device="cuda")
    slots = torch.randperm(500, generator=gen)[:300]
    for layer in range(layout.num_layers):
        ids = random_topk(300, layout, "cpu", gen)
        ids[::7] = -1  # padded rows
        cpu.record(layer, slots, ids, valid_rows=250)
        gpu.record(layer, slots.cuda(), ids.cuda(), valid_rows=250)
    gpu.reset(slots[:10])
    cpu.reset(slots[:10])
    query = torch.arange(500)
    want, got = cpu.gather(query).wait(), gpu.gather(query.cuda()).wait()
    assert torch.equal(got.valid, want.valid)
    assert torch.equal(got.ids[got.valid], want.ids[want.valid])
    assert got.ids.is_pinned()


def test_gather_is_asynchronous_and_waitable():
    layout = LAYOUTS[1]
    gpu = RoutingRecorder(layout, num_slots=8192, device="cuda")
    slots = torch.randperm(8192, generator=torch.Generator().manual_seed(1))[:4096].cuda()
    # Before anything is recorded: warms the allocators (the gather below allocates without syncing),
    # and leaves zeros and "not recorded" in the pinned blocks that gather reuses.
    assert not gpu.gather(slots).wait().valid.any()
    gen = torch.Generator().manual_seed(0)
    ids = [random_topk(4096, layout, "cuda", gen) for _ in range(layout.num_layers)]
    for layer in range(layout.num_layers):
        gpu.record(layer, slots, ids[layer])
    torch.cuda._sleep(1 << 30)  # ~0.5 s of GPU work queued on the stream ahead of the gather's copies
    handle = gpu.gather(slots)
    assert not handle.done(), "gather waited for the stream: it must return while its copy is still queued"
    rows = handle.wait()
    assert handle.done()
    assert rows.complete, "wait() returned before the copy landed"
    assert torch.equal(rows.ids.long(), torch.stack(ids, dim=1).cpu())


def test_bad_ids_and_slots_are_counted_and_reported_at_gather():
    layout = LAYOUTS[0]
    gpu = RoutingRecorder(layout, num_slots=8, device="cuda")
    gpu.record(0, torch.tensor([1, 2, 30], device="cuda"), torch.tensor([[0, 1], [2, 9], [3, 4]], device="cuda"))
    gpu.record(1, torch.tensor([1], device="cuda"), torch.tensor([[0, -1]], device="cuda"))
    with pytest.raises(RoutingCaptureError, match="1 x expert id out of range, 1 x slot out of range, 1 x row mixing"):
        gpu.gather([1, 2]).wait()
    rows = gpu.gather([1, 2]).wait()  # counts were cleared; the bad rows were skipped
    assert rows.valid[:, 0].tolist() == [True, False]


def test_record_replays_inside_a_cuda_graph_with_a_changing_valid_row_count():
    layout = LAYOUTS[0]
    gpu = RoutingRecorder(layout, num_slots=64, device="cuda")
    slots = torch.zeros(16, dtype=torch.int64, device="cuda")
    ids = torch.zeros((16, 2), dtype=torch.int32, device="cuda")
    valid = torch.zeros(1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as SGLang does
        for layer in range(layout.num_layers):
            gpu.record(layer, slots, ids, valid_rows=valid)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layout.num_layers):
            gpu.record(layer, slots, ids, valid_rows=valid)
    for start, n in ((0, 5), (20, 16), (40, 3)):
        slots.copy_(torch.arange(start, start + 16))
        ids.copy_(torch.randint(0, 8, (16, 2), dtype=torch.int32))
        valid.fill_(n)
        graph.replay()
        rows = gpu.gather(torch.arange(start, start + 16)).wait()
        assert rows.valid.all(dim=1).tolist() == [True] * n + [False] * (16 - n)
        assert torch.equal(rows.ids[:n, 0].to(torch.int32), ids[:n].cpu())


def test_record_inside_torch_compile_on_cuda():
    layout = LAYOUTS[0]
    gpu = RoutingRecorder(layout, num_slots=8, device="cuda")

    @torch.compile(fullgraph=True)
    def step(slots, ids):
        gpu.record(2, slots, ids)
        return ids + 1

    step(torch.tensor([3, 4], device="cuda"), torch.tensor([[1, 2], [3, 4]], device="cuda"))
    rows = gpu.gather([3, 4]).wait()
    assert rows.ids[:, 2].tolist() == [[1, 2], [3, 4]]
