"""Real ZMQ sockets on 127.0.0.1: sender -> collector round trips, zero copy, failures, security."""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import numpy as np
import pytest
import torch
import zmq

from routing_replay.ports import free_port
from routing_replay.wire import (
    CollectorConfig,
    CurveClient,
    CurveServer,
    DeliveryError,
    MissingRoutingKeys,
    RoutingCollector,
    RoutingRecord,
    RoutingSender,
    SenderConfig,
    SenderFull,
    TokenMismatchError,
    generate_keypair,
    token_hash,
)
from routing_replay.wire import format as wf
from routing_replay.wire.worker import BackgroundThreadDied
from routing_replay.wire import shm
from tests.polling import wait_until

FAST = dict(ack_timeout_s=1.0, heartbeat_s=0.2)


def make_routing(rows: int, layers: int, top_k: int, experts: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.uint8 if experts <= 256 else torch.int16
    return torch.randint(0, experts, (rows, layers, top_k), generator=gen).to(dtype)


def record_for(key: str, routing: torch.Tensor, experts: int, tokens: list[int] | None = None,
               weight_version: str = "", valid: torch.Tensor | None = None) -> RoutingRecord:
    """The record a producer makes for ``routing`` (tokens default to one more than its rows)."""
    tokens = tokens if tokens is not None else list(range(routing.shape[0] + 1))
    return RoutingRecord.of(key, routing, valid, num_experts=experts, num_tokens=len(tokens),
                            token_hash=token_hash(tokens), weight_version=weight_version)


def header_for(key: str, routing: torch.Tensor) -> RoutingRecord:
    """A valid header for ``routing`` (8 experts) travelling as frames: what a raw peer sends."""
    return RoutingRecord.of(key, routing, None, num_experts=8, num_tokens=routing.shape[0] + 1, token_hash=0)


def address_of(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


@pytest.fixture
def collector():
    with RoutingCollector() as c:
        yield c


@pytest.fixture
def sender():
    with RoutingSender(SenderConfig(**FAST)) as s:
        yield s


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "shm"])
@pytest.mark.parametrize(
    ("rows", "layers", "top_k", "experts"),
    [(1, 1, 1, 2), (37, 3, 2, 8), (513, 48, 8, 128), (129, 5, 8, 512), (64, 61, 8, 256)],
)
def test_round_trip_is_exact_and_zero_copy(collector, rows, layers, top_k, experts, shared_memory):
    routing = make_routing(rows, layers, top_k, experts)
    with RoutingSender(SenderConfig(shared_memory=shared_memory, shm_min_bytes=0, **FAST)) as s:
        delivery = s.send(record_for("k", routing, experts), routing, collector.address)
        sample = collector.get("k", timeout=10)
        assert torch.equal(sample.routing, routing)
        assert sample.valid is None
        assert sample.routing.data_ptr() == address_of(sample.source)  # a view of the received memory
        if shared_memory:
            assert collector.stats().shm_received == 1
        else:
            assert isinstance(sample.source.obj, zmq.Frame)  # libzmq's message buffer itself
        delivery.taken.result(timeout=10)
        assert s.queued_bytes == 0


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "shm"])
def test_over_100_mb_round_trip(collector, shared_memory):
    routing = make_routing(64 * 4096 + 7, 48, 8, 128, seed=1)  # > 100 MB as uint8
    assert routing.numel() > 100e6
    with RoutingSender(SenderConfig(shared_memory=shared_memory, **FAST)) as s:
        s.send(record_for("big", routing, 128), routing, collector.address)
        sample = collector.get("big", timeout=60)
        assert sample.routing.data_ptr() == address_of(sample.source)
        assert torch.equal(sample.routing, routing)


def test_missing_rows_travel_as_a_mask(collector, sender):
    routing = make_routing(20, 4, 2, 8)
    valid = torch.ones(20, 4, dtype=torch.bool)
    valid[5:9, 2] = False
    sender.send(record_for("masked", routing, 8, valid=valid), routing, collector.address, valid=valid)
    sample = collector.get("masked", timeout=10)
    assert torch.equal(sample.valid, valid)
    assert torch.equal(sample.routing, routing)


