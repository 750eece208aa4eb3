"""Delivery guarantees on real ZMQ sockets on 127.0.0.1: de-duplication, resend on ack timeout,
exactly-once to the consumer across a collector restart, the message-size guard, and failure
notices raised at once by the consumer's take."""

from __future__ import annotations

import gc
import socket
from collections import Counter

import pytest
import torch
import zmq

from routing_replay.ports import free_port
from routing_replay.wire import (
    CollectorConfig,
    DeliveryError,
    RoutingCollector,
    RoutingDeliveryFailed,
    RoutingSender,
    SenderConfig,
)
from routing_replay.wire import format as wf
from tests.integration.test_wire_transport import header_for, make_routing, record_for
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(60)

QUICK_RESEND = dict(ack_timeout_s=0.2, heartbeat_s=0.1)
SMALL_LIMIT = 10_000
"""A collector's max_message_bytes; ZMQ then refuses frames over SMALL_LIMIT + MAX_HEADER_BYTES."""


def test_a_resent_duplicate_is_acknowledged_and_counted_but_delivered_once():
    """The same routing message sent again while held, and again after it was taken, is answered
    (``received``, then ``taken``) and counted as a duplicate; the consumer gets it once."""
    routing = make_routing(5, 3, 2, 8)
    message = [wf.encode(header_for("dup", routing)), routing.numpy().tobytes()]
    with RoutingCollector() as collector:
        peer = zmq.Context.instance().socket(zmq.DEALER)
        peer.linger = 0
        peer.connect(collector.address)
        try:
            def next_ack():
                assert peer.poll(10_000), "the collector did not answer"
                return wf.decode_to_sender(peer.recv())

            received, taken = wf.Received("dup", collector.epoch), wf.Taken("dup", collector.epoch)
            peer.send_multipart(message)
            assert next_ack() == received
            peer.send_multipart(message)  # a resend while held
            assert next_ack() == received
            assert collector.stats().duplicates == 1 and collector.held_keys() == ["dup"]
            assert torch.equal(collector.get("dup", timeout=10).routing, routing)
            assert next_ack() == taken
            peer.send_multipart(message)  # a resend after it was taken
            assert next_ack() == taken  # answered once it was handled: the collector's state is final
            stats = collector.stats()
            assert (stats.received, stats.duplicates, stats.taken) == (1, 2, 1)
            assert collector.held_keys() == []  # not delivered again
        finally:
            peer.close()


def test_a_take_of_thousands_of_samples_acknowledges_every_one():
    """``taken`` acks of a large take reach the sender (a ROUTER drops what exceeds its send
    high-water mark, 1000 messages by default: the sender would hold those samples for an hour)."""
    routing = make_routing(1, 1, 1, 8)
    keys = [f"s{i}" for i in range(2500)]
    with RoutingCollector() as collector, RoutingSender(SenderConfig(heartbeat_s=0.1)) as sender:
        for key in keys:
            sender.send(record_for(key, routing, 8), routing, collector.address)
        collector.take(keys, timeout=30)
        sender.flush(timeout=10)
        assert sender.stats().taken == len(keys)


def test_a_failure_notice_makes_the_take_of_its_key_raise_at_once_and_the_rest_stay_held():
    """The producer reports a key it will never send: a take that includes it raises naming the
    reason (not MissingRoutingKeys after the timeout), the notice is taken once (the sender stops
    resending it), a resent notice is a duplicate, and the keys beside it are still delivered."""
    routing = make_routing(3, 2, 2, 8)
    with RoutingCollector() as collector, RoutingSender(SenderConfig(heartbeat_s=0.1)) as sender:
        notice = sender.send_failure("lost", "routing of this request was lost: 1 x expert id out of range",
                                     collector.address)
        sender.send(record_for("kept", routing, 8), routing, collector.address)
        with pytest.raises(RoutingDeliveryFailed, match="'lost': routing of this request was lost") as raised:
            collector.take(["kept", "lost"], timeout=600)  # raised as soon as the notice is in
        assert raised.value.failures == {"lost": "routing of this request was lost: 1 x expert id out of range"}
        notice.taken.result(timeout=10)
        assert collector.stats().failures == 1
        assert torch.equal(collector.get("kept", timeout=10).routing, routing)
        sender.send_failure("lost", "again", collector.address).taken.result(timeout=10)  # answered as taken
        assert collector.stats().duplicates == 1
        sender.send_failure("dropped", "x", collector.address).received.result(timeout=10)
        assert collector.discard(["dropped"]) == 1  # an abandoned key's notice goes too
        sender.flush(timeout=10)
        assert sender.queued_bytes == 0 and sender.stats().failed == 0


