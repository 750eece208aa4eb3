"""Server flags and per-request routing parameters.

Server: ``--record-routing`` turns recording on; ``--routing-sink tcp://HOST:PORT`` is the default
collector; ``--routing-max-queued-mb`` bounds routing awaiting its consumers; ``--no-routing-shm``
disables the same-host shared-memory path.

Request: ``sampling_params.custom_params.routing_replay`` (``/generate``) or the top-level
``custom_params.routing_replay`` (OpenAI endpoints), either ``true`` or a map with ``key``
(default: the request id), ``start_len`` (first row, default 0), ``sink`` (collector address,
default ``--routing-sink``) and ``inline`` (also return the compact bytes base64-encoded).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

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
    return options


def publish(options: RecordingOptions) -> None:
    os.environ[_ENV] = json.dumps(asdict(options))


def current() -> RecordingOptions:
    raw = os.environ.get(_ENV)
    return RecordingOptions(**json.loads(raw)) if raw else RecordingOptions()


@dataclass(frozen=True)
class RoutingRequest:
    key: str | None = None
    start_len: int = 0
    sink: str | None = None
    inline: bool = False

    @classmethod
    def from_custom_params(cls, custom_params: Any) -> RoutingRequest | None:
        """The request's routing parameters, None when it asks for none; RoutingRequestError if malformed."""
        if not isinstance(custom_params, dict) or custom_params.get(REQUEST_KEY) in (None, False):
            return None
        raw = custom_params[REQUEST_KEY]
        if raw is True:
            return cls()
        if not isinstance(raw, dict):
            raise RoutingRequestError(f"custom_params.{REQUEST_KEY} must be true or an object, got {raw!r}")
        unknown = set(raw) - {"key", "start_len", "sink", "inline"}
        if unknown:
            raise RoutingRequestError(f"custom_params.{REQUEST_KEY} has unknown field(s) {sorted(unknown)}")
        request = cls(**raw)
        if request.key is not None and (not isinstance(request.key, str) or not request.key):
            raise RoutingRequestError(f"custom_params.{REQUEST_KEY}.key must be a non-empty string")
        if isinstance(request.start_len, bool) or not isinstance(request.start_len, int) or request.start_len < 0:
            raise RoutingRequestError(f"custom_params.{REQUEST_KEY}.start_len must be a non-negative int")
        if request.sink is not None and (not isinstance(request.sink, str) or "://" not in request.sink):
            raise RoutingRequestError(f"custom_params.{REQUEST_KEY}.sink must be a ZMQ address like tcp://host:port")
        if not isinstance(request.inline, bool):
            raise RoutingRequestError(f"custom_params.{REQUEST_KEY}.inline must be true or false")
        return request