def test_pipeline_stage_receives_only_its_layer_range(sender):
    routing = make_routing(16, 8, 2, 8)
    with RoutingCollector() as stage0, RoutingCollector() as stage1:
        sender.send(record_for("s", routing, 8), routing, stage0.address, layers=(0, 5))
        sender.send(record_for("s", routing, 8), routing, stage1.address, layers=(5, 8))
        first, second = stage0.get("s", timeout=10), stage1.get("s", timeout=10)
    assert (first.record.layer_start, first.record.layer_stop, first.record.num_layers) == (0, 5, 8)
    assert torch.equal(first.routing, routing[:, :5])
    assert torch.equal(second.routing, routing[:, 5:])


def test_a_layer_slice_travels_with_a_consistent_record_of_its_own(sender, collector):
    """Each stage's record describes exactly its slice: sizes, mask, missing count and checksum are
    the slice's; what identifies the sample (key, tokens, start, weights) is the whole record's."""
    routing = make_routing(16, 8, 2, 8)
    valid = torch.ones(16, 8, dtype=torch.bool)
    valid[3, 6] = valid[9, 7] = False  # both holes in layers 5..7
    whole = RoutingRecord.of("p", routing, valid, num_experts=8, num_tokens=20, token_hash=token_hash(range(20)),
                             start=3, weight_version="w9")
    with RoutingCollector() as stage1:
        sender.send(whole, routing, collector.address, valid=valid, layers=(0, 5))
        sender.send(whole, routing, stage1.address, valid=valid, layers=(5, 8))
        first, second = collector.get("p", timeout=10), stage1.get("p", timeout=10)
    expected_first = RoutingRecord.of("p", routing[:, :5], None, num_experts=8, num_tokens=20,
                                      token_hash=whole.token_hash, start=3, weight_version="w9", num_layers=8)
    expected_second = RoutingRecord.of("p", routing[:, 5:], valid[:, 5:], num_experts=8, num_tokens=20,
                                       token_hash=whole.token_hash, start=3, weight_version="w9", num_layers=8,
                                       layer_start=5)
    assert first.record == expected_first and first.valid is None  # its layers are complete: no mask
    assert second.record == expected_second and torch.equal(second.valid, valid[:, 5:])
    assert (second.record.missing, second.record.mask_bytes, second.record.payload_bytes) == (2, 16 * 3, 16 * 3 * 2)
    assert whole.layer_stop == 8 and whole.missing == 2  # the caller's record is left as it was
    with pytest.raises(ValueError, match=r"layers \(6, 9\) outside the record's \[0, 8\)"):
        sender.send(whole, routing, collector.address, valid=valid, layers=(6, 9))


def test_the_sender_refuses_tensors_its_record_does_not_describe(sender, collector):
    routing = make_routing(4, 3, 2, 8)
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[0, 0] = False
    with pytest.raises(ValueError, match=r"of the record's shape \(5, 3, 2\)"):
        sender.send(record_for("k", make_routing(5, 3, 2, 8), 8), routing, collector.address)
    with pytest.raises(ValueError, match="announces 1 missing positions: valid must be"):
        sender.send(record_for("k", routing, 8, valid=valid), routing, collector.address)
    with pytest.raises(TypeError, match="takes a RoutingRecord"):
        sender.send({"key": "k"}, routing, collector.address)  # type: ignore[arg-type]


def test_each_rank_receives_only_the_samples_it_owns(sender):
    with RoutingCollector() as rank0, RoutingCollector() as rank1:
        owner = {f"prompt{g}-sample{i}": (rank0, rank1)[g % 2] for g in range(6) for i in range(3)}
        expected, deliveries = {}, []
        for n, (key, rank) in enumerate(owner.items()):
            expected[key] = make_routing(10 + n, 4, 2, 8, seed=n)
            deliveries.append(sender.send(record_for(key, expected[key], 8), expected[key], rank.address))
        for rank in (rank0, rank1):
            mine = [k for k, r in owner.items() if r is rank]
            got = rank.take(mine, timeout=10)
            assert all(torch.equal(got[k].routing, expected[k]) for k in mine)
        for delivery in deliveries:  # every sample acknowledged: nothing is pending, nothing is resent
            delivery.taken.result(timeout=10)
        sentinel = make_routing(2, 4, 2, 8)
        for rank in (rank0, rank1):  # behind everything sent to it on the same connection: all of it was read
            sender.send(record_for("sentinel", sentinel, 8), sentinel, rank.address)
            rank.get("sentinel", timeout=10)
            stats = rank.stats()
            mine = sum(r is rank for r in owner.values())
            assert stats.received == mine + 1 and stats.held_samples == 0  # nothing of the other rank's arrived


