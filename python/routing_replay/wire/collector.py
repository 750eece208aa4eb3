"""RoutingCollector: the trainer-side receiver, a thread inside the process that trains.

It binds a ZMQ ROUTER socket, receives routing messages without copying (frames, or a mapped
shared-memory segment), validates each message's ``RoutingRecord`` (its header) against its
payload, and holds the samples until the consumer asks for them with ``get``/``take``. The
tensors returned are views of the received memory. Every byte held counts against a budget
until the consumer's last view is freed; while the budget is spent the collector stops reading,
which pushes back on the senders.

Acknowledgements go back to the sender: ``received`` once validated, ``taken`` once handed to
the consumer, ``rejected`` (with a reason) for a sample that will never be delivered. Malformed,
truncated, oversized or unauthenticated messages are counted by reason (``stats()``), logged
(rate-limited), rejected back to their sender where the key is known, and dropped: whatever the
bytes, the collector keeps serving. If its thread dies anyway, every later call raises
``BackgroundThreadDied`` naming the cause at once.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
import traceback
import time
import warnings
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from routing_replay.wire import format as wf
from routing_replay.wire import shm
from routing_replay.wire.security import CurveServer, secure_server
from routing_replay.wire.worker import WorkerThread, log_rate_limited

log = logging.getLogger("routing_replay.wire")

# The received frames are read-only to Python but are private, writable libzmq/mmap memory.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class MissingRoutingKeys(TimeoutError):
    """Routing for these keys did not arrive in time."""

    def __init__(self, keys: Sequence[str], timeout: float) -> None:
        shown = ", ".join(repr(k) for k in list(keys)[:10])
        more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
        super().__init__(f"no routing for {len(keys)} key(s) after {timeout:.1f}s: {shown}{more}")
        self.keys = list(keys)


class RoutingDeliveryFailed(RuntimeError):
    """The producer reported that the routing of these keys will never come (``failures``: key ->
    its error): raised at once by ``take``, never left to run into the timeout."""

    def __init__(self, failures: Mapping[str, str]) -> None:
        shown = "; ".join(f"{key!r}: {error}" for key, error in list(failures.items())[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"the routing of {len(failures)} key(s) will not be delivered: {shown}{more}")
        self.failures = dict(failures)

    def __reduce__(self):  # rebuilt from its argument when Ray carries it to the driver
        return type(self), (self.failures,)


class TokenMismatchError(ValueError):
    """Routing was recorded for other token ids than the consumer's (re-tokenised or trimmed text)."""


@dataclass(frozen=True)
class CollectorConfig:
    bind: str = "tcp://127.0.0.1:*"
    """ZMQ endpoint to bind; loopback by default. A routable address needs ``curve``."""
    budget_bytes: int = 4 << 30
    """Bytes of routing held at once (received and not yet freed by the consumer). Reading pauses
    while it is spent; a single sample larger than it is rejected."""
    max_message_bytes: int = 1 << 30
    """Largest payload accepted; larger ones are rejected (and ZMQ refuses frames far beyond it)."""
    remember_taken: int = 100_000
    """Keys remembered after they are taken, so a resent duplicate is acknowledged, not redelivered."""
    curve: CurveServer | None = None
    """CURVE keys and allowed senders (see routing_replay.wire.security)."""
    linger_ms: int = 1000
    """How long close() waits to flush pending acknowledgements."""
    verify_checksum: bool = True
    """Check each payload against the record's xxh3 checksum: one pass over bytes just received,
    still in cache (~75 us per 1.5 MB on the 2-core benchmark VM, ~5% of the socket path).
    Turning it off trusts TCP's own checksums and the shared memory."""
    reuse_freed_memory: bool = True
    """Ask glibc's malloc (process-wide) to keep freed blocks below 32 MiB for reuse instead of
    returning them to the kernel (see ``keep_freed_memory``). libzmq allocates every received
    message; without this each batch lands in fresh pages, and their faults cost more than the
    copy itself. The process keeps its peak heap (the budget bounds routing's share of it)."""


