"""RoutingSender: ships routing to the collector of the rank that trains on each sample.

``send`` takes the sample's ``RoutingRecord`` (made once by the producer, checksum included),
checks the tensors against it and enqueues; a background thread owns the sockets (one DEALER per
collector) and sends the record unchanged as the header with the payload without copying
(``copy=False``), or, when the collector shares this host's /dev/shm, writes the payload into a
shared region and sends only the header. Queued bytes are bounded: everything not yet taken by
the consumer counts, and ``send`` blocks (or raises SenderFull with ``block=False``) while the
bound is reached.

Delivery is acknowledged by the application, not by the socket: a message is kept until its
collector reports it ``taken`` by the consumer. It is resent when no ``received`` comes within
``ack_timeout_s``, and everything not yet taken is resent when a collector answers a heartbeat
with a new epoch (it restarted). Collectors de-duplicate by key, so delivery is at-least-once on
the wire and exactly-once to the consumer. A sample that is rejected, or not taken within
``give_up_after_s``, fails its Delivery futures and is logged: nothing is dropped silently.
``send_failure`` tells a collector that a key's routing will never come (its ``take`` then raises
at once): the notice travels, is acknowledged and resent like routing, and holds no bytes.

Acknowledgements are input too: an ack frame that does not decode, or arrives in a multipart
message, is counted by reason (``stats().acks_rejected``) and logged (rate-limited); one that
decodes but matches nothing pending is counted as ignored. If the thread dies anyway, every
pending delivery fails and every later call raises ``BackgroundThreadDied`` naming the cause.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch
import zmq

from routing_replay.wire import format as wf
from routing_replay.wire import shm
from routing_replay.wire.security import CurveClient, secure_client
from routing_replay.wire.worker import BackgroundThreadDied, WorkerThread, log_rate_limited

log = logging.getLogger("routing_replay.wire")


class SenderFull(RuntimeError):
    """The sender's byte bound is reached (samples not yet taken by their consumers)."""


class DeliveryError(RuntimeError):
    """A sample will not reach its consumer; the message says why."""


_ENDPOINT = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]{0,252}):(?P<port>[0-9]{1,5})"
                       r"|ipc://(?P<path>[^\x00]+)")
_MAX_IPC_PATH_BYTES = 107  # sun_path holds 108 bytes with the terminating NUL


def check_endpoint(address: object) -> str:
    """``address`` if it is a ZMQ endpoint a sender can connect to (``tcp://HOST:PORT`` with PORT
    1..65535, or ``ipc://PATH``); ValueError naming the problem otherwise."""
    if not isinstance(address, str):
        raise ValueError(f"a collector address must be a string like tcp://host:port, got {type(address).__name__}")
    match = _ENDPOINT.fullmatch(address)
    if match is None or (match["port"] is not None and not 1 <= int(match["port"]) <= 65535) or \
            (match["path"] is not None and len(match["path"].encode("utf-8", "surrogatepass")) > _MAX_IPC_PATH_BYTES):
        raise ValueError(f"{address[:200]!r} is not a collector address (tcp://HOST:PORT with PORT 1..65535, "
                         f"or ipc://PATH of at most {_MAX_IPC_PATH_BYTES} bytes)")
    return address


@dataclass
class SenderStats:
    """Counts since start. Every acknowledgement frame read is exactly one of: ``acks`` (applied),
    ``acks_ignored`` (valid, but for nothing pending: duplicates, stale pongs) or
    ``acks_rejected`` (by reason)."""

    transmitted: int = 0
    """Routing messages handed to a socket, resends included."""
    taken: int = 0
    failed: int = 0
    acks: int = 0
    acks_ignored: int = 0
    acks_rejected: collections.Counter = field(default_factory=collections.Counter)
    pending: int = 0
    queued_bytes: int = 0


