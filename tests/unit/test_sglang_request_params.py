"""Per-request routing parameters: every malformed value is a RoutingRequestError (HTTP 400) naming
the field and the problem, and nothing else is ever raised: these values come from clients."""

import argparse

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from routing_replay.sglang import options as opts
from routing_replay.sglang.options import MAX_START_LEN, RecordingOptions, RoutingRequest, RoutingRequestError
from routing_replay.wire.format import MAX_KEY_BYTES
from tests.integration.sglang_support import MALFORMED_CUSTOM_PARAMS

FIELDS = ("key", "start_len", "sink", "inline")
# Only Python callers (SGLang's Engine API) can pass these: JSON object keys are always strings.
NOT_JSON = [
    ({"routing_replay": {1: "k"}}, "field names that are not strings: the number 1"),
    ({"routing_replay": {"key": "k", None: 1, (1, 2): 3}}, "field names that are not strings"),
    ({"routing_replay": {b"key": "k"}}, "field names that are not strings: a bytes"),
    ((), "custom_params must be an object, got an array"),
    ({"routing_replay": {"start_len": 10**5000}}, "got a 16610-bit integer"),
    ({"routing_replay": {"start_len": float("nan")}}, "start_len must be an integer"),
]


@pytest.mark.parametrize(("custom", "message"), MALFORMED_CUSTOM_PARAMS + NOT_JSON)
def test_malformed_parameters_are_refused_naming_the_problem(custom, message):
    with pytest.raises(RoutingRequestError) as refused:
        RoutingRequest.from_custom_params(custom)
    assert message in str(refused.value)
    assert len(str(refused.value)) < 400  # a huge value is quoted in part, never whole


@pytest.mark.parametrize(
    ("custom", "expected"),
    [(None, None), ({}, None), ({"other_plugin": [1, 2]}, None), ({"routing_replay": None}, None),
     ({"routing_replay": False}, None), ({"routing_replay": True}, RoutingRequest()),
     ({"routing_replay": {}}, RoutingRequest()),
     ({"routing_replay": {"key": None, "start_len": None, "sink": None, "inline": None}}, RoutingRequest()),
     ({"routing_replay": {"key": "k", "start_len": 3, "inline": True}}, RoutingRequest("k", 3, None, True)),
     ({"routing_replay": {"key": "é" * 512, "start_len": MAX_START_LEN, "sink": "ipc:///tmp/c.sock"}},
      RoutingRequest("é" * 512, MAX_START_LEN, "ipc:///tmp/c.sock")),
     ({"routing_replay": {"sink": "tcp://[::1]:5555"}}, RoutingRequest(sink="tcp://[::1]:5555"))],
)
def test_well_formed_parameters(custom, expected):
    assert RoutingRequest.from_custom_params(custom) == expected


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(st.characters(blacklist_categories=())))  # lone surrogates included
any_keys = st.sampled_from(FIELDS + ("routing_replay",)) | st.text(max_size=8) | st.integers() | st.none()
json_like = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(any_keys, inner, max_size=5), max_leaves=12)
routing_objects = st.dictionaries(st.sampled_from(FIELDS) | any_keys, json_like, max_size=5)


@settings(max_examples=400, deadline=None)
@given(value=json_like | routing_objects)
def test_any_value_gives_parameters_or_a_refusal_and_nothing_else(value):
    for custom in (value, {"routing_replay": value}):
        try:
            request = RoutingRequest.from_custom_params(custom)
        except RoutingRequestError as exc:
            assert str(exc)
            continue
        if request is not None:  # what is accepted is what the wire and the sender accept
            assert request.key is None or 0 < len(request.key.encode()) <= MAX_KEY_BYTES
            assert type(request.start_len) is int and 0 <= request.start_len <= MAX_START_LEN
            assert request.sink is None or isinstance(request.sink, str)
            assert type(request.inline) is bool


def test_the_server_must_record_and_have_a_destination():
    recording, plain = RecordingOptions(record_routing=True), RecordingOptions()
    with pytest.raises(RoutingRequestError, match="without --record-routing"):
        opts.servable_request({"routing_replay": {"inline": True}}, plain)
    with pytest.raises(RoutingRequestError, match="without a destination"):
        opts.servable_request({"routing_replay": True}, recording)
    assert opts.servable_request({"routing_replay": {"inline": True}}, recording) == RoutingRequest(inline=True)
    with_sink = RecordingOptions(record_routing=True, routing_sink="tcp://127.0.0.1:5555")
    assert opts.servable_request({"routing_replay": True}, with_sink) == RoutingRequest()
    assert opts.servable_request({"anything": 1}, plain) is None


def test_the_request_id_is_the_key_unless_one_is_given_and_is_checked_like_one():
    assert RoutingRequest(key="mine").delivery_key("r" * 5000) == "mine"
    assert RoutingRequest().delivery_key("rid-1") == "rid-1"
    for rid, message in (("r" * (MAX_KEY_BYTES + 1), "wire's limit"), ("", "must not be empty"), (7, "string")):
        with pytest.raises(RoutingRequestError, match=f"request id \\(rid\\).*{message}"):
            RoutingRequest().delivery_key(rid)


@pytest.mark.parametrize(("argv", "message"), [(["--routing-sink", "nowhere"], "not a collector address"),
                                               (["--routing-max-queued-mb", "0"], "must be positive")])
def test_bad_server_flags_refuse_to_start(argv, message):
    parser = argparse.ArgumentParser()
    opts.add_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        opts.from_namespace(parser.parse_args(["--record-routing", *argv]))


# routing_replay.wire.sender.check_endpoint admits these: libzmq wants a host's first character to be
# a letter or digit, and an ipc path of at most 107 bytes (not characters).
@pytest.mark.parametrize("sink", ["tcp://127.0.0.1:1", "tcp://localhost:65535", "tcp://[::1]:5", "tcp://a.b-c_d:9",
                                  "ipc:///tmp/x.sock", "ipc://@abstract", "tcp://-:5", "tcp://_a:5", "tcp://.:5",
                                  "ipc://" + "é" * 100])
def test_every_accepted_sink_is_one_zmq_connects_to(sink):
    """A sink the sender's thread cannot connect to would fail there, for every request after it."""
    try:
        RoutingRequest.from_custom_params({"routing_replay": {"sink": sink}})
    except RoutingRequestError:
        return
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    try:
        socket.connect(sink)
    finally:
        socket.close(linger=0)