@dataclass(frozen=True)
class RoutingSample:
    """One sample's routing as received: views of the received memory, not copies."""

    record: wf.RoutingRecord
    """The record made where the routing was recorded, as sent (``shm`` fields set by the sender)."""
    routing: torch.Tensor
    """``[rows, layers, top_k]`` expert ids (uint8 or int16)."""
    valid: torch.Tensor | None
    """``[rows, layers]`` bool, False where a (row, layer) was not recorded; None when complete."""
    source: memoryview
    """The received memory ``routing`` views: a ZMQ frame's buffer, or a mapped shared segment."""

    def check_tokens(self, token_ids: Sequence[int] | torch.Tensor) -> None:
        """Raises TokenMismatchError unless the routing was recorded for exactly these tokens."""
        n = len(token_ids)
        if n != self.record.num_tokens or wf.token_hash(token_ids) != self.record.token_hash:
            raise TokenMismatchError(
                f"routing for {self.record.key!r} was recorded for {self.record.num_tokens} other tokens "
                f"than the {n} given (token-id hash differs): re-tokenised or trimmed text?"
            )


@dataclass
class CollectorStats:
    """Counts since start. Every message read is exactly one of: received, failures, duplicates, pings or
    rejected (by reason); ``messages`` is their sum. ``taken`` and ``rejected["token_mismatch"]``
    count what the consumer did with received samples."""

    messages: int = 0
    received: int = 0
    failures: int = 0
    """``failed`` notices received: keys whose routing the producer reported it will not send."""
    duplicates: int = 0
    pings: int = 0
    taken: int = 0
    shm_received: int = 0
    held_bytes: int = 0
    held_samples: int = 0
    rejected: Counter = field(default_factory=Counter)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
_INT_MAX = 2**31 - 1


def keep_freed_memory(trim_threshold: int) -> bool:
    """Makes glibc's malloc serve blocks below 32 MiB from its heaps and keep up to
    ``trim_threshold`` freed bytes mapped (process-wide ``mallopt``; it also stops glibc's own
    adjustment of both thresholds). Why: a received message is a fresh libzmq allocation; by
    default glibc returns a freed batch of them to the kernel, so the next batch is written into
    new pages whose faults cost ~3.5 us per 4 KiB on the 2-core benchmark VM (90 ms of CPU per
    100 MB, against ~15 ms for the copy). With it, a batch of 64 x 1.5 MB faults ~8,450 pages
    instead of ~24,600 (glibc still unmaps the last heap of an arena). False where the C library
    has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, min(max(trim_threshold, _MMAP_THRESHOLD_MAX), _INT_MAX)))


class _Budget:
    """Bytes held by received samples, released by finalizers when the consumer frees the views."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> None:
        with self._lock:
            self.held += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes

    def spent(self) -> bool:
        return self.held >= self.limit


