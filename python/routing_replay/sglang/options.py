"""Server flags and per-request routing parameters.

Server: ``--record-routing`` turns recording on; ``--routing-sink tcp://HOST:PORT`` is the default
collector; ``--routing-max-queued-mb`` bounds routing awaiting its consumers; ``--no-routing-shm``
disables the same-host shared-memory path.

Request: ``sampling_params.custom_params.routing_replay`` (``/generate``) or the top-level
``custom_params.routing_replay`` (OpenAI endpoints), either ``true`` or a map with ``key``
(default: the request id), ``start_len`` (first row, default 0), ``sink`` (collector address,
default ``--routing-sink``) and ``inline`` (also return the compact bytes base64-encoded).
Every malformed value is a RoutingRequestError (HTTP 400) naming the field and the problem.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass

from routing_replay.wire import format as wire_format
from routing_replay.wire.sender import check_endpoint

REQUEST_KEY = "routing_replay"
# SGLang builds its scheduler processes from a sealed ServerArgs record that cannot carry extra
# fields, so the launcher hands our options to them through the environment they inherit.
_ENV = "ROUTING_REPLAY_SGLANG_OPTIONS"


class RoutingRequestError(ValueError):
    """A request's routing parameters are invalid or cannot be served (HTTP 400)."""


@dataclass(frozen=True)
class RecordingOptions:
    record_routing: bool = False
    routing_sink: str | None = None
    routing_max_queued_mb: int = 2048
    routing_shm: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing-replay")
    group.add_argument("--record-routing", action="store_true",
                       help="record each token's routed experts per MoE layer (routing-replay plugin)")
    group.add_argument("--routing-sink", default=None,
                       help="default collector for recorded routing, e.g. tcp://127.0.0.1:5555")
    group.add_argument("--routing-max-queued-mb", type=int, default=2048,
                       help="MiB of routing held until its consumers take it (default 2048)")
    group.add_argument("--no-routing-shm", dest="routing_shm", action="store_false",
                       help="never use the same-host shared-memory path for routing")


def from_namespace(args: argparse.Namespace) -> RecordingOptions:
    options = RecordingOptions(
        record_routing=bool(getattr(args, "record_routing", False)),
        routing_sink=getattr(args, "routing_sink", None),
        routing_max_queued_mb=int(getattr(args, "routing_max_queued_mb", 2048)),
        routing_shm=bool(getattr(args, "routing_shm", True)),
    )
    if options.routing_sink and not options.record_routing:
        raise SystemExit("--routing-sink needs --record-routing")
    if options.routing_sink:
        try:
            check_endpoint(options.routing_sink)
        except ValueError as exc:
            raise SystemExit(f"--routing-sink: {exc}") from None
    if options.routing_max_queued_mb <= 0:
        raise SystemExit(f"--routing-max-queued-mb must be positive, got {options.routing_max_queued_mb}")
    return options


def publish(options: RecordingOptions) -> None:
    os.environ[_ENV] = json.dumps(asdict(options))


def current() -> RecordingOptions:
    raw = os.environ.get(_ENV)
    return RecordingOptions(**json.loads(raw)) if raw else RecordingOptions()


# The largest start_len accepted: sequences are indexed by 32-bit positions on the wire and in SGLang.
MAX_START_LEN = 2**31 - 1
_FIELD = f"custom_params.{REQUEST_KEY}"
_FIELDS = ("key", "start_len", "sink", "inline")
_SHOWN_CHARS = 40  # of a client's value quoted in an error message
_MAX_SINK_CHARS = len("tcp://:65535") + 253  # the longest DNS name; ipc:// paths are shorter still (107 bytes)


