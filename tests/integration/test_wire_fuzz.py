"""Mutation fuzz of both receive loops on real ZMQ sockets on 127.0.0.1.

Messages of every kind our sockets carry are captured from the real components (a sender's pings
and routing messages - frames, with a mask, int16, a pipeline slice, shared-memory descriptors -
and a collector's pongs and received / taken / released / rejected acks), then mutated: bit flips,
field values of every msgpack type, invalid UTF-8, size claims up to 2**64 - 1, truncation at and
inside every frame, extra / missing / duplicated / reordered frames, empty messages, messages of
the other direction. 10,000 go at a live collector and 10,000, as acks, at a live sender. Then
the threads are alive, every message is accounted for exactly once in the stats, nothing was
delivered that was not sent, and valid traffic is still delivered exactly. Seeded and bounded.
"""

from __future__ import annotations

import gc
import random
import time

import msgspec
import pytest
import torch
import zmq

from routing_replay.wire import CollectorConfig, CollectorStats, RoutingCollector, RoutingSender, SenderConfig
from routing_replay.wire import format as wf
from tests.integration.test_wire_transport import make_routing, record_for
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(240)

MESSAGES_PER_LOOP = 10_000
FAST = dict(ack_timeout_s=0.5, heartbeat_s=0.2)
Message = list[bytes]


# ---- capture: real messages of every kind ------------------------------------------------------


def _type(message: Message) -> str:
    return msgspec.msgpack.decode(message[0])["type"]


def capture_sender_messages(sender: RoutingSender) -> list[Message]:
    """What a real sender puts on the wire: a tap ROUTER answers its pings (shared memory on) and
    acknowledges everything, and records every message it receives."""
    tap = zmq.Context.instance().socket(zmq.ROUTER)
    tap.linger = 0
    address = f"tcp://127.0.0.1:{tap.bind_to_random_port('tcp://127.0.0.1')}"
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(2)) > 0.3
    samples = [  # key, routing, experts, valid, layers
        ("frames", make_routing(5, 3, 2, 8, 0), 8, None, None),
        ("masked", make_routing(6, 4, 2, 8, 1), 8, mask, None),
        ("int16", make_routing(4, 2, 8, 512, 3), 512, None, None),
        ("slice", make_routing(7, 6, 2, 16, 4), 16, None, (2, 5)),
        ("shm", make_routing(300, 48, 8, 128, 5), 128, None, None),  # 115 KB: over shm_min_bytes
    ]
    captured: list[Message] = []
    sender.connect(address)
    deadline = time.monotonic() + 30
    while sum(_type(m) == "routing" for m in captured) < len(samples):
        assert time.monotonic() < deadline, "the sender's messages did not arrive"
        if not tap.poll(100):
            continue
        identity, *frames = tap.recv_multipart()
        captured.append(frames)
        message = msgspec.msgpack.decode(frames[0])
        if message["type"] == "routing":
            tap.send_multipart([identity, wf.encode(wf.Taken(message["key"], "tap-epoch"))])
            continue
        first = not any(_type(m) == "ping" for m in captured[:-1])
        tap.send_multipart([identity, wf.encode(wf.Pong(message["nonce"], "tap-epoch", message["shm_probe"] is not None, 1 << 30))])
        if first:  # the handshake is done: now the routing, the large sample through /dev/shm
            for key, ids, experts, valid, layers in samples:
                sender.send(record_for(key, ids, experts, weight_version="v1", valid=valid),  # a string field to mutate
                            ids, address, valid=valid, layers=layers)
    tap.close()
    captured = _one_per_kind(captured)
    shm_descriptors = [m for m in captured if _type(m) == "routing" and msgspec.msgpack.decode(m[0])["shm"]]
    assert shm_descriptors, "no shared-memory descriptor was captured"
    return captured