def test_missing_keys_time_out_naming_them(collector, sender):
    routing = make_routing(3, 2, 2, 8)
    sender.send(record_for("present", routing, 8), routing, collector.address).received.result(timeout=10)
    with pytest.raises(MissingRoutingKeys, match="2 key\\(s\\) after 0.3s: 'absent-1', 'absent-2'") as info:
        collector.take(["present", "absent-1", "absent-2"], timeout=0.3)
    assert info.value.keys == ["absent-1", "absent-2"]
    assert collector.get("present", timeout=5).routing.shape == (3, 2, 2)  # the present one was kept


def test_token_hash_mismatch_is_refused_and_reported_to_the_sender(collector, sender):
    tokens = [5, 6, 7, 8]
    routing = make_routing(3, 2, 2, 8)
    delivery = sender.send(record_for("t", routing, 8, tokens), routing, collector.address)
    with pytest.raises(TokenMismatchError, match="re-tokenised or trimmed"):
        collector.get("t", timeout=10, token_ids=[5, 6, 7, 9])
    with pytest.raises(DeliveryError, match="token_mismatch"):
        delivery.taken.result(timeout=10)
    ok = sender.send(record_for("u", routing, 8, tokens), routing, collector.address)
    assert collector.get("u", timeout=10, token_ids=tokens).record.token_hash == token_hash(tokens)
    ok.taken.result(timeout=10)


def test_malformed_frames_are_rejected_and_valid_messages_still_arrive(collector, sender):
    rng = random.Random(0)
    good = make_routing(4, 2, 2, 8)
    good_header = header_for("fuzz", good)
    garbage = []
    for i in range(60):
        garbage.append([rng.randbytes(rng.randint(0, 200))])  # random bytes
    for i in range(60):  # valid header, mutated field
        field, value = rng.choice([("version", 9), ("dtype", "int16"), ("rows", 99), ("payload_bytes", 3),
                                   ("checksum", 1), ("num_layers", 1), ("top_k", 0)])
        h = msgspec.structs.replace(good_header, key=f"bad{i}", **{field: value})
        garbage.append([wf.encode(h), good.numpy().tobytes()])
    for i in range(30):  # truncated payload, missing payload, extra frames
        h = msgspec.structs.replace(good_header, key=f"trunc{i}")
        payload = good.numpy().tobytes()
        garbage.append(rng.choice([[wf.encode(h), payload[: rng.randint(0, len(payload) - 1)]], [wf.encode(h)],
                                   [wf.encode(h), payload, payload, payload]]))
    for i in range(20):  # bit flips in the payload
        h = msgspec.structs.replace(good_header, key=f"flip{i}")
        payload = bytearray(good.numpy().tobytes())
        payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        garbage.append([wf.encode(h), bytes(payload)])
    for i in range(10):  # shared-memory names that do not exist or escape /dev/shm
        h = msgspec.structs.replace(good_header, key=f"shm{i}", shm=rng.choice(["routing-replay-x", "../etc/passwd"]))
        garbage.append([wf.encode(h)])
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.linger = 0
    rogue.connect(collector.address)
    for message in garbage:
        rogue.send_multipart(message)
    sender.send(record_for("after", good, 8), good, collector.address)
    assert torch.equal(collector.get("after", timeout=10).routing, good)
    wait_until(lambda: sum(collector.stats().rejected.values()) >= len(garbage), "every malformed message to be read")
    stats = collector.stats()
    assert sum(stats.rejected.values()) == len(garbage), stats.rejected
    assert stats.received == 1
    assert {"header", "checksum", "truncated", "frames", "shm"} <= set(stats.rejected)
    rogue.close()


