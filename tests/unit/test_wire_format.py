"""The wire format: the RoutingRecord (made from tensors, its rules), encoding, hashing, and decoding
arbitrary bytes safely."""

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routing_replay.wire import format as wf


def record(**overrides) -> wf.RoutingRecord:
    fields = dict(
        version=1, key="sample-0", weight_version="7", num_layers=48, layer_start=0, layer_stop=48, top_k=8,
        num_experts=128, dtype="uint8", rows=10, start=0, num_tokens=11, token_hash=123,
        payload_bytes=10 * 48 * 8, mask_bytes=0, missing=0, checksum=0,
    )
    fields.update(overrides)
    return wf.RoutingRecord(**fields)


def test_a_record_made_from_tensors_describes_them():
    routing = torch.randint(0, 128, (10, 6, 8), dtype=torch.uint8)
    valid = torch.ones(10, 6, dtype=torch.bool)
    complete = wf.RoutingRecord.of("k", routing, valid, num_experts=128, num_tokens=12, token_hash=5, start=1,
                                   weight_version="v", num_layers=48, layer_start=6)
    assert (complete.rows, complete.layer_start, complete.layer_stop, complete.num_layers) == (10, 6, 12, 48)
    assert (complete.payload_bytes, complete.mask_bytes, complete.missing) == (480, 0, 0)
    assert complete.checksum == wf.checksum(routing.numpy().tobytes())
    valid[3, 2] = valid[4, 0] = False
    partial = wf.RoutingRecord.of("k", routing, valid, num_experts=128, num_tokens=12, token_hash=5, start=1,
                                  num_layers=48, layer_start=6)
    assert (partial.mask_bytes, partial.missing) == (60, 2)
    assert partial.checksum == wf.checksum(routing.numpy().tobytes(), valid.numpy().tobytes())
    partial.validate(1 << 30)
    complete.validate(1 << 30)
    wide = wf.RoutingRecord.of("w", torch.zeros(2, 3, 4, dtype=torch.int16), None, num_experts=512, num_tokens=3,
                               token_hash=0)
    assert (wide.dtype, wide.payload_bytes, wide.num_layers) == ("int16", 48, 3)


@pytest.mark.parametrize(("routing", "valid", "problem"), [
    (torch.zeros(2, 3, 4, dtype=torch.int16), None, "CPU uint8 tensor for 128 experts"),
    (torch.zeros(2, 3, dtype=torch.uint8), None, "rows, layers, top_k"),
    (torch.zeros(2, 3, 4, dtype=torch.uint8), torch.ones(2, 4, dtype=torch.bool), r"\[2, 3\] bool"),
    (torch.zeros(2, 3, 4, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.uint8), r"\[2, 3\] bool"),
])
def test_a_record_refuses_tensors_that_do_not_fit(routing, valid, problem):
    with pytest.raises(ValueError, match=problem):
        wf.RoutingRecord.of("k", routing, valid, num_experts=128, num_tokens=3, token_hash=0)


def test_record_round_trips_through_msgpack_without_pickle():
    r = record(shm="routing-replay-seg-1")
    data = wf.encode(r)
    assert b"pickle" not in data and data[:1] != b"\x80"  # msgpack map, not a pickle stream
    assert wf.decode_to_collector(data) == r
    assert msgspec.msgpack.decode(data)["type"] == "routing"


def test_valid_records_pass():
    record().validate(1 << 30)
    record(num_experts=512, dtype="int16", payload_bytes=10 * 48 * 8 * 2).validate(1 << 30)
    record(layer_start=24, layer_stop=48, payload_bytes=10 * 24 * 8, mask_bytes=10 * 24, missing=1).validate(1 << 30)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"version": 2}, "version"),
        ({"key": ""}, "key"),
        ({"key": "k" * 2000}, "key"),
        ({"dtype": "int16"}, "dtype"),
        ({"num_experts": 300}, "dtype"),
        ({"top_k": 200}, "layout"),
        ({"layer_start": 10, "layer_stop": 10}, "layout"),
        ({"layer_stop": 49}, "layout"),
        ({"rows": 12}, "rows"),
        ({"start": -1}, "rows"),
        ({"payload_bytes": 7}, "payload_bytes"),
        ({"mask_bytes": 3}, "mask_bytes"),
        ({"mask_bytes": 480}, "missing"),
        ({"missing": 3}, "missing"),
        ({"mask_bytes": 480, "missing": 481}, "missing"),
    ],
)
def test_inconsistent_records_are_rejected_with_a_reason(overrides, reason):
    with pytest.raises(wf.WireFormatError) as info:
        record(**overrides).validate(1 << 30)
    assert info.value.reason == reason


def test_oversized_payload_is_rejected():
    with pytest.raises(wf.WireFormatError, match="oversized"):
        record().validate(max_payload_bytes=100)


def test_unknown_fields_and_types_are_rejected():
    data = msgspec.msgpack.encode({**msgspec.structs.asdict(record()), "type": "routing", "extra": 1})
    with pytest.raises(wf.WireFormatError, match="header"):
        wf.decode_to_collector(data)
    with pytest.raises(wf.WireFormatError):
        wf.decode_to_collector(msgspec.msgpack.encode({"type": "routing", "key": 5}))
    with pytest.raises(wf.WireFormatError, match="exceeds"):
        wf.decode_to_collector(b"\x00" * (wf.MAX_HEADER_BYTES + 1))