def capture_collector_acks(collector: RoutingCollector, to_collector: list[Message]) -> list[Message]:
    """What a real collector answers: pong, received, taken, released and rejected."""
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(collector.address)
    acks: list[Message] = []

    def receive_until(types: set[str]) -> None:
        deadline = time.monotonic() + 10
        while not types <= {_type(a) for a in acks}:
            assert time.monotonic() < deadline, f"the collector did not answer {types}: {[_type(a) for a in acks]}"
            if peer.poll(100):
                acks.append(peer.recv_multipart())

    peer.send_multipart(next(m for m in to_collector if _type(m) == "ping"))
    receive_until({"pong"})
    routings = list({msgspec.msgpack.decode(m[0])["key"]: m for m in to_collector if _type(m) == "routing"}.values())
    for message in routings:
        peer.send_multipart(message)
    receive_until({"received"})
    taken = collector.take([msgspec.msgpack.decode(m[0])["key"] for m in routings], timeout=10)
    del taken  # the shared-memory sample's views go: released
    gc.collect()
    bad = msgspec.msgpack.decode(routings[0][0])
    bad["checksum"] ^= 1
    bad["key"] = "corrupted"  # a new key: a taken one would be acknowledged as a duplicate
    peer.send_multipart([msgspec.msgpack.encode(bad), *routings[0][1:]])
    receive_until({"taken", "released", "rejected"})
    peer.close()
    return _one_per_kind(acks)


def _one_per_kind(messages: list[Message]) -> list[Message]:
    """The first message of each (type, key): the corpus does not depend on how many heartbeats or
    resends happened to be captured, so a seed gives the same mutations every run."""
    first: dict[tuple, Message] = {}
    for message in messages:
        fields = msgspec.msgpack.decode(message[0])
        first.setdefault((fields["type"], fields.get("key")), message)
    return list(first.values())


# ---- mutations --------------------------------------------------------------------------------

_INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]
_SIZE_CLAIMS = [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**63]
_ANY_VALUES: list[object] = [None, True, False, 0, -1, 1.5, float("nan"), "", "x", "routing-replay-x", b"\x00\x01",
                             [1, 2], {"a": 1}, [], {}, "k" * 2000, 2**64 - 1, -2**63]


def _fields(message: Message) -> dict | None:
    try:
        fields = msgspec.msgpack.decode(message[0])
    except Exception:  # noqa: BLE001 - msgspec raises UnicodeDecodeError too, not only DecodeError
        return None
    return fields if isinstance(fields, dict) else None


def _msgpack_int(value: int) -> int:
    return max(-2**63, min(value, 2**64 - 1))


def _with_fields(message: Message, fields: dict) -> Message:
    fields = {k: _msgpack_int(v) if isinstance(v, int) else v for k, v in fields.items()}
    return [msgspec.msgpack.encode(fields), *message[1:]]


def flip_bits(message: Message, rng: random.Random) -> Message:
    out = list(message)
    i = rng.randrange(len(out))
    frame = bytearray(out[i]) or bytearray(b"\x00")
    for _ in range(rng.randint(1, 4)):
        frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
    out[i] = bytes(frame)
    return out


def field_value(message: Message, rng: random.Random) -> Message:
    fields = _fields(message)
    if not fields:
        return flip_bits(message, rng)
    name = rng.choice(list(fields))
    current = fields[name]
    if isinstance(current, int) and not isinstance(current, bool) and rng.random() < 0.5:
        value = current ^ (1 << rng.randrange(64)) if rng.random() < 0.5 else current + rng.choice([-1, 1])
    else:
        value = rng.choice(_ANY_VALUES)
    return _with_fields(message, {**fields, name: value})


def invalid_utf8(message: Message, rng: random.Random) -> Message:
    fields = _fields(message)
    names = [n for n, v in (fields or {}).items() if isinstance(v, str)]
    if not names:
        return flip_bits(message, rng)
    bad = rng.choice(_INVALID_UTF8)
    placeholder = "\x01" * len(bad)  # same length: the msgpack string header stays right
    encoded = msgspec.msgpack.encode({**fields, rng.choice(names): placeholder})
    return [encoded.replace(placeholder.encode(), bad, 1), *message[1:]]


def size_claim(message: Message, rng: random.Random) -> Message:
    fields = _fields(message)
    names = [n for n, v in (fields or {}).items() if isinstance(v, int) and not isinstance(v, bool)]
    if not names:
        return field_value(message, rng)
    fields = dict(fields)
    claim = rng.choice(_SIZE_CLAIMS)
    fields[rng.choice(names)] = claim
    shape = [fields.get(n) for n in ("layer_stop", "layer_start", "top_k")]
    consistent = all(type(v) is int and abs(v) < 2**16 for v in shape)
    if fields.get("type") == "routing" and consistent and rng.random() < 0.3:  # a self-consistent huge payload
        fields["rows"] = fields["num_tokens"] = abs(claim)
        fields["payload_bytes"] = abs(claim) * (fields["layer_stop"] - fields["layer_start"]) * fields["top_k"]
    return _with_fields(message, fields)