@dataclass(frozen=True)
class SenderConfig:
    max_queued_bytes: int = 2 << 30
    """Bytes of routing held until taken by the consumer; ``send`` waits while it is reached."""
    ack_timeout_s: float = 10.0
    """Resend a message whose collector has not acknowledged receipt within this time."""
    give_up_after_s: float = 3600.0
    """Fail a delivery not taken by the consumer within this time."""
    heartbeat_s: float = 1.0
    """Ping interval per collector (handshake, shared-memory probe, restart detection)."""
    shared_memory: bool = True
    """Use the same-host fast path where the collector can read this host's /dev/shm."""
    shm_min_bytes: int = 64 << 10
    """Smaller payloads travel as frames: a region costs more than it saves."""
    shm_arena_bytes: int = 1 << 30
    """Size of this sender's /dev/shm arena (sparse: pages are used only as regions are written;
    at most half the free space of /dev/shm). When it is full, messages travel as frames."""
    curve: CurveClient | None = None
    """CURVE client keys (see routing_replay.wire.security)."""
    send_hwm: int = 1000
    """ZMQ high-water mark (messages) per collector socket."""


@dataclass
class Delivery:
    """Futures of one sample's delivery to one collector."""

    key: str
    destination: str
    received: Future = field(default_factory=Future)
    taken: Future = field(default_factory=Future)


@dataclass
class _Outgoing:
    record: wf.RoutingRecord | wf.DeliveryFailed
    payload: np.ndarray | None
    """None for a failure notice: the header travels alone."""
    mask: np.ndarray | None
    delivery: Delivery
    nbytes: int
    created: float
    sent_at: float | None = None
    received_epoch: str | None = None


@dataclass
class _Destination:
    address: str
    socket: zmq.Socket
    epoch: str | None = None
    shm_ok: bool = False
    max_payload_bytes: int | None = None
    """The collector's limit (from its pong): larger routing would be dropped below it by ZMQ."""
    next_ping: float = 0.0
    nonce: int = 0
    probe: str | None = None
    created: float = field(default_factory=time.monotonic)
    last_pong: float | None = None