def test_token_hash_identifies_the_exact_sequence():
    ids = [1, 2, 3, 400000]
    assert wf.token_hash(ids) == wf.token_hash(torch.tensor(ids)) == wf.token_hash(torch.tensor(ids, dtype=torch.int32))
    assert wf.token_hash(ids) != wf.token_hash(ids[:-1])
    assert wf.token_hash(ids) != wf.token_hash([1, 2, 3, 400001])


def test_checksum_covers_payload_then_mask():
    assert wf.checksum(b"ab", b"c") == wf.checksum(b"abc")
    assert wf.checksum(b"abc") != wf.checksum(b"abd")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        message = wf.decode_to_collector(data)
    except wf.WireFormatError:
        return
    if isinstance(message, wf.RoutingRecord):
        try:
            message.validate(1 << 20)
        except wf.WireFormatError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(wf.RoutingRecord.__struct_fields__)),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.none(), st.booleans())))
def test_mutated_record_fields_are_decoded_or_rejected_never_crash(mutation):
    fields = {**msgspec.structs.asdict(record()), "type": "routing", **mutation}
    try:
        h = wf.decode_to_collector(msgspec.msgpack.encode(fields))
        h.validate(1 << 30)
    except wf.WireFormatError:
        pass


# Any msgpack value: what a peer can put in a frame that decodes as msgpack at all.
_MSGPACK_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=16),
              st.binary(max_size=16)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=20,
)
_TAGS = st.sampled_from(["routing", "ping", "pong", "received", "taken", "released", "rejected", "", "other"])


def frames(base: dict, field_names: list[str]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, arbitrary msgpack, and ``base`` with any tag and some fields replaced."""
    mutated = st.builds(lambda tag, fields: msgspec.msgpack.encode({**base, **fields, "type": tag}), _TAGS,
                        st.dictionaries(st.sampled_from(field_names), _MSGPACK_VALUES, max_size=4))
    return st.one_of(st.binary(max_size=512), _MSGPACK_VALUES.map(msgspec.msgpack.encode), mutated)


@settings(max_examples=300, deadline=None)
@given(frames({}, ["key", "epoch", "nonce", "shm_ok", "reason", "x"]))
def test_any_frame_is_an_acknowledgement_or_the_documented_rejection(frame):
    try:
        ack = wf.decode_to_sender(frame)
    except wf.WireFormatError as exc:
        assert exc.reason == "control"
        return
    assert isinstance(ack, (wf.Pong, wf.Received, wf.Taken, wf.Released, wf.Rejected))
    if isinstance(ack, wf.Pong):
        assert 0 <= ack.nonce < 2**64


@settings(max_examples=300, deadline=None)
@given(frames(msgspec.structs.asdict(record()), [*wf.RoutingRecord.__struct_fields__, "nonce", "shm_probe", "x"]))
def test_any_header_frame_is_a_valid_message_or_the_documented_rejection(frame):
    try:
        message = wf.decode_to_collector(frame)
    except wf.WireFormatError as exc:
        assert exc.reason == "header"
        return
    assert isinstance(message, (wf.RoutingRecord, wf.DeliveryFailed, wf.Ping))
    if isinstance(message, wf.RoutingRecord):
        assert min(message.rows, message.start, message.num_tokens, message.payload_bytes, message.shm_offset) >= 0
        try:
            message.validate(1 << 30)
        except wf.WireFormatError as exc:
            assert exc.reason in {"version", "key", "layout", "dtype", "rows", "payload_bytes", "mask_bytes",
                                  "missing", "oversized"}


def test_wire_integers_are_bounded_at_decoding():
    for field, value in [("rows", -1), ("shm_offset", -5), ("payload_bytes", -2**63)]:
        with pytest.raises(wf.WireFormatError, match="header"):
            wf.decode_to_collector(msgspec.msgpack.encode({**msgspec.structs.asdict(record()), "type": "routing",
                                                           field: value}))
    for nonce in (-1, -2**63):
        with pytest.raises(wf.WireFormatError, match="header"):
            wf.decode_to_collector(msgspec.msgpack.encode({"type": "ping", "nonce": nonce}))
    assert wf.decode_to_collector(msgspec.msgpack.encode({"type": "ping", "nonce": 2**64 - 1})).nonce == 2**64 - 1
    assert wf.decode_to_sender(wf.encode(wf.Pong(2**64 - 1, "e", True, 1 << 30))).nonce == 2**64 - 1


def test_keys_that_are_not_utf8_are_refused_before_sending():
    with pytest.raises(wf.WireFormatError, match="key"):
        record(key="bad\udcff").validate(1 << 30)


def test_a_failure_notice_round_trips_and_refuses_what_a_collector_would_not_hold():
    notice = wf.DeliveryFailed("s1", "the CUDA recorder skipped bad input")
    assert wf.decode_to_collector(wf.encode(notice)) == notice
    notice.validate(0)
    for bad, reason in ((wf.DeliveryFailed("", "x"), "key"), (wf.DeliveryFailed("k" * 1025, "x"), "key"),
                        (wf.DeliveryFailed("s1", "x" * (wf.MAX_ERROR_CHARS + 1)), "error"),
                        (wf.DeliveryFailed("s1", "bad\udcff"), "error")):
        with pytest.raises(wf.WireFormatError, match=reason):
            bad.validate(0)
    with pytest.raises(wf.WireFormatError, match="header"):  # fields are exactly key and error
        wf.decode_to_collector(msgspec.msgpack.encode({"type": "failed", "key": "s1", "error": "x", "rows": 3}))