def drop_or_add_field(message: Message, rng: random.Random) -> Message:
    fields = _fields(message)
    if not fields:
        return flip_bits(message, rng)
    fields = dict(fields)
    if rng.random() < 0.5 and len(fields) > 1:
        del fields[rng.choice(list(fields))]
    else:
        fields[rng.choice(["extra", "type2", "", "\x00"])] = rng.choice(_ANY_VALUES)
    return _with_fields(message, fields)


def truncate(message: Message, rng: random.Random) -> Message:
    cut = rng.randint(0, len(message))
    out = list(message[:cut]) or [b""]
    if rng.random() < 0.5:  # and inside a frame
        i = rng.randrange(len(out))
        out[i] = out[i][: rng.randint(0, max(len(out[i]) - 1, 0))]
    return out


def frames_shuffle(message: Message, rng: random.Random) -> Message:
    out = list(message)
    action = rng.choice(["extra", "duplicate", "reorder", "drop_header"])
    if action == "extra":
        out.insert(rng.randint(0, len(out)), rng.randbytes(rng.randint(0, 64)))
    elif action == "duplicate":
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    elif action == "reorder" and len(out) > 1:
        rng.shuffle(out)
    elif len(out) > 1:
        out = out[1:]
    else:
        out = [rng.randbytes(8)]
    return out


def wrong_top_level(message: Message, rng: random.Random) -> Message:
    value = rng.choice([[1, 2, 3], 5, "routing", None, b"bytes", 1.0, [{"type": "routing"}]])
    return [msgspec.msgpack.encode(value), *message[1:]]


def empty(message: Message, rng: random.Random) -> Message:
    return [b""] if rng.random() < 0.7 else [b"", b""]


MUTATIONS = [flip_bits, field_value, invalid_utf8, size_claim, drop_or_add_field, truncate, frames_shuffle,
             wrong_top_level, empty]


def targeted(corpus: list[Message]) -> list[Message]:
    """Mutations that random ones reach only rarely, under fresh keys (a duplicate key is answered
    before its payload is looked at): a payload one byte short behind a valid header, and a
    shared-memory region outside its arena."""
    by_key = {fields["key"]: message for message in corpus
              if (fields := _fields(message)) and fields.get("type") == "routing"}
    framed, shared = by_key["frames"], by_key["shm"]
    short = _with_fields(framed, {**_fields(framed), "key": "targeted-short"})
    outside = _with_fields(shared, {**_fields(shared), "key": "targeted-outside", "shm_offset": 1 << 40})
    return [[short[0], short[1][:-1]], outside]


def mutated(corpus: list[Message], other_direction: list[Message], count: int, seed: int) -> list[Message]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 50 == 0:
            out.append(list(rng.choice(other_direction)))  # a message meant for the other end
            continue
        message = list(rng.choice(corpus))
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            message = rng.choice(MUTATIONS)(message, rng)
        out.append(message)
    return out


def _outcomes(stats: CollectorStats) -> int:
    return stats.received + stats.failures + stats.duplicates + stats.pings + sum(stats.rejected.values())


def _decodes_to(message: Message, record: wf.RoutingRecord) -> bool:
    try:
        return wf.decode_to_collector(message[0]) == record
    except wf.WireFormatError:
        return False