class RoutingSender:
    def __init__(self, config: SenderConfig | None = None) -> None:
        self.config = config or SenderConfig()
        self._context = zmq.Context()
        self._cond = threading.Condition()
        self._incoming: collections.deque[_Outgoing] = collections.deque()
        self._connect_requests: collections.deque[str] = collections.deque()
        self._queued_bytes = 0
        self._pending: dict[tuple[str, str], _Outgoing] = {}  # (destination, key) -> message
        self._destinations: dict[str, _Destination] = {}
        self._arena: shm.Arena | None = None
        self._arena_failed = False
        self._regions: dict[tuple[str, str], int] = {}  # (destination, key) -> arena offset, until released
        self._nonces = itertools.count(1)
        self._next_scan = 0.0
        self._wake_address = f"inproc://sender-wake-{id(self)}"
        self._wake_pull = self._context.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_address)
        self._wake_push = self._context.socket(zmq.PUSH)
        self._wake_push.connect(self._wake_address)
        self._stats = SenderStats()
        self._stop = threading.Event()
        self._worker = WorkerThread(f"routing-sender-{id(self):x}", self._run, self._fail_everything)
        self._worker.start()

    # ---- producer API -------------------------------------------------------------------------

    def send(self, record: wf.RoutingRecord, routing: torch.Tensor, destination: str, *,
             valid: torch.Tensor | None = None, layers: tuple[int, int] | None = None,
             block: bool = True, timeout: float | None = None) -> Delivery:
        """Queues ``routing`` ``[rows, layers, top_k]``, described by ``record``
        (``RoutingRecord.of`` of the same tensors), for the collector at ``destination``; returns at
        once unless the byte bound is reached. The record travels unchanged as the message's header:
        its checksum and token hash are not computed again here.

        ``valid`` is the ``[rows, layers]`` mask the record was made from; it travels only when the
        record announces a mask (``mask_bytes > 0``). ``layers=(a, b)`` sends only the model's
        layers ``a..b-1`` (a pipeline stage's slice): that slice gets a record of its own, with its
        own sizes and checksum (one copy of the slice and one pass over it).
        """
        self._worker.check()
        outgoing = self._prepare(record, routing, valid, layers)
        outgoing.delivery.destination = check_endpoint(destination)
        return self._enqueue(outgoing, block, timeout)

    def send_failure(self, key: str, error: str, destination: str) -> Delivery:
        """Tells the collector at ``destination`` that the routing of ``key`` will not come, and
        why (``error`` is cut to the format's limit): its ``take`` of ``key`` raises at once. Never
        waits for the byte bound: a notice holds no bytes."""
        self._worker.check()
        notice = wf.DeliveryFailed(key, error[: wf.MAX_ERROR_CHARS])
        notice.validate(max_payload_bytes=0)
        return self._enqueue(_Outgoing(notice, None, None, Delivery(key, check_endpoint(destination)), 0,
                                       time.monotonic()), block=False, timeout=None)

    def _enqueue(self, outgoing: _Outgoing, block: bool, timeout: float | None) -> Delivery:
        record = outgoing.record
        with self._cond:
            if outgoing.nbytes > self.config.max_queued_bytes:
                raise SenderFull(f"{record.key!r}: {outgoing.nbytes} bytes exceed max_queued_bytes")
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._queued_bytes + outgoing.nbytes > self.config.max_queued_bytes:
                self._worker.check()
                remaining = None if deadline is None else deadline - time.monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    raise SenderFull(
                        f"{record.key!r}: {self._queued_bytes} bytes are awaiting their consumers "
                        f"(max_queued_bytes={self.config.max_queued_bytes})"
                    )
                self._cond.wait(remaining)
            self._worker.check()  # it may have died while we waited: nothing would ever send this
            self._queued_bytes += outgoing.nbytes
            self._incoming.append(outgoing)
        self._wake()
        return outgoing.delivery

    def connect(self, destination: str) -> None:
        """Starts the handshake with a collector ahead of the first send, so ``reachable`` knows."""
        self._worker.check()
        self._connect_requests.append(check_endpoint(destination))
        self._wake()

    def reachable(self, destination: str) -> bool | None:
        """True if the collector answered a heartbeat recently, False if it has not answered for
        three heartbeats, None while that is not yet known (never contacted, or just now)."""
        self._worker.check()
        dest = self._destinations.get(destination)
        if dest is None:
            return None
        now, window = time.monotonic(), 3 * self.config.heartbeat_s
        if dest.last_pong is not None and now - dest.last_pong <= window:
            return True
        if now - max(dest.created, dest.last_pong or 0.0) > window:
            return False
        return None

    def never_answered(self, destination: str) -> bool:
        """True when the collector has not answered a single heartbeat in the three heartbeats since
        first contact: a wrong or dead address. One that answered before and is only slow now (a busy
        trainer) is not: what is sent to it is delivered once it reads again."""
        self._worker.check()
        dest = self._destinations.get(destination)
        return dest is not None and dest.last_pong is None and \
            time.monotonic() - dest.created > 3 * self.config.heartbeat_s

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def stats(self) -> SenderStats:
        self._worker.check()
        with self._cond:
            stats = SenderStats(**{name: getattr(self._stats, name) for name in SenderStats.__dataclass_fields__})
            stats.acks_rejected = collections.Counter(self._stats.acks_rejected)
            stats.pending, stats.queued_bytes = len(self._pending), self._queued_bytes
        return stats

    def check(self) -> None:
        """Raises BackgroundThreadDied if the sender's thread has died (a health check)."""
        self._worker.check()

    def flush(self, timeout: float) -> None:
        """Waits until every sample sent so far is taken (or failed); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued_bytes:
                self._worker.check()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self._queued_bytes} bytes of routing still awaiting their consumers")
                self._cond.wait(remaining)
        self._worker.check()  # a death fails (and so un-queues) everything: that is no successful flush

    def close(self) -> None:
        """Stops the thread; deliveries not yet taken fail with DeliveryError."""
        self._stop.set()
        self._wake()
        self._worker.join()
        for message in list(self._pending.values()) + list(self._incoming):
            self._finish(message, DeliveryError(f"{message.record.key!r}: sender closed before it was taken"))
        for dest in self._destinations.values():
            if dest.probe:
                shm.unlink(dest.probe)
            dest.socket.close(linger=0)
        if self._arena is not None:
            self._arena.close()
        self._wake_pull.close()
        self._wake_push.close()
        self._context.term()

    def __enter__(self) -> RoutingSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- preparation (producer thread) --------------------------------------------------------

    def _prepare(self, record: wf.RoutingRecord, routing: torch.Tensor, valid: torch.Tensor | None,
                 layers: tuple[int, int] | None) -> _Outgoing:
        if not isinstance(record, wf.RoutingRecord):
            raise TypeError(f"send takes a RoutingRecord (RoutingRecord.of), got {type(record).__name__}")
        key = record.key
        if record.shm is not None or record.shm_offset:
            raise ValueError(f"{key!r}: shm and shm_offset are the sender's to set; the record has {record.shm!r}")
        if not isinstance(routing, torch.Tensor) or tuple(routing.shape) != (record.rows, record.layers, record.top_k) \
                or routing.dtype != record.torch_dtype or routing.device.type != "cpu":
            raise ValueError(f"{key!r}: routing must be a CPU {record.dtype} tensor of the record's shape "
                             f"{record.shape}, got {getattr(routing, 'dtype', type(routing).__name__)} "
                             f"{tuple(getattr(routing, 'shape', ()))}")
        if record.mask_bytes and (valid is None or tuple(valid.shape) != (record.rows, record.layers)
                                  or valid.dtype != torch.bool or valid.device.type != "cpu"):
            raise ValueError(f"{key!r}: the record announces {record.missing} missing positions: valid must be "
                             f"its CPU [{record.rows}, {record.layers}] bool mask")
        if layers is not None and tuple(layers) != (record.layer_start, record.layer_stop):
            record, routing, valid = _slice(record, routing, valid, layers)
        payload = routing.contiguous().numpy()
        mask = valid.contiguous().numpy() if record.mask_bytes else None
        record.validate(max_payload_bytes=self.config.max_queued_bytes)
        if payload.nbytes != record.payload_bytes or (mask is not None and mask.nbytes != record.mask_bytes):
            raise ValueError(f"{key!r}: {payload.nbytes} + {0 if mask is None else mask.nbytes} bytes, the record "
                             f"says {record.payload_bytes} + {record.mask_bytes}")
        nbytes = record.payload_bytes + record.mask_bytes
        return _Outgoing(record, payload, mask, Delivery(key, ""), nbytes, time.monotonic())

    # ---- sender thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_pull, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(self._poll_timeout_ms()))
            if self._wake_pull in events:
                while self._wake_pull.poll(0):
                    self._wake_pull.recv()
            while self._connect_requests:
                address = self._connect_requests.popleft()
                try:
                    self._destination(address, poller)
                except zmq.ZMQError as exc:
                    log.error("routing sender cannot connect to %s: %s", address, exc)
            self._admit_incoming(poller)
            for dest in self._destinations.values():
                if dest.socket in events:
                    self._read_acks(dest)
            self._tick()

    def _poll_timeout_ms(self) -> int:
        return int(1000 * min(self.config.heartbeat_s, self.config.ack_timeout_s, 0.25))

    def _admit_incoming(self, poller: zmq.Poller) -> None:
        while True:
            with self._cond:
                if not self._incoming:
                    return
                message = self._incoming.popleft()
            try:
                dest = self._destination(message.delivery.destination, poller)
            except zmq.ZMQError as exc:  # checked syntax, yet refused (e.g. a host name that does not resolve)
                self._finish(message, DeliveryError(f"{message.record.key!r}: cannot connect to "
                                                    f"{message.delivery.destination}: {exc}"))
                continue
            slot = (dest.address, message.record.key)
            if slot in self._pending:  # the same key again: the newer routing replaces the older
                self._finish(self._pending.pop(slot),
                             DeliveryError(f"{message.record.key!r}: replaced by a newer send"))
                self._regions.pop(slot, None)  # the collector may still hold it: never reused
            self._pending[slot] = message
            if dest.epoch is not None:
                self._transmit(dest, message)

    def _destination(self, address: str, poller: zmq.Poller) -> _Destination:
        dest = self._destinations.get(address)
        if dest is None:
            sock = self._context.socket(zmq.DEALER)
            sock.linger = 0
            sock.sndhwm = self.config.send_hwm
            if self.config.curve is not None:
                secure_client(sock, self.config.curve)
            try:
                sock.connect(address)
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            poller.register(sock, zmq.POLLIN)
            dest = self._destinations[address] = _Destination(address, sock)
        return dest

    def _transmit(self, dest: _Destination, message: _Outgoing) -> None:
        record = message.record
        if dest.max_payload_bytes is not None and message.nbytes > dest.max_payload_bytes:
            self._refuse_oversized(dest, message)
            return
        frames: list = [f for f in (message.payload, message.mask) if f is not None]
        slot = (dest.address, record.key)
        if frames and slot not in self._regions and self._use_shm(dest, message.nbytes):
            offset = self._arena.alloc(message.nbytes)
            if offset is not None:
                self._arena.write(offset, *(memoryview(f).cast("B") for f in frames))
                self._regions[slot] = offset
        if slot in self._regions:  # a resend reuses its region: the bytes are the same
            record, frames = msgspec.structs.replace(record, shm=self._arena.name, shm_offset=self._regions[slot]), []
        try:
            dest.socket.send_multipart([wf.encode(record), *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return  # high-water mark: retried on the next tick
        message.sent_at = time.monotonic()
        self._stats.transmitted += 1

    def _refuse_oversized(self, dest: _Destination, message: _Outgoing) -> None:
        """Fails a delivery the collector would refuse (``oversized``) or ZMQ would drop silently
        below it (a frame over its MAXMSGSIZE closes the connection), without sending it."""
        key, nbytes = message.record.key, message.nbytes
        log.error("routing for %r (%d bytes) exceeds the limit of collector %s (%d bytes); not sent",
                  key, nbytes, dest.address, dest.max_payload_bytes)
        self._free_region((dest.address, key))
        self._finish(self._pending.pop((dest.address, key)), DeliveryError(
            f"{key!r} refused for {dest.address}: oversized: {nbytes} bytes exceed the collector's limit of "
            f"{dest.max_payload_bytes} (CollectorConfig.max_message_bytes / budget_bytes)"))

    def _use_shm(self, dest: _Destination, nbytes: int) -> bool:
        if not (self.config.shared_memory and dest.shm_ok and nbytes >= self.config.shm_min_bytes):
            return False
        if self._arena is None and not self._arena_failed:
            size = min(self.config.shm_arena_bytes, shm.free_bytes() // 2)
            try:
                self._arena = shm.Arena(size) if size >= nbytes else None
            except OSError as exc:
                log.warning("no shared-memory arena (%s): routing travels over the socket", exc)
            self._arena_failed = self._arena is None
        return self._arena is not None

    def _read_acks(self, dest: _Destination) -> None:
        applied = ignored = 0
        while True:
            try:
                frames = dest.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if len(frames) != 1:
                    raise wf.WireFormatError("frames", f"an acknowledgement of {len(frames)} frames")
                if self._apply_ack(dest, wf.decode_to_sender(frames[0])):
                    applied += 1
                else:
                    ignored += 1
            except wf.WireFormatError as exc:
                self._reject_ack(dest, exc.reason, str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug on some input must cost that ack, not the sender
                self._reject_ack(dest, "internal_error", f"{exc!r}\n{traceback.format_exc()}")
        with self._cond:  # once per burst: the lock is contended by producers
            self._stats.acks += applied
            self._stats.acks_ignored += ignored

    def _reject_ack(self, dest: _Destination, reason: str, detail: str) -> None:
        with self._cond:
            self._stats.acks_rejected[reason] += 1
            count = self._stats.acks_rejected[reason]
        log_rate_limited(log, count, "routing sender ignored a bad acknowledgement from %s (%s): %s",
                         dest.address, reason, detail)

    def _apply_ack(self, dest: _Destination, ack) -> bool:
        """Acts on one decoded acknowledgement; False when it concerns nothing pending."""
        if isinstance(ack, wf.Pong):
            return self._on_pong(dest, ack)
        if isinstance(ack, wf.Released):
            return self._free_region((dest.address, ack.key))
        message = self._pending.get((dest.address, ack.key))
        if message is None:
            return False  # already finished: a duplicate acknowledgement
        if isinstance(ack, wf.Received):
            message.received_epoch = ack.epoch
            _resolve(message.delivery.received)
        elif isinstance(ack, wf.Taken):
            self._finish(self._pending.pop((dest.address, ack.key)), None)
        else:
            self._free_region((dest.address, ack.key))
            self._finish(self._pending.pop((dest.address, ack.key)),
                         DeliveryError(f"{ack.key!r} rejected by {dest.address}: {ack.reason}"))
        return True

    def _on_pong(self, dest: _Destination, pong: wf.Pong) -> bool:
        if pong.nonce != dest.nonce:
            return False  # answer to an older ping
        dest.last_pong = time.monotonic()
        restarted = dest.epoch is not None and pong.epoch != dest.epoch
        first = dest.epoch is None
        dest.epoch, dest.shm_ok, dest.max_payload_bytes = pong.epoch, pong.shm_ok, pong.max_payload_bytes
        if restarted:
            log.warning("routing collector %s restarted: resending what it had not handed over", dest.address)
        if first or restarted:
            for (address, _), message in list(self._pending.items()):
                if address == dest.address:
                    message.received_epoch = None
                    self._transmit(dest, message)
        return True

    def _tick(self) -> None:
        now = time.monotonic()
        for dest in self._destinations.values():
            if now >= dest.next_ping:
                self._ping(dest, now)
        # The scan for resends and give-ups walks every pending message: once per poll interval,
        # not once per loop (a loop per acknowledgement made it quadratic in the messages in flight).
        if now < self._next_scan:
            return
        self._next_scan = now + self._poll_timeout_ms() / 1000
        for slot, message in list(self._pending.items()):
            dest = self._destinations[slot[0]]
            if now - message.created > self.config.give_up_after_s:
                log.error("routing for %r was not taken by %s within %.0fs; giving up",
                          message.record.key, dest.address, self.config.give_up_after_s)
                self._finish(self._pending.pop(slot), DeliveryError(
                    f"{message.record.key!r}: not taken by {dest.address} within {self.config.give_up_after_s}s"))
                self._regions.pop(slot, None)  # a slow collector may map it later: never reused
            elif dest.epoch is not None and message.received_epoch is None and (
                message.sent_at is None or now - message.sent_at > self.config.ack_timeout_s
            ):
                self._transmit(dest, message)

    def _ping(self, dest: _Destination, now: float) -> None:
        dest.nonce = next(self._nonces)
        if self.config.shared_memory and shm.free_bytes() > 0:
            if dest.probe:
                shm.unlink(dest.probe)
            dest.probe = shm.new_name("probe")
            try:
                shm.write_probe(dest.probe, dest.nonce.to_bytes(8, "little"))
            except OSError:
                dest.probe = None
        try:
            dest.socket.send(wf.encode(wf.Ping(dest.nonce, dest.probe)), zmq.NOBLOCK)
        except zmq.Again:
            pass
        dest.next_ping = now + self.config.heartbeat_s

    def _free_region(self, slot: tuple[str, str]) -> bool:
        offset = self._regions.pop(slot, None)
        if offset is not None:
            self._arena.free(offset)
        return offset is not None

    def _finish(self, message: _Outgoing, error: Exception | None) -> None:
        if error is None:
            _resolve(message.delivery.received)
            _resolve(message.delivery.taken)
        else:
            for future in (message.delivery.received, message.delivery.taken):
                if not future.done():
                    future.set_exception(error)
        with self._cond:
            self._queued_bytes -= message.nbytes
            if error is None:
                self._stats.taken += 1
            else:
                self._stats.failed += 1
            self._cond.notify_all()

    def _fail_everything(self) -> None:
        """Called by a dying thread: every delivery not yet taken fails with the thread's error, and
        producers blocked in ``send`` or ``flush`` wake up and raise it."""
        error = BackgroundThreadDied(self._worker.name, self._worker.error)
        with self._cond:
            outgoing = list(self._pending.values()) + list(self._incoming)
            self._pending.clear()
            self._incoming.clear()
        for message in outgoing:
            self._finish(message, DeliveryError(f"{message.record.key!r}: {error}"))

    def _wake(self) -> None:
        with self._cond:
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                pass


def _slice(record: wf.RoutingRecord, routing: torch.Tensor, valid: torch.Tensor | None,
           layers: tuple[int, int]) -> tuple[wf.RoutingRecord, torch.Tensor, torch.Tensor | None]:
    """The model's layers ``a..b-1`` of a record's routing, with a record of their own."""
    a, b = layers
    if not record.layer_start <= a < b <= record.layer_stop:
        raise ValueError(f"{record.key!r}: layers {layers} outside the record's "
                         f"[{record.layer_start}, {record.layer_stop})")
    columns = slice(a - record.layer_start, b - record.layer_start)
    routing = routing[:, columns].contiguous()
    valid = valid[:, columns].contiguous() if record.mask_bytes else None
    sliced = wf.RoutingRecord.of(
        record.key, routing, valid, num_experts=record.num_experts, num_tokens=record.num_tokens,
        token_hash=record.token_hash, start=record.start, weight_version=record.weight_version,
        num_layers=record.num_layers, layer_start=a)
    return sliced, routing, valid if sliced.mask_bytes else None


def _resolve(future: Future) -> None:
    if not future.done():
        future.set_result(None)