def test_budget_applies_back_pressure_until_views_are_freed():
    routing = make_routing(1000, 10, 8, 128)  # 80 KB each
    with RoutingCollector(CollectorConfig(budget_bytes=200_000)) as collector, \
            RoutingSender(SenderConfig(shared_memory=False, **FAST)) as sender:
        for i in range(6):
            sender.send(record_for(f"b{i}", routing, 8 * 16), routing, collector.address)
        held = [collector.get(f"b{i}", timeout=10).routing for i in range(3)]  # 240 KB held > budget
        wait_until(lambda: sender.stats().transmitted >= 6, "every sample to be on its way")
        # Reading paused: the collector leaves even the heartbeats unanswered, b3..b5 unread.
        wait_until(lambda: sender.reachable(collector.address) is False, "the collector to stop answering")
        stats = collector.stats()
        assert (stats.received, stats.held_bytes) == (3, 240_000)
        del held
        rest = collector.take(["b3", "b4", "b5"], timeout=10)
        for key in rest:
            assert torch.equal(rest[key].routing, routing)
        del rest
        gc.collect()
        wait_until(lambda: collector.stats().held_bytes == 0, "the freed views to release the budget")


def test_a_sample_larger_than_the_budget_is_rejected_loudly():
    routing = make_routing(2000, 10, 8, 128)
    with RoutingCollector(CollectorConfig(budget_bytes=100_000)) as collector, \
            RoutingSender(SenderConfig(**FAST)) as sender:
        delivery = sender.send(record_for("huge", routing, 128), routing, collector.address)
        with pytest.raises(DeliveryError, match="oversized: 160000 bytes exceed the collector's limit of 100000"):
            delivery.taken.result(timeout=10)
        assert sender.stats().transmitted == 0  # refused at the sender, from the limit in the collector's pong


def test_sender_bounds_queued_bytes_until_consumers_take_them(collector):
    routing = make_routing(100, 10, 10, 128)  # 10 KB
    with RoutingSender(SenderConfig(max_queued_bytes=25_000, **FAST)) as sender:
        sender.send(record_for("q0", routing, 128), routing, collector.address)
        sender.send(record_for("q1", routing, 128), routing, collector.address)
        with pytest.raises(SenderFull, match="awaiting their consumers"):
            sender.send(record_for("q2", routing, 128), routing, collector.address, block=False)
        start = time.monotonic()
        with pytest.raises(SenderFull):
            sender.send(record_for("q2", routing, 128), routing, collector.address, timeout=0.3)
        assert time.monotonic() - start >= 0.3
        collector.get("q0", timeout=10)
        sender.send(record_for("q2", routing, 128), routing, collector.address, timeout=10)  # room again
        collector.take(["q1", "q2"], timeout=10)
        sender.flush(timeout=10)


def test_undeliverable_routing_fails_its_delivery_instead_of_vanishing():
    routing = make_routing(3, 2, 2, 8)
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with RoutingSender(SenderConfig(give_up_after_s=0.5, **FAST)) as sender:
        delivery = sender.send(record_for("lost", routing, 8), routing, nobody)
        with pytest.raises(DeliveryError, match="not taken .* within 0.5s"):
            delivery.taken.result(timeout=10)
        assert sender.queued_bytes == 0


def test_shared_memory_falls_back_to_the_socket(monkeypatch, collector):
    routing = make_routing(2000, 8, 8, 128)
    monkeypatch.setattr(shm, "free_bytes", lambda: 1000)  # a small /dev/shm, as in many containers
    with RoutingSender(SenderConfig(**FAST)) as sender:
        sender.send(record_for("small-shm", routing, 128), routing, collector.address)
        sample = collector.get("small-shm", timeout=10)
    assert isinstance(sample.source.obj, zmq.Frame)
    assert collector.stats().shm_received == 0


