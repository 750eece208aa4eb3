"""The CUDA backend: parity with the CPU backend, counted errors, async gather, CUDA graphs, the
device guard, large buffers, and the SGLang staging pattern. Each test can fail on a GPU.

Skipped without a GPU (tests/conftest.py); run on a lent GPU machine (scripts/gpu_check.sh).
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from routing_replay.capture import RoutingCaptureError, RoutingLayout, RoutingRecorder, cuda_backend_available
from routing_replay.capture import native

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
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # ~0.5 s of GPU work queued on the stream ahead of the gather's copies
    started = time.perf_counter()
    handle = gpu.gather(slots)
    returned_after = time.perf_counter() - started
    assert not handle.done(), "gather waited for the stream: it must return while its copy is still queued"
    assert returned_after < 0.1, f"gather blocked the host for {returned_after:.3f} s"
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
    rows = gpu.gather([1, 2]).wait()  # reported once; the bad rows were skipped
    assert rows.valid[:, 0].tolist() == [True, False]
    assert gpu.error_counts.tolist() == [0, 1, 1, 1]  # the device counts only grow


@pytest.mark.parametrize("op", ["gather", "reset"])
def test_an_out_of_range_slot_in_gather_or_reset_is_reported(op):
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=8, device="cuda")
    getattr(gpu, op)(torch.tensor([0, 8], device="cuda"))
    with pytest.raises(RoutingCaptureError, match="1 x slot out of range"):
        gpu.gather([0]).wait()


def test_wait_twice_returns_the_rows_and_reports_errors_once():
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=8, device="cuda")
    gpu.record(0, torch.tensor([3], device="cuda"), torch.tensor([[1, 9]], device="cuda"))
    handle = gpu.gather([3])
    rows = handle.wait(check_errors=False)
    assert handle.errors == {"expert id out of range": 1}
    assert handle.wait(check_errors=False) is rows and handle.errors == {"expert id out of range": 1}
    with pytest.raises(RoutingCaptureError):
        handle.wait()  # the same handle still says so
    assert gpu.take_errors(gpu.error_snapshot()) == {}  # nothing left to report


def test_counts_from_a_record_on_one_stream_and_a_gather_on_another_are_never_lost():
    """The counts are never reset on the device, so a gather's snapshot on stream B cannot erase a
    count a record on stream A adds meanwhile: every bad row is reported exactly once."""
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=64, device="cuda")
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    bad = torch.tensor([[0, 9]] * 32, device="cuda")  # 32 bad rows per call
    slots = torch.arange(32, device="cuda")
    torch.cuda.synchronize()
    handles = []
    for _ in range(50):
        with torch.cuda.stream(a):
            gpu.record(0, slots, bad)
        with torch.cuda.stream(b):
            handles.append(gpu.gather(slots))
    torch.cuda.synchronize()
    reported = 0
    for handle in handles:
        handle.wait(check_errors=False)
        reported += handle.errors.get("expert id out of range", 0)
    reported += gpu.take_errors(gpu.error_snapshot()).get("expert id out of range", 0)
    assert reported == 50 * 32


@pytest.mark.parametrize(("num_experts", "top_id"), [(256, 255), (32768, 32767)])
def test_every_storage_dtype_keeps_its_highest_id(num_experts, top_id):
    layout = RoutingLayout(num_layers=2, top_k=2, num_experts=num_experts)
    gpu = RoutingRecorder(layout, num_slots=4, device="cuda")
    for dtype in (torch.int32, torch.int64):
        gpu.record(1, torch.tensor([2], device="cuda"), torch.tensor([[top_id, 0]], dtype=dtype, device="cuda"))
        assert gpu.gather([2]).wait().ids[0, 1].tolist() == [top_id, 0]


@pytest.mark.parametrize(("valid", "recorded"), [(0, 0), (3, 3), (99, 4), (-5, 0)])
def test_a_device_valid_row_count_of_zero_more_than_n_or_negative(valid, recorded):
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=8, device="cuda")
    count = torch.tensor([valid], dtype=torch.int32, device="cuda")
    gpu.record(0, torch.arange(4, device="cuda"), torch.tensor([[0, 1]] * 4, device="cuda"), valid_rows=count)
    rows = gpu.gather(range(4)).wait()
    assert rows.valid[:, 0].tolist() == [True] * recorded + [False] * (4 - recorded)


def test_a_buffer_of_more_than_2_pow_31_elements_writes_and_reads_its_last_slot_and_layer():
    layout = RoutingLayout(num_layers=48, top_k=8, num_experts=128)
    num_slots = 2**31 // layout.ids_per_token + 2  # 2.1 GB of uint8 ids
    gpu = RoutingRecorder(layout, num_slots=num_slots, device="cuda")
    assert gpu.ids.numel() > 2**31
    last = torch.tensor([num_slots - 1], device="cuda")
    ids = torch.arange(120, 128, device="cuda").view(1, 8)
    gpu.record(47, last, ids)
    gpu.copy_rows_from(gpu, last, torch.tensor([num_slots - 2], device="cuda"))
    rows = gpu.gather(torch.tensor([num_slots - 2, num_slots - 1], device="cuda")).wait()
    assert rows.valid[:, 47].tolist() == [True, True] and rows.valid[:, :47].sum() == 0
    assert rows.ids[1, 47].tolist() == list(range(120, 128)) and rows.ids[0, 47].tolist() == list(range(120, 128))
    gpu.reset(last)
    assert not gpu.gather(last).wait().valid.any()


def test_a_failed_native_call_raises_once_and_the_next_call_works():
    """A failing runtime call (here: a view naming a device that does not exist) raises naming what
    failed, and leaves no error behind for the next, good call to report."""
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=8, device="cuda")
    module = native.backend_for(gpu.device)
    bogus = module.RecorderView(gpu.ids.data_ptr(), gpu.valid_bits.data_ptr(), gpu.error_counts.data_ptr(), 8, 3,
                                2, 8, 1, torch.cuda.device_count())
    slots, ids = torch.tensor([1], device="cuda"), torch.tensor([[0, 1]], device="cuda")
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        module.record(bogus, 0, slots.data_ptr(), 8, ids.data_ptr(), 8, 2, 1, 0, 8,
                      torch.cuda.current_stream().cuda_stream)
    gpu.record(0, slots, ids)
    assert gpu.gather([1]).wait().valid[0, 0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_recorder_on_another_device_than_the_current_one_launches_on_its_own():
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=8, device="cuda:1")
    with torch.cuda.device(0):
        gpu.record(0, torch.tensor([2], device="cuda:1"), torch.tensor([[3, 4]], device="cuda:1"))
        handle = gpu.gather(torch.tensor([2], device="cuda:1"))
        rows = handle.wait()
        assert torch.cuda.current_device() == 0
    assert rows.ids[0, 0].tolist() == [3, 4] and rows.valid[0, 0]


def test_the_first_record_call_of_a_fresh_process_may_be_inside_a_graph_capture():
    """CUDA loads kernels lazily; the recorder launches each of its kernels once when it is built,
    so a first record call inside torch.cuda.graph captures a loaded kernel."""
    script = textwrap.dedent("""
        import torch
        from routing_replay.capture import RoutingLayout, RoutingRecorder
        gpu = RoutingRecorder(RoutingLayout(num_layers=2, top_k=2, num_experts=8), num_slots=16, device="cuda")
        slots = torch.arange(4, dtype=torch.int32, device="cuda")
        ids = torch.tensor([[1, 2]] * 4, dtype=torch.int32, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gpu.record(1, slots, ids)
        graph.replay()
        rows = gpu.gather(range(4)).wait()
        assert rows.valid[:, 1].all() and rows.ids[:, 1].tolist() == [[1, 2]] * 4, rows
        print("ok")
    """)
    env = {**os.environ, "CUDA_MODULE_LOADING": "LAZY"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_sglang_staging_pattern_under_graph_replay():
    """SGLang's pattern: a graph captured at 16 rows records every row into the staging (padded rows
    hold real ids); each replay's forward copies its real rows to their slots and clears the staging."""
    layout = LAYOUTS[0]
    main = RoutingRecorder(layout, num_slots=256, device="cuda")
    staging = RoutingRecorder(layout, num_slots=16, device="cuda")
    positions = torch.arange(16, device="cuda")
    ids = torch.zeros((16, 2), dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layout.num_layers):
            staging.record(layer, positions, ids)
    gen = torch.Generator().manual_seed(3)
    start = 0
    for real in (5, 16, 3):
        ids.copy_(torch.randint(0, 8, (16, 2), generator=gen))
        graph.replay()
        slots = torch.arange(start, start + real, device="cuda")
        main.copy_rows_from(staging, positions[:real], slots)
        staging.clear()
        rows = main.gather(slots).wait()
        assert rows.complete and torch.equal(rows.ids[:, 0].long(), ids[:real].cpu())
        assert not staging.gather(range(16)).wait().valid.any()
        start += real
    assert main.gather(range(start, 256)).wait().valid.sum() == 0  # no padded row reached a slot


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


