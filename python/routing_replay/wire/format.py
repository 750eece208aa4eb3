"""The routing wire format, version 1.

Every message is one ZMQ multipart message. Its first frame is a msgpack map (encoded with
msgspec) whose ``type`` field names the message; routing messages are followed by raw payload
frames. No pickle is used anywhere. Byte order is little-endian throughout.

Routing message (sender -> collector), frame 0 is a ``RoutingRecord``: the one typed description
of one sample's routing. It is made once, where the routing is recorded (``RoutingRecord.of``:
the SGLang scheduler when a request finishes), travels unchanged as this header, is what the
collector hands the consumer (``RoutingSample.record``), and its fields are the SGLang response's
descriptor. Only ``shm``/``shm_offset`` are the sender's (set on the copy it transmits), and a
pipeline stage's slice (``RoutingSender.send(layers=...)``) gets a record of its own.

============== ======== ==================================================================
field          type     meaning
============== ======== ==================================================================
type           str      ``"routing"``
key            str      sample key (1..1024 UTF-8 bytes), unique per sample; de-duplication
                        and acknowledgements are by key
weight_version str      the inference engine's weight version that produced the routing
num_layers     int      routed (MoE) layers of the model, L
layer_start    int      first layer carried (pipeline stages take a slice), 0 <= start
layer_stop     int      one past the last layer carried, start < stop <= L
top_k          int      experts per token, 1 <= K <= num_experts
num_experts    int      experts per layer, E (1..32768)
dtype          str      ``"uint8"`` when E <= 256, else ``"int16"`` (exactly that rule)
rows           int      tokens carried, R >= 0
start          int      sequence position of the first row (multi-turn: rows start there)
num_tokens     int      length of the token sequence the rows belong to; start + R <= it
token_hash     int      xxh3_64 (seed 0) of the sequence's token ids as little-endian int32
payload_bytes  int      R * (stop - start) * K * itemsize
mask_bytes     int      0 when every (row, layer) is present, else R * (stop - start)
missing        int      (row, layer) positions not recorded: 0 exactly when mask_bytes is 0
checksum       int      xxh3_64 (seed 0) of the payload bytes followed by the mask bytes
version        int      format version, ``1``; a collector rejects any other
shm            str|nil  set by the sender: name of its shared-memory arena under /dev/shm holding
                        payload then mask (same-host fast path); nil when they travel as frames
shm_offset     int      set by the sender: byte offset of the region in that arena (0 when nil)
============== ======== ==================================================================

Frames after the header: when ``shm`` is nil, frame 1 is the payload, ``[R, stop - start, K]``
C-order ids of ``dtype``; frame 2, present only when ``mask_bytes > 0``, is ``[R, stop - start]``
bytes, 1 where that (row, layer) was recorded. When ``shm`` is set there are no further frames,
and the region stays the sender's until the collector sends ``released`` for the key.

Failure message (sender -> collector), frame 0 only, a ``DeliveryFailed``: ``type`` ``"failed"``,
``key``, ``error`` (why, at most 4096 characters). The producer tells the consumer that the routing
of ``key`` will never come (a capture error found after the response went out, a failed gather):
it is acknowledged, resent and de-duplicated like routing, and the collector's ``take`` of that
key raises at once, naming the error, instead of waiting out its timeout.

Control messages (frame 0 only):

- ``ping`` (sender -> collector): ``nonce`` int, ``shm_probe`` str|nil (a /dev/shm segment holding
  the nonce's 8 bytes, so the collector can prove it shares the sender's /dev/shm).
- ``pong`` (collector -> sender): ``nonce``, ``epoch`` str (random per collector start; a new
  epoch tells the sender to resend everything not yet taken), ``shm_ok`` bool,
  ``max_payload_bytes`` int (the most payload + mask bytes it accepts: larger routing fails at the
  sender, ``oversized``, instead of being sent to a socket that would drop it).
- ``received`` / ``taken`` / ``released`` (collector -> sender): ``key``, ``epoch``. ``received``:
  validated and held; ``taken``: handed to the consumer (the sender stops resending it);
  ``released``: the consumer's last view of a shared-memory region is gone (the sender may reuse it).
- ``rejected`` (collector -> sender): ``key``, ``reason``; the sample will not be delivered.

Limits: a header frame is at most 64 KiB; a collector refuses payloads above its
``max_message_bytes`` and sets ZMQ's MAXMSGSIZE so oversized frames never reach memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Union

import msgspec
import numpy as np
import torch
import xxhash

from routing_replay.capture.layout import storage_dtype

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_KEY_BYTES = 1024
_MAX_EXPERTS = 32768
DTYPES = {"uint8": torch.uint8, "int16": torch.int16}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Integer fields are bounded at decoding, so no claim read off the wire (a count, an offset, a
# nonce) can be negative or overflow a 64-bit conversion later.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Hash64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack itself bounds it to 2**64 - 1


class WireFormatError(ValueError):
    """A message does not follow the wire format; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class RoutingRecord(msgspec.Struct, tag="routing", tag_field="type", forbid_unknown_fields=True):
    """One sample's routing, described once (the table above). Make it with ``of``."""

    key: str
    weight_version: str
    num_layers: Count
    layer_start: Count
    layer_stop: Count
    top_k: Count
    num_experts: Count
    dtype: str
    rows: Count
    start: Count
    num_tokens: Count
    token_hash: Hash64
    payload_bytes: Count
    mask_bytes: Count
    missing: Count
    checksum: Hash64
    version: int = FORMAT_VERSION
    shm: Union[str, None] = None
    """Set by the sender on the copy it transmits through shared memory; None on a made record."""
    shm_offset: Count = 0

    @classmethod
    def of(cls, key: str, routing: torch.Tensor, valid: torch.Tensor | None, *, num_experts: int,
           num_tokens: int, token_hash: int, start: int = 0, weight_version: str = "",
           num_layers: int | None = None, layer_start: int = 0) -> RoutingRecord:
        """The record of ``routing`` ``[rows, layers, top_k]`` (CPU, the storage dtype of
        ``num_experts``), the layers ``layer_start..`` of a model with ``num_layers`` (default: all
        of them). ``valid`` ``[rows, layers]`` bool marks recorded positions (None: all). This is
        the one pass over the bytes (the checksum); ``token_hash`` is the caller's, computed once.
        Raises ValueError naming the problem for a tensor that does not fit."""
        dtype = storage_dtype_name(num_experts)
        if not isinstance(routing, torch.Tensor) or routing.dim() != 3:
            raise ValueError(f"{key!r}: routing must be a [rows, layers, top_k] tensor")
        if routing.dtype != DTYPES[dtype] or routing.device.type != "cpu":
            raise ValueError(f"{key!r}: routing must be a CPU {dtype} tensor for {num_experts} experts, "
                             f"got {routing.dtype} on {routing.device}")
        rows, layers, top_k = routing.shape
        payload = _bytes_of(routing)
        missing, mask = 0, _EMPTY
        if valid is not None:
            if tuple(valid.shape) != (rows, layers) or valid.dtype != torch.bool or valid.device.type != "cpu":
                raise ValueError(f"{key!r}: valid must be a CPU [{rows}, {layers}] bool tensor, got "
                                 f"{valid.dtype} {tuple(valid.shape)} on {valid.device}")
            missing = int(valid.numel() - valid.count_nonzero())
            if missing:
                mask = _bytes_of(valid)
        return cls(
            key=key, weight_version=weight_version, num_layers=layers if num_layers is None else num_layers,
            layer_start=layer_start, layer_stop=layer_start + layers, top_k=top_k, num_experts=num_experts,
            dtype=dtype, rows=rows, start=start, num_tokens=num_tokens, token_hash=token_hash,
            payload_bytes=len(payload), mask_bytes=len(mask), missing=missing, checksum=checksum(payload, mask),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.rows, self.layers, self.top_k)

    def validate(self, max_payload_bytes: int) -> None:
        """Raises WireFormatError when the record is inconsistent or exceeds ``max_payload_bytes``."""
        if self.version != FORMAT_VERSION:
            raise WireFormatError("version", f"format version {self.version}, this collector reads {FORMAT_VERSION}")
        _check_key(self.key)
        if not _is_utf8(self.weight_version):
            raise WireFormatError("key", "key and weight_version must be valid UTF-8 text")
        if not 1 <= self.num_experts <= _MAX_EXPERTS or not 1 <= self.top_k <= self.num_experts:
            raise WireFormatError("layout", f"top_k {self.top_k} of num_experts {self.num_experts}")
        want = storage_dtype_name(self.num_experts)
        if self.dtype != want:
            raise WireFormatError("dtype", f"dtype {self.dtype!r} for {self.num_experts} experts, expected {want!r}")
        if not 0 <= self.layer_start < self.layer_stop <= self.num_layers:
            raise WireFormatError("layout", f"layers [{self.layer_start}, {self.layer_stop}) of {self.num_layers}")
        if self.rows < 0 or self.start < 0 or self.start + self.rows > self.num_tokens:
            raise WireFormatError("rows", f"rows {self.rows} from {self.start} exceed {self.num_tokens} tokens")
        itemsize = DTYPES[self.dtype].itemsize
        if self.payload_bytes != self.rows * self.layers * self.top_k * itemsize:
            raise WireFormatError("payload_bytes", f"{self.payload_bytes} does not match shape {self.shape}")
        if self.mask_bytes not in (0, self.rows * self.layers):
            raise WireFormatError("mask_bytes", f"{self.mask_bytes}, expected 0 or {self.rows * self.layers}")
        if (self.missing == 0) != (self.mask_bytes == 0) or self.missing > self.rows * self.layers:
            raise WireFormatError("missing", f"{self.missing} missing positions with a mask of {self.mask_bytes} bytes")
        if self.payload_bytes + self.mask_bytes > max_payload_bytes:
            raise WireFormatError(
                "oversized", f"{self.payload_bytes + self.mask_bytes} bytes exceed the limit of {max_payload_bytes}"
            )