def test_shared_memory_is_not_used_when_the_collector_cannot_see_it(monkeypatch, collector):
    routing = make_routing(2000, 8, 8, 128)
    monkeypatch.setattr(shm, "read_probe", lambda name: None)  # another host or /dev/shm namespace
    with RoutingSender(SenderConfig(**FAST)) as sender:
        sender.send(record_for("other-host", routing, 128), routing, collector.address)
        assert torch.equal(collector.get("other-host", timeout=10).routing, routing)
    assert collector.stats().shm_received == 0


def test_curve_admits_the_allowed_sender_and_counts_others():
    server, client, stranger = generate_keypair(), generate_keypair(), generate_keypair()
    routing = make_routing(4, 2, 2, 8)
    config = CollectorConfig(curve=CurveServer(server, allowed_clients=(client.public,)))
    with RoutingCollector(config) as collector:
        with RoutingSender(SenderConfig(curve=CurveClient(stranger, server.public), **FAST)) as intruder:
            intruder.send(record_for("intruder", routing, 8), routing, collector.address)
            wait_until(lambda: collector.stats().rejected["unauthenticated"] >= 1 and
                       intruder.never_answered(collector.address), "the intruder's handshake to fail")
            assert intruder.stats().transmitted == 0  # routing waits for a first answer: none came
        assert collector.stats().messages == 0  # not even its heartbeats were read
        with RoutingSender(SenderConfig(curve=CurveClient(client, server.public), **FAST)) as friend:
            friend.send(record_for("friend", routing, 8), routing, collector.address)
            assert torch.equal(collector.get("friend", timeout=10).routing, routing)


def test_collector_binds_loopback_by_default(collector):
    assert collector.address.startswith("tcp://127.0.0.1:")


def test_sender_and_collector_in_different_processes(collector):
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[2])!r})
        from tests.integration.test_wire_transport import make_routing, record_for
        from routing_replay.wire import RoutingSender, SenderConfig
        with RoutingSender(SenderConfig(ack_timeout_s=1.0, heartbeat_s=0.2)) as sender:
            for i in range(5):
                r = make_routing(100 * (i + 1), 6, 4, 64, seed=i)
                sender.send(record_for(f"p{{i}}", r, 64), r, {collector.address!r})
            sender.flush(timeout=60)
        print("flushed")
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = collector.take([f"p{i}" for i in range(5)], timeout=60)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == "flushed"
    for i in range(5):
        assert torch.equal(got[f"p{i}"].routing, make_routing(100 * (i + 1), 6, 4, 64, seed=i))


def test_shared_region_is_reused_only_after_the_consumer_frees_it(collector):
    first, second = make_routing(2000, 8, 8, 128, seed=1), make_routing(2000, 8, 8, 128, seed=2)
    with RoutingSender(SenderConfig(**FAST)) as sender:
        sender.send(record_for("a", first, 128), first, collector.address)
        held = collector.get("a", timeout=10)
        sender.send(record_for("b", second, 128), second, collector.address)
        other = collector.get("b", timeout=10)
        assert other.record.shm_offset != held.record.shm_offset  # "a" is still being read
        assert torch.equal(held.routing, first)
        offset_a = held.record.shm_offset
        del held
        wait_until(lambda: sender._arena.used_bytes <= other.routing.numel() + 4096,
                   "the collector to report the region released")
        sender.send(record_for("c", second, 128), second, collector.address)
        assert collector.get("c", timeout=10).record.shm_offset == offset_a


def test_full_arena_falls_back_to_frames(collector):
    routing = make_routing(2000, 10, 32, 128)  # 640 KB
    with RoutingSender(SenderConfig(shm_arena_bytes=1 << 20, **FAST)) as sender:
        sender.send(record_for("x", routing, 128), routing, collector.address)
        held = collector.get("x", timeout=10)
        sender.send(record_for("y", routing, 128), routing, collector.address)
        overflow = collector.get("y", timeout=10)
    assert held.record.shm is not None
    assert overflow.record.shm is None and isinstance(overflow.source.obj, zmq.Frame)
    assert torch.equal(overflow.routing, routing)