class RoutingCollector:
    """Receives routing for one trainer rank. ``address`` is the endpoint senders connect to."""

    def __init__(self, config: CollectorConfig | None = None) -> None:
        self.config = config or CollectorConfig()
        self.epoch = secrets.token_hex(8)
        self._max_payload_bytes = min(self.config.max_message_bytes, self.config.budget_bytes)
        if self.config.reuse_freed_memory and not keep_freed_memory(self.config.budget_bytes):
            log.info("routing collector: the C library is not glibc; received messages land in fresh pages")
        self._context = zmq.Context()
        self._stats = CollectorStats()
        self._budget = _Budget(self.config.budget_bytes)
        self._arenas = shm.ArenaViews()
        self._ready: dict[str, RoutingSample] = {}
        self._failed: dict[str, str] = {}  # key -> the producer's error, until a take or discard
        self._taken: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()
        self._outbox: list[tuple[bytes, bytes]] = []  # (identity, ack) queued by consumer threads
        self._owner: dict[str, bytes] = {}  # key -> sender identity, for acknowledgements
        self._auth = None
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.linger = self.config.linger_ms
        self._socket.maxmsgsize = self.config.max_message_bytes + wf.MAX_HEADER_BYTES
        # A ROUTER drops what exceeds its send high-water mark, silently: a burst of acknowledgements
        # (a take of over 1000 samples) would lose ``taken`` acks, and their senders would hold those
        # bytes until give_up_after_s. Acknowledgements are a few dozen bytes each: never drop them.
        self._socket.sndhwm = 0
        if self.config.curve is not None:
            self._auth = secure_server(self._context, self._socket, self.config.curve, self._count_unauthenticated)
        self._socket.bind(self.config.bind)
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_pull = self._context.socket(zmq.PULL)
        self._wake_pull.bind(f"inproc://wake-{self.epoch}")
        self._wake_push = self._context.socket(zmq.PUSH)
        self._wake_push.connect(f"inproc://wake-{self.epoch}")
        self._wake_lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = WorkerThread(f"routing-collector-{self.epoch}", self._run, self._wake_waiters)
        self._worker.start()

    # ---- consumer API -------------------------------------------------------------------------

    def get(self, key: str, timeout: float, token_ids: Sequence[int] | None = None) -> RoutingSample:
        """The routing of ``key``, waiting up to ``timeout`` seconds (MissingRoutingKeys after)."""
        tokens = None if token_ids is None else {key: token_ids}
        return self.take([key], timeout, tokens)[key]

    def take(self, keys: Iterable[str], timeout: float,
             token_ids: Mapping[str, Sequence[int]] | None = None) -> dict[str, RoutingSample]:
        """The routing of every key, waiting up to ``timeout`` seconds for all of them.

        Raises MissingRoutingKeys naming the keys still missing (the present ones stay held),
        RoutingDeliveryFailed at once when the producer reported that some key's routing will not
        come (those keys are consumed; the others stay held), or TokenMismatchError when
        ``token_ids`` is given and a sample was recorded for other tokens (those samples are refused
        and reported back to the sender).
        """
        keys = list(keys)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._worker.check()
                failed = {k: self._failed.pop(k) for k in keys if k in self._failed}
                if failed:
                    break
                missing = [k for k in keys if k not in self._ready]
                if not missing:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MissingRoutingKeys(missing, timeout)
                self._cond.wait(remaining)
            if failed:
                for key in failed:
                    self._remember_taken(key)
            else:
                samples = {k: self._ready.pop(k) for k in keys}
                mismatched = self._check_tokens(samples, token_ids)
                for key in keys:
                    self._remember_taken(key)
        if failed:
            for key in failed:
                self._queue_ack(key, wf.Taken(key, self.epoch))
            raise RoutingDeliveryFailed(failed)
        for key in keys:
            ack = wf.Rejected(key, "token_mismatch") if key in mismatched else wf.Taken(key, self.epoch)
            self._queue_ack(key, ack)
        if mismatched:
            raise TokenMismatchError("; ".join(mismatched.values()))
        return samples

    def discard(self, keys: Iterable[str]) -> int:
        """Drops the routing of ``keys`` (held now or arriving later: e.g. rollouts abandoned when
        an engine crashed and their requests were resent under new keys). Returns how many were held."""
        keys = list(keys)
        self._worker.check()
        with self._cond:
            dropped = [self._ready.pop(k) for k in keys if k in self._ready]
            dropped += [self._failed.pop(k) for k in keys if k in self._failed]
            for key in keys:
                self._remember_taken(key)
        for key in keys:
            self._queue_ack(key, wf.Taken(key, self.epoch))
        return len(dropped)

    def stats(self) -> CollectorStats:
        self._worker.check()
        with self._cond:
            return CollectorStats(
                messages=self._stats.messages, received=self._stats.received, failures=self._stats.failures,
                duplicates=self._stats.duplicates,
                pings=self._stats.pings, taken=self._stats.taken, shm_received=self._stats.shm_received,
                held_bytes=self._budget.held, held_samples=len(self._ready), rejected=Counter(self._stats.rejected),
            )

    def held_keys(self) -> list[str]:
        """Keys received and not yet taken or discarded, in arrival order."""
        self._worker.check()
        with self._cond:
            return list(self._ready)

    def check(self) -> None:
        """Raises BackgroundThreadDied if the collector's thread has died (a health check)."""
        self._worker.check()

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._worker.join()
        for sock in (self._socket, self._wake_pull, self._wake_push):
            sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def __enter__(self) -> RoutingCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- collector thread ---------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_pull, zmq.POLLIN)
        reading = False
        while not self._stop.is_set():
            if reading != (not self._budget.spent()):  # back-pressure: stop reading while over budget
                reading = not reading
                if reading:
                    poller.register(self._socket, zmq.POLLIN)
                else:
                    poller.unregister(self._socket)
            events = dict(poller.poll(50))
            if self._wake_pull in events:
                while self._wake_pull.poll(0):
                    self._wake_pull.recv()
            self._flush_outbox()
            if reading and self._socket in events:
                for _ in range(64):  # bounded burst, then re-check budget and outbox
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
                    if self._budget.spent():
                        break
        self._flush_outbox()

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """One message, whatever its bytes: accepted, answered, or rejected by reason."""
        identity, body = frames[0].bytes, frames[1:]
        key = None
        with self._cond:
            self._stats.messages += 1
        try:
            if not body:
                raise wf.WireFormatError("truncated", "message without a header frame")
            message = wf.decode_to_collector(body[0].buffer)
            if isinstance(message, wf.Ping):
                self._answer_ping(identity, message, body[1:])
                return
            key = message.key
            self._accept(identity, message, body[1:])
        except wf.WireFormatError as exc:
            self._reject(identity, key, exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug on some input must cost that message, not the collector
            detail = "".join(traceback.format_exception_only(exc)).strip()
            self._reject(identity, key, "internal_error", f"{detail}\n{traceback.format_exc()}")

    def _answer_ping(self, identity: bytes, ping: wf.Ping, extra: list[zmq.Frame]) -> None:
        if extra:
            raise wf.WireFormatError("frames", f"{len(extra)} frames after a ping")
        with self._cond:
            self._stats.pings += 1
        self._send(identity, wf.Pong(ping.nonce, self.epoch, self._probe_ok(ping), self._max_payload_bytes))

    def _accept(self, identity: bytes, message: wf.RoutingRecord | wf.DeliveryFailed, frames: list[zmq.Frame]) -> None:
        """Holds a sample (or a failure notice) for the consumer, once per key."""
        message.validate(self._max_payload_bytes)
        key = message.key
        with self._cond:
            duplicate = key in self._ready or key in self._failed or key in self._taken
            was_taken = key in self._taken
        if duplicate:  # at-least-once delivery: acknowledge again, deliver once
            self._stats.duplicates += 1
            self._send(identity, wf.Taken(key, self.epoch) if was_taken else wf.Received(key, self.epoch))
            return
        if isinstance(message, wf.DeliveryFailed):
            if frames:
                raise wf.WireFormatError("frames", f"{len(frames)} frames after a failure notice")
            log.error("routing collector %s: the producer reports that %r will not be delivered: %s",
                      self.address, key, message.error)
        else:
            sample = self._build_sample(identity, message, frames)
        with self._cond:
            if isinstance(message, wf.DeliveryFailed):
                self._failed[key] = message.error
                self._stats.failures += 1
            else:
                self._ready[key] = sample
                self._stats.received += 1
            self._owner[key] = identity
            self._cond.notify_all()
        self._send(identity, wf.Received(key, self.epoch))

    def _build_sample(self, identity: bytes, record: wf.RoutingRecord, frames: list[zmq.Frame]) -> RoutingSample:
        payload_len, mask_len = record.payload_bytes, record.mask_bytes
        if record.shm is not None:
            if frames:
                raise wf.WireFormatError("frames", f"{len(frames)} payload frames beside a shared-memory region")
            try:
                region = self._arenas.view(record.shm, record.shm_offset, payload_len + mask_len)
            except (OSError, ValueError) as exc:
                raise wf.WireFormatError("shm", f"cannot map {record.shm}: {exc}") from None
            payload, mask = region[:payload_len], region[payload_len:]
        else:
            want = 2 if mask_len else 1
            if len(frames) != want:
                raise wf.WireFormatError("frames", f"{len(frames)} payload frames, the record announces {want}")
            payload, mask = frames[0].buffer, frames[1].buffer if mask_len else memoryview(b"")
            if len(payload) != payload_len or len(mask) != mask_len:
                raise wf.WireFormatError(
                    "truncated",
                    f"payload {len(payload)} + mask {len(mask)} bytes, the record says {payload_len} + {mask_len}"
                )
        if self.config.verify_checksum and wf.checksum(payload, mask) != record.checksum:
            raise wf.WireFormatError("checksum", f"payload of {record.key!r} does not match its checksum")
        if record.shm is not None:
            # One owner for the region: the sender may reuse it once payload and mask views are gone.
            self._stats.shm_received += 1
            base = self._own(region, wf.encode(wf.Released(record.key, self.epoch)), identity)
            payload_array, mask_array = base[:payload_len], base[payload_len:]
        else:
            payload_array = self._own(payload)
            mask_array = self._own(mask) if mask_len else None
        ids = payload_array.view(np.uint8 if record.dtype == "uint8" else np.int16)
        routing = torch.from_numpy(ids.reshape(record.shape))
        valid = None if not mask_len else \
            torch.from_numpy(mask_array.view(np.bool_).reshape(record.rows, record.layers))
        return RoutingSample(record, routing, valid, payload)

    def _own(self, buffer: memoryview, release_ack: bytes | None = None, identity: bytes = b"") -> np.ndarray:
        """A uint8 array over received memory, counted against the budget until its last view is
        freed (torch tensors share the array's storage and keep it alive); then, for a shared
        region, the sender is told it may reuse it."""
        array = np.frombuffer(buffer, dtype=np.uint8)
        self._budget.acquire(array.nbytes)
        weakref.finalize(array, self._released, array.nbytes, identity, release_ack)
        return array

    def _released(self, nbytes: int, identity: bytes, release_ack: bytes | None) -> None:
        self._budget.release(nbytes)
        if release_ack is not None:
            with self._cond:
                self._outbox.append((identity, release_ack))
        if not self._stop.is_set():
            self._wake()  # reading may resume; the release ack goes out

    def _check_tokens(self, samples: dict[str, RoutingSample],
                      token_ids: Mapping[str, Sequence[int]] | None) -> dict[str, str]:
        mismatched: dict[str, str] = {}
        for key, sample in samples.items():
            if token_ids is None or key not in token_ids:
                continue
            try:
                sample.check_tokens(token_ids[key])
            except TokenMismatchError as exc:
                mismatched[key] = str(exc)
        self._stats.taken += len(samples) - len(mismatched)
        if mismatched:
            self._stats.rejected["token_mismatch"] += len(mismatched)
        return mismatched

    def _remember_taken(self, key: str) -> None:
        self._taken[key] = None
        while len(self._taken) > self.config.remember_taken:
            self._taken.popitem(last=False)

    def _probe_ok(self, ping: wf.Ping) -> bool:
        return ping.shm_probe is not None and shm.read_probe(ping.shm_probe) == ping.nonce.to_bytes(8, "little")

    def _reject(self, identity: bytes, key: str | None, reason: str, detail: str) -> None:
        with self._cond:
            self._stats.rejected[reason] += 1
            count = self._stats.rejected[reason]
        log_rate_limited(log, count, "routing collector %s rejected a message (%s): %s", self.address, reason, detail)
        if key is not None:
            self._send(identity, wf.Rejected(key, reason))

    def _count_unauthenticated(self) -> None:
        with self._cond:
            self._stats.rejected["unauthenticated"] += 1

    def _send(self, identity: bytes, message) -> None:
        try:
            self._socket.send_multipart([identity, wf.encode(message)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the sender is gone or stalled: it resends, and acks are idempotent

    def _queue_ack(self, key: str, message) -> None:
        with self._cond:
            identity = self._owner.pop(key, None)
            if identity is not None:
                self._outbox.append((identity, wf.encode(message)))
        self._wake()

    def _flush_outbox(self) -> None:
        with self._cond:
            outbox, self._outbox = self._outbox, []
        for identity, ack in outbox:
            try:
                self._socket.send_multipart([identity, ack], zmq.NOBLOCK)
            except zmq.Again:
                pass

    def _wake_waiters(self) -> None:
        """Called by a dying thread: consumers blocked in ``take`` wake up and raise."""
        with self._cond:
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._wake_lock:
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                pass