# ---- the fuzz ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    """Real messages of both directions, captured from a real sender and a real collector. The
    capturing sender stays open, so shared-memory descriptors point at a live arena."""
    with RoutingSender(SenderConfig(shm_min_bytes=64 << 10, **FAST)) as sender:
        to_collector = capture_sender_messages(sender)
        with RoutingCollector() as collector:
            to_sender = capture_collector_acks(collector, to_collector)
        yield to_collector, to_sender


def test_collector_survives_10000_mutated_messages(corpus):
    to_collector, to_sender = corpus
    messages = mutated(to_collector, to_sender, MESSAGES_PER_LOOP, seed=1) + targeted(to_collector)
    with RoutingCollector(CollectorConfig(budget_bytes=64 << 20)) as collector:
        rogue = zmq.Context.instance().socket(zmq.DEALER)
        rogue.linger = 0
        rogue.sndhwm = 0  # no drops on our side: every message must reach the collector
        rogue.connect(collector.address)
        started = time.monotonic()
        for message in messages:
            rogue.send_multipart(message)
            while rogue.poll(0):  # its answers (pongs, acks, rejections) must not pile up
                rogue.recv_multipart()
        # `messages` counts a message as it is read, its outcome once handled: wait for the outcomes.
        wait_until(lambda: _outcomes(collector.stats()) >= len(messages), "every message to be handled", timeout=60)
        elapsed = time.monotonic() - started
        collector.check()  # the thread is alive
        stats = collector.stats()
        assert stats.messages == _outcomes(stats) == len(messages)  # each message counted once, as one outcome
        assert stats.rejected  # the mutations were seen as what they are
        assert {"header", "truncated", "frames", "checksum", "shm", "oversized", "payload_bytes", "rows", "layout",
                "version", "dtype", "key", "missing"} <= set(stats.rejected), stats.rejected
        assert stats.rejected["internal_error"] == 0, "a mutation reached a bug in the collector"
        # Nothing delivered that was not sent: each held sample is a message we sent, byte for byte.
        sent = {}
        for message in messages:
            fields = _fields(message)
            if fields and fields.get("type") == "routing" and isinstance(fields.get("key"), str):
                sent.setdefault(fields["key"], []).append(message)
        held = collector.held_keys()
        assert len(held) == stats.received
        samples = collector.take(held, timeout=1)
        for key, sample in samples.items():
            candidates = [m for m in sent[key] if _decodes_to(m, sample.record)]
            assert candidates, f"{key!r} was delivered with a header nobody sent"
            payload = sample.routing.numpy().tobytes()
            mask = b"" if sample.valid is None else sample.valid.numpy().tobytes()
            if sample.record.shm is None:
                assert any(m[1] == payload and (len(m) == 2 or m[2] == mask) for m in candidates)
            assert wf.checksum(payload, mask) == sample.record.checksum
        del samples
        rogue.close()
        # And valid traffic still arrives, exactly.
        with RoutingSender(SenderConfig(**FAST)) as sender:
            for i in range(20):
                ids = make_routing(3 + i, 4, 2, 8, 100 + i)
                sender.send(record_for(f"after-{i}", ids, 8), ids, collector.address)
                assert torch.equal(collector.get(f"after-{i}", timeout=10).routing, ids)
        print(f"collector: {len(messages)} mutated messages in {elapsed:.1f}s; rejected {dict(stats.rejected)}; "
              f"received {stats.received}, duplicates {stats.duplicates}, pings {stats.pings}")


def test_sender_survives_10000_mutated_acknowledgements(corpus):
    to_collector, to_sender = corpus
    acks = mutated(to_sender, to_collector, MESSAGES_PER_LOOP, seed=2)
    hostile = zmq.Context.instance().socket(zmq.ROUTER)
    hostile.linger = 0
    hostile.sndhwm = 0
    port = hostile.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    with RoutingSender(SenderConfig(**FAST)) as sender, RoutingCollector() as collector:
        for i in range(8):  # deliveries pending at the hostile end, for acks to act on
            ids = make_routing(4, 2, 2, 8, i)
            sender.send(record_for(f"pending-{i}", ids, 8), ids, address)
        assert hostile.poll(10_000), "the sender never reached the hostile collector"
        identity = hostile.recv_multipart()[0]
        for ack in acks:
            hostile.send_multipart([identity, *ack])
            while hostile.poll(0):
                hostile.recv_multipart()  # its pings and resends
        wait_until(lambda: (lambda s: s.acks + s.acks_ignored + sum(s.acks_rejected.values()))(sender.stats())
                   >= len(acks), "every acknowledgement to be read", timeout=60)
        sender.check()
        stats = sender.stats()
        # Every ack frame sent was read once; pongs of the hostile end's own answers are not in `acks`.
        assert stats.acks + stats.acks_ignored + sum(stats.acks_rejected.values()) == len(acks)
        assert {"control", "frames"} <= set(stats.acks_rejected), stats.acks_rejected
        assert stats.acks_rejected["internal_error"] == 0, "a mutation reached a bug in the sender"
        hostile.close()
        for i in range(20):  # the same sender still delivers, exactly
            ids = make_routing(5 + i, 3, 2, 8, 200 + i)
            delivery = sender.send(record_for(f"after-{i}", ids, 8), ids, collector.address)
            assert torch.equal(collector.get(f"after-{i}", timeout=10).routing, ids)
            delivery.taken.result(timeout=10)
        print(f"sender: {len(acks)} mutated acks; applied {stats.acks}, ignored {stats.acks_ignored}, "
              f"rejected {dict(stats.acks_rejected)}")