def test_unacknowledged_routing_is_resent_and_taken_once():
    """A collector that is not reading (the consumer holds a sample that spends its whole budget)
    does not acknowledge: the sender resends after ack_timeout_s; once the collector reads again the
    consumer gets the sample once and every resend is counted as a duplicate."""
    blocker = make_routing(1000, 10, 10, 16)  # 100 KB: exactly the budget
    late = make_routing(5, 3, 2, 8, seed=1)
    with RoutingCollector(CollectorConfig(budget_bytes=blocker.numel())) as collector, \
            RoutingSender(SenderConfig(shared_memory=False, **QUICK_RESEND)) as sender:
        sender.send(record_for("blocker", blocker, 16), blocker, collector.address).received.result(timeout=10)
        held = collector.get("blocker", timeout=10)
        before = sender.stats().transmitted  # final for the blocker: it is acknowledged
        delivery = sender.send(record_for("late", late, 8), late, collector.address)
        wait_until(lambda: sender.stats().transmitted >= before + 2, "the unacknowledged sample to be resent")
        assert not delivery.received.done()  # nothing was read: the resend was the ack timeout's
        del held
        gc.collect()  # the budget is free: reading resumes
        assert torch.equal(collector.get("late", timeout=10).routing, late)
        delivery.taken.result(timeout=10)
        transmitted = sender.stats().transmitted  # final: nothing is pending any more
        wait_until(lambda: (lambda s: s.received + s.duplicates)(collector.stats()) == transmitted,
                   "every transmission to be read")
        stats = collector.stats()
        assert (stats.received, stats.duplicates) == (2, transmitted - 2)
        assert collector.held_keys() == []


def test_every_sample_is_taken_exactly_once_across_resends_and_a_collector_restart():
    """Samples through frames and /dev/shm, a short ack timeout, a collector closed while holding
    samples and with the acks of its last takes still queued, samples sent while no collector is
    up: every key is taken exactly once, byte for byte."""
    address = f"tcp://127.0.0.1:{free_port()}"
    sent = {f"e{i}": make_routing(4 + 7 * i, 6, 4, 64, seed=i) for i in range(30)}  # 96 B .. 5 KB
    keys = list(sent)
    taken: Counter[str] = Counter()

    def take(collector: RoutingCollector, wanted: list[str]) -> None:
        for key, sample in collector.take(wanted, timeout=30).items():
            assert torch.equal(sample.routing, sent[key]), key
            taken[key] += 1

    with RoutingSender(SenderConfig(shm_min_bytes=2048, **QUICK_RESEND)) as sender:
        first = RoutingCollector(CollectorConfig(bind=address))
        deliveries = {k: sender.send(record_for(k, sent[k], 64), sent[k], address) for k in keys[:24]}
        take(first, keys[:10])  # closed right after: its `taken` acks go out while it closes
        for key in keys[10:24]:
            deliveries[key].received.result(timeout=30)  # held by the first collector, never taken there
        first.close()
        for key in keys[24:]:  # sent while no collector is up
            deliveries[key] = sender.send(record_for(key, sent[key], 64), sent[key], address)
        with RoutingCollector(CollectorConfig(bind=address)) as second:
            take(second, keys[10:])
            for delivery in deliveries.values():
                delivery.taken.result(timeout=30)  # nothing is pending: nothing more is resent
            sentinel = make_routing(2, 6, 4, 64)
            sender.send(record_for("sentinel", sentinel, 64), sentinel, address)
            second.get("sentinel", timeout=30)  # behind everything sent: the second collector read it all
            assert second.held_keys() == []  # keys the first collector handed over were not delivered again
            assert second.stats().received == len(keys) - 10 + 1
            assert second.stats().shm_received > 0 and first.stats().shm_received > 0
        assert sender.stats().transmitted >= len(keys) + 14  # the samples held at the restart went twice
    assert taken == Counter(keys)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "shm"])
@pytest.mark.parametrize("rows", [100, 1000], ids=["within-zmq-allowance", "beyond-zmq-limit"])
def test_routing_over_the_collectors_limit_fails_at_the_sender_and_the_collector_serves_on(rows, shared_memory):
    """Routing larger than the collector's limit (announced in its pong) fails its delivery at once,
    naming the sizes, and is never sent: ZMQ would drop a frame over MAXMSGSIZE below the collector
    (closing the connection, silently), and the collector would refuse the rest. The collector reads
    no routing message, and the same sender's next sample arrives."""
    big, small = make_routing(rows, 20, 8, 16), make_routing(3, 2, 2, 8)  # 16 KB or 160 KB
    with RoutingCollector(CollectorConfig(max_message_bytes=SMALL_LIMIT)) as collector, \
            RoutingSender(SenderConfig(shared_memory=shared_memory, shm_min_bytes=0, **QUICK_RESEND)) as sender:
        delivery = sender.send(record_for("big", big, 16), big, collector.address)
        with pytest.raises(DeliveryError, match=rf"oversized: {big.numel()} bytes exceed the collector's limit "
                                                rf"of {SMALL_LIMIT}"):
            delivery.taken.result(timeout=10)
        assert sender.stats().transmitted == 0 and sender.stats().failed == 1
        after = sender.send(record_for("after", small, 8), small, collector.address)
        assert torch.equal(collector.get("after", timeout=10).routing, small)
        after.taken.result(timeout=10)
        stats = collector.stats()
        assert (stats.received, stats.duplicates, stats.rejected) == (1, 0, Counter())  # only "after" was read