@dataclass(frozen=True)
class RoutingRequest:
    key: str | None = None
    start_len: int = 0
    sink: str | None = None
    inline: bool = False

    @classmethod
    def from_custom_params(cls, custom_params: object) -> RoutingRequest | None:
        """The request's routing parameters, None when it asks for none.

        Raises RoutingRequestError (HTTP 400) naming the field and the problem for every malformed
        value, and nothing else: these values come from clients. ``null`` means "not given".
        """
        if custom_params is None:
            return None
        if not isinstance(custom_params, dict):
            raise RoutingRequestError(f"custom_params must be an object, got {_shown(custom_params)}")
        raw = custom_params.get(REQUEST_KEY)
        if raw is None or raw is False:  # identity: 0 and 0.0 equal False but are malformed here
            return None
        if raw is True:
            return cls()
        if not isinstance(raw, dict):
            raise RoutingRequestError(f"{_FIELD} must be true, false or an object, got {_shown(raw)}")
        _check_field_names(raw)
        return cls(key=_key(raw.get("key")), start_len=_start_len(raw.get("start_len")), sink=_sink(raw.get("sink")),
                   inline=_inline(raw.get("inline")))

    def delivery_key(self, rid: object) -> str:
        """The key the routing travels under: ``key``, else the request id (checked like a key)."""
        if self.key is not None:
            return self.key
        return _checked_key(rid, f"{_FIELD}.key is not given, so the request id (rid)")


def servable_request(custom_params: object, options: RecordingOptions) -> RoutingRequest | None:
    """The request's routing parameters if this server can serve them, None when it asks for none;
    RoutingRequestError (HTTP 400) naming the problem otherwise."""
    request = RoutingRequest.from_custom_params(custom_params)
    if request is None:
        return None
    if not options.record_routing:
        raise RoutingRequestError(f"this request asks for routing ({_FIELD}) but the server was started "
                                  "without --record-routing")
    if not (request.sink or options.routing_sink or request.inline):
        raise RoutingRequestError(f"routing requested without a destination: pass {_FIELD}.sink or inline=true, "
                                  "or start the server with --routing-sink")
    return request


def _shown(value: object) -> str:
    """A client's value in an error message: its JSON type, and a short quote of scalars."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, str):
        return f"the string {_quoted(value)}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value.bit_length() > 64:  # and Python refuses to print ones of 4300+ digits
        return f"a {value.bit_length()}-bit integer"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"a {type(value).__name__}"


def _quoted(text: str) -> str:
    return repr(text[:_SHOWN_CHARS]) + ("..." if len(text) > _SHOWN_CHARS else "")


def _check_field_names(raw: dict) -> None:
    not_strings = [name for name in raw if not isinstance(name, str)]
    if not_strings:
        raise RoutingRequestError(f"{_FIELD} has field names that are not strings: "
                                  f"{', '.join(_shown(name) for name in not_strings[:5])}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        listed = ", ".join(_quoted(name) for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise RoutingRequestError(f"{_FIELD} has unknown field(s) {listed}; known: {', '.join(_FIELDS)}")


def _key(value: object) -> str | None:
    return None if value is None else _checked_key(value, f"{_FIELD}.key")


def _checked_key(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise RoutingRequestError(f"{name} must be a string, got {_shown(value)}")
    if not value:
        raise RoutingRequestError(f"{name} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise RoutingRequestError(f"{name} is not valid Unicode text ({exc.reason} at position {exc.start})") from None
    if size > wire_format.MAX_KEY_BYTES:
        raise RoutingRequestError(f"{name} is {size} bytes in UTF-8, more than the wire's limit of "
                                  f"{wire_format.MAX_KEY_BYTES}")
    return value


def _start_len(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_START_LEN:
        raise RoutingRequestError(f"{_FIELD}.start_len must be an integer from 0 to {MAX_START_LEN}, "
                                  f"got {_shown(value)}")
    return value


def _sink(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RoutingRequestError(f"{_FIELD}.sink must be a string like tcp://host:port, got {_shown(value)}")
    if len(value) > _MAX_SINK_CHARS:
        raise RoutingRequestError(f"{_FIELD}.sink is {len(value)} characters long: it is not a collector address "
                                  f"(at most {_MAX_SINK_CHARS})")
    try:
        return check_endpoint(value)
    except ValueError as exc:
        raise RoutingRequestError(f"{_FIELD}.sink: {exc}") from None


def _inline(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RoutingRequestError(f"{_FIELD}.inline must be true or false, got {_shown(value)}")
    return value
