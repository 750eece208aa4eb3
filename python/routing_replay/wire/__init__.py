"""Wire: moves recorded routing from the inference engine to the trainer rank that trains on it.

- ``format``: the versioned wire format (msgpack header via msgspec + raw payload frames), field
  by field; no pickle anywhere. Its ``RoutingRecord`` is the one description of a sample's
  routing: made where it is recorded, sent as the header, received as ``RoutingSample.record``.
- ``RoutingSender``: non-blocking, byte-bounded, zero-copy sends from a background thread, with
  application-level acknowledgements and resends (at-least-once, de-duplicated by key).
- ``RoutingCollector``: a thread inside the trainer process; returns torch views of the received
  memory, within a byte budget.
- ``shm``: the same-host fast path through /dev/shm; ``security``: CURVE for sockets that cross hosts.

Imports torch, numpy, pyzmq, msgspec and xxhash; never sglang, megatron or ray.
"""

from routing_replay.wire.collector import (
    CollectorConfig,
    CollectorStats,
    MissingRoutingKeys,
    RoutingCollector,
    RoutingDeliveryFailed,
    RoutingSample,
    TokenMismatchError,
)
from routing_replay.wire.format import FORMAT_VERSION, RoutingRecord, WireFormatError, token_hash
from routing_replay.wire.security import CurveClient, CurveKeyPair, CurveServer, generate_keypair
from routing_replay.wire.sender import Delivery, DeliveryError, RoutingSender, SenderConfig, SenderFull

__all__ = [
    "FORMAT_VERSION",
    "CollectorConfig",
    "CollectorStats",
    "CurveClient",
    "CurveKeyPair",
    "CurveServer",
    "Delivery",
    "DeliveryError",
    "MissingRoutingKeys",
    "RoutingCollector",
    "RoutingDeliveryFailed",
    "RoutingRecord",
    "RoutingSample",
    "RoutingSender",
    "SenderConfig",
    "SenderFull",
    "TokenMismatchError",
    "WireFormatError",
    "generate_keypair",
    "token_hash",
]