MAX_ERROR_CHARS = 4096


class DeliveryFailed(msgspec.Struct, tag="failed", tag_field="type", forbid_unknown_fields=True):
    """The routing of ``key`` will not be delivered; ``error`` says why."""

    key: str
    error: str

    def validate(self, max_payload_bytes: int) -> None:
        """Raises WireFormatError for a key the collector would not hold or an overlong error text."""
        _check_key(self.key)
        if len(self.error) > MAX_ERROR_CHARS or not _is_utf8(self.error):
            raise WireFormatError("error", f"the error text must be UTF-8 of at most {MAX_ERROR_CHARS} characters")


class Ping(msgspec.Struct, tag="ping", tag_field="type", forbid_unknown_fields=True):
    nonce: Hash64
    shm_probe: Union[str, None] = None


class Pong(msgspec.Struct, tag="pong", tag_field="type", forbid_unknown_fields=True):
    nonce: Hash64
    epoch: str
    shm_ok: bool
    max_payload_bytes: int


class _KeyAck(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    key: str
    epoch: str


class Received(_KeyAck, tag="received"):
    """Validated and held by the collector."""


class Taken(_KeyAck, tag="taken"):
    """Handed to the consumer: stop resending."""


class Released(_KeyAck, tag="released"):
    """The consumer's last view of a shared-memory region is gone: the region may be reused."""


class Rejected(msgspec.Struct, tag="rejected", tag_field="type", forbid_unknown_fields=True):
    key: str
    reason: str


ToCollector = Union[RoutingRecord, DeliveryFailed, Ping]
ToSender = Union[Pong, Received, Taken, Released, Rejected]

_encoder = msgspec.msgpack.Encoder()
_collector_decoder = msgspec.msgpack.Decoder(ToCollector)
_sender_decoder = msgspec.msgpack.Decoder(ToSender)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_to_collector(frame: bytes | memoryview) -> RoutingRecord | DeliveryFailed | Ping:
    """The header frame of a message to a collector. Raises WireFormatError (reason ``header``) for
    anything else, whatever the bytes: no other exception escapes."""
    return _decode(_collector_decoder, frame, "header")


def decode_to_sender(frame: bytes | memoryview) -> Pong | Received | Taken | Released | Rejected:
    """An acknowledgement to a sender. Raises WireFormatError (reason ``control``) for anything
    else, whatever the bytes: no other exception escapes."""
    return _decode(_sender_decoder, frame, "control")


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes | memoryview, reason: str):
    try:
        if len(frame) > MAX_HEADER_BYTES:
            raise WireFormatError(reason, f"frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
        return decoder.decode(frame)
    except WireFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - foreign bytes: any failure, in any msgspec version, is a rejection
        raise WireFormatError(reason, f"{type(exc).__name__}: {exc}") from None


def _check_key(key: str) -> None:
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise WireFormatError("key", f"key must be 1..{MAX_KEY_BYTES} bytes")
    if not _is_utf8(key):
        raise WireFormatError("key", "key and weight_version must be valid UTF-8 text")


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: not encodable, so not sendable
        return False
    return True


def token_hash(token_ids: Sequence[int] | torch.Tensor | np.ndarray) -> int:
    """xxh3_64 of the token ids as little-endian int32: identifies the exact token sequence."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.cpu().numpy()
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(token_ids, dtype="<i4").tobytes())


_EMPTY = memoryview(b"")


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The C-order bytes of a CPU tensor (a copy only when it is not contiguous)."""
    return memoryview(tensor.contiguous().numpy()).cast("B")


def checksum(*buffers: memoryview | bytes) -> int:
    """xxh3_64 of the buffers in order (payload, then mask)."""
    h = xxhash.xxh3_64()
    for buffer in buffers:
        h.update(buffer)
    return h.intdigest()


def storage_dtype_name(num_experts: int) -> str:
    """The wire name of ``capture.layout.storage_dtype``: ``"uint8"`` or ``"int16"``."""
    return _DTYPE_NAMES[storage_dtype(num_experts)]