def test_reachability_is_known_after_a_heartbeat(collector):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with RoutingSender(SenderConfig(**FAST)) as sender:
        assert sender.reachable(collector.address) is None
        sender.connect(collector.address)
        sender.connect(nobody)
        wait_until(lambda: sender.reachable(collector.address) is True and sender.reachable(nobody) is False,
                   "a heartbeat answered by the collector and three unanswered by nobody")
        assert sender.never_answered(nobody) and not sender.never_answered(collector.address)


def _kill_thread(owner, method: str) -> None:
    """Makes ``owner``'s background thread die at its next loop turn, as a bug would."""

    def broken(*args, **kwargs):
        raise MemoryError("injected")

    setattr(owner, method, broken)
    owner._wake()


def test_a_dead_collector_thread_is_an_error_at_once_not_a_timeout(sender):
    collector = RoutingCollector()
    try:
        blocked: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _capture(blocked, lambda: collector.take(["never"], timeout=60)))
        waiter.start()
        started = time.monotonic()
        _kill_thread(collector, "_flush_outbox")
        waiter.join(timeout=5)
        assert not waiter.is_alive() and time.monotonic() - started < 1.0  # the blocked consumer woke up
        assert isinstance(blocked[0], BackgroundThreadDied) and "MemoryError: injected" in str(blocked[0])
        for call in (lambda: collector.get("k", timeout=60), lambda: collector.take(["k"], timeout=60),
                     collector.stats, collector.check, lambda: collector.discard(["k"])):
            started = time.monotonic()
            with pytest.raises(BackgroundThreadDied, match="routing-collector-.*MemoryError: injected"):
                call()
            assert time.monotonic() - started < 1.0
    finally:
        collector.close()


def test_a_dead_sender_thread_fails_its_deliveries_and_every_later_call(collector):
    sender = RoutingSender(SenderConfig(**FAST))
    try:
        routing = make_routing(3, 2, 2, 8)
        pending = sender.send(record_for("pending", routing, 8), routing, f"tcp://127.0.0.1:{free_port()}")
        started = time.monotonic()
        _kill_thread(sender, "_tick")
        with pytest.raises(DeliveryError, match="routing-sender.*MemoryError: injected"):
            pending.taken.result(timeout=5)
        assert time.monotonic() - started < 1.0
        for call in (lambda: sender.send(record_for("k", routing, 8), routing, collector.address),
                     lambda: sender.flush(timeout=60), sender.stats, sender.check,
                     lambda: sender.reachable(collector.address), lambda: sender.connect(collector.address)):
            with pytest.raises(BackgroundThreadDied, match="routing-sender.*MemoryError: injected"):
                call()
    finally:
        sender.close()


def test_bad_destinations_are_refused_at_the_call_and_never_reach_the_thread(sender, monkeypatch):
    routing = make_routing(3, 2, 2, 8)
    for destination in ("nonsense", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000", "udp://x:1", 5,
                        "tcp://host:1\x00", "tcp://-:5555", "ipc://" + "é" * 60):
        with pytest.raises(ValueError, match="collector address"):
            sender.send(record_for("k", routing, 8), routing, destination)
    # Should ZMQ ever refuse an address the syntax check admits, only that delivery fails.
    monkeypatch.setattr("routing_replay.wire.sender.check_endpoint", lambda address: address)
    refused = sender.send(record_for("k", routing, 8), routing, "tcp://-:5555")
    with pytest.raises(DeliveryError, match="cannot connect"):  # that delivery fails, the thread goes on
        refused.taken.result(timeout=10)
    sender.check()


def test_a_dead_thread_error_crosses_processes_as_itself():
    """Ray carries exceptions by pickling them: the trainer's error must reach the driver intact."""
    import pickle

    class Unpicklable(Exception):
        def __init__(self, a, b):
            super().__init__(a)

    for cause in (MemoryError("injected"), Unpicklable("odd", 2)):
        error = pickle.loads(pickle.dumps(BackgroundThreadDied("routing-collector-x", cause)))
        assert isinstance(error, BackgroundThreadDied) and error.thread_name == "routing-collector-x"
        assert "routing-collector-x" in str(error) and ("injected" in str(error) or "odd" in str(error))


def _capture(into: list, call) -> None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        into.append(exc)