def test_record_under_torch_compile_reduce_overhead_gives_exact_rows():
    """mode="reduce-overhead" replays CUDA graphs (cudagraph trees); each call's rows must be its own."""
    layout = LAYOUTS[0]
    gpu = RoutingRecorder(layout, num_slots=64, device="cuda")

    @torch.compile(mode="reduce-overhead")
    def step(slots, ids):
        gpu.record(0, slots, ids)
        return ids.sum()

    gen = torch.Generator().manual_seed(5)
    expected = {}
    for call in range(8):
        slots = torch.arange(call * 8, call * 8 + 8, device="cuda")
        ids = torch.randint(0, 8, (8, 2), generator=gen).cuda()
        step(slots, ids)
        expected.update(zip(slots.tolist(), ids.tolist()))
    rows = gpu.gather(list(expected)).wait()
    assert rows.valid[:, 0].all() and rows.ids[:, 0].tolist() == list(expected.values())


def test_a_column_slice_is_recorded_without_a_copy_on_cuda():
    gpu = RoutingRecorder(LAYOUTS[0], num_slots=8, device="cuda")
    wide = torch.tensor([[0, 1, 8], [2, 3, 8]], dtype=torch.int32, device="cuda")
    gpu.record(0, torch.tensor([4, 5], device="cuda"), wide[:, :2])
    assert gpu.gather([4, 5]).wait().ids[:, 0].tolist() == [[0, 1], [2, 3]]