def test_a_payload_over_max_message_bytes_from_a_peer_ignoring_the_limit_is_rejected_as_oversized():
    """The collector's own guard, for a peer that sends anyway (within ZMQ's header allowance): the
    message is read, counted as ``oversized`` and rejected to its sender; nothing is held."""
    routing = make_routing(125, 20, 8, 8)  # 20 KB
    with RoutingCollector(CollectorConfig(max_message_bytes=SMALL_LIMIT)) as collector:
        peer = zmq.Context.instance().socket(zmq.DEALER)
        peer.linger = 0
        peer.connect(collector.address)
        try:
            peer.send_multipart([wf.encode(header_for("over", routing)), routing.numpy().tobytes()])
            assert peer.poll(10_000), "the collector did not answer"
            ack = wf.decode_to_sender(peer.recv())
        finally:
            peer.close()
        assert isinstance(ack, wf.Rejected) and ack.key == "over" and ack.reason == "oversized"
        assert collector.stats().rejected == Counter(oversized=1)
        assert collector.held_keys() == []


def test_a_size_claim_beyond_the_zmq_limit_drops_the_connection_before_any_byte_is_read():
    """A raw ZMTP peer that announces a 1 MiB frame and sends none of it is disconnected on the claim
    alone: the frame is never allocated (without MAXMSGSIZE libzmq would allocate it and wait for
    the bytes). The same connection's ping was answered first, so the peer speaks ZMTP correctly."""
    with RoutingCollector(CollectorConfig(max_message_bytes=SMALL_LIMIT)) as collector:
        with _ZmtpDealer(collector.address) as peer:
            peer.send_frame(wf.encode(wf.Ping(7, None)))
            assert wf.decode_to_sender(peer.read_frame()) == wf.Pong(7, collector.epoch, False, SMALL_LIMIT)
            peer.announce_frame(1 << 20)
            assert peer.closed_by_peer()
        stats = collector.stats()
        assert (stats.messages, stats.pings) == (1, 1)
        routing = make_routing(3, 2, 2, 8)
        with RoutingSender(SenderConfig(**QUICK_RESEND)) as sender:
            sender.send(record_for("after", routing, 8), routing, collector.address)
            assert torch.equal(collector.get("after", timeout=10).routing, routing)


class _ZmtpDealer:
    """A plain TCP connection speaking ZMTP 3.0 as a DEALER (NULL mechanism), frame by frame."""

    def __init__(self, address: str) -> None:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self._conn = socket.create_connection((host, int(port)), timeout=10)
        self._conn.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32))
        ready = b"\x05READY" + b"\x0bSocket-Type" + len(b"DEALER").to_bytes(4, "big") + b"DEALER"
        self._conn.sendall(b"\x04" + bytes([len(ready)]) + ready)
        greeting = self._read(64)
        assert greeting[0] == 0xFF and greeting[10] == 3, greeting
        flags, body = self._read_any_frame()
        assert flags & 0x04 and body.startswith(b"\x05READY"), body  # the collector's READY command

    def send_frame(self, body: bytes) -> None:
        self._conn.sendall(b"\x00" + bytes([len(body)]) + body)

    def announce_frame(self, size: int) -> None:
        """The header of a single long frame of ``size`` bytes, none of which follow."""
        self._conn.sendall(b"\x02" + size.to_bytes(8, "big"))

    def read_frame(self) -> bytes:
        flags, body = self._read_any_frame()
        assert flags & 0x04 == 0, "a command where a message frame was expected"
        return body

    def closed_by_peer(self) -> bool:
        """True when the other end closes the connection (socket.timeout if it keeps it open)."""
        try:
            return self._conn.recv(1) == b""
        except ConnectionResetError:
            return True

    def _read_any_frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = int.from_bytes(self._read(8 if flags & 0x02 else 1), "big")
        return flags, self._read(size)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._conn.recv(n - len(data))
            assert chunk, "the collector closed the connection"
            data += chunk
        return data

    def __enter__(self) -> _ZmtpDealer:
        return self

    def __exit__(self, *exc) -> None:
        self._conn.close()
