"""Delivery of finished requests' routing, off SGLang's scheduler thread.

When a request finishes, the scheduler thread only starts the gather of its rows (on CUDA a
stream-ordered copy into pinned host memory from torch's caching host allocator, which reuses
freed pinned blocks) and queues a ``PendingDelivery`` here. This thread waits for the copy, reads
the capture-error counts of the forwards still unsettled when the request finished, makes the
sample's ``RoutingRecord`` (its checksum and token hash: the one pass over the bytes) and hands it
to the sender. A request that asked for its rows inline waits for that result; every other
request's response has gone out already, so whatever fails here travels to its sink as a
``failed`` notice naming the reason, and the consumer's ``take`` raises it at once.

Each delivery's exception is counted and reported, and the thread goes on. If it dies anyway,
every delivery it held gets a ``failed`` notice naming its death, and the next finishing request's
descriptor names it too.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from routing_replay.capture import RoutingRecorder, RoutingRows
from routing_replay.capture.recorder import ErrorSnapshot, GatherHandle, describe_errors
from routing_replay.wire import RoutingRecord, RoutingSender, SenderFull
from routing_replay.wire import format as wire_format
from routing_replay.wire.worker import WorkerThread

log = logging.getLogger("routing_replay.sglang")


class RoutingLost(RuntimeError):
    """A request's rows were lost to a capture error, or its delivery failed here; the text says why."""


@dataclass
class ForwardCheck:
    """The CUDA recorders' error counts after one forward, on their way to the host, with the
    forward's slots copied alongside: bad rows the kernels skipped are counted, not raised, so a
    forward's failure is known only later. Settled once, by whichever thread asks first."""

    slots: torch.Tensor
    host_slots: torch.Tensor
    """``slots`` in pinned host memory, valid once the snapshots are ready."""
    snapshots: tuple[tuple[RoutingRecorder, ErrorSnapshot], ...]
    _errors: dict[str, int] | None = None
    _settling: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Both threads read checks oldest first, so a check is settled only after the ones before it."""

    def ready(self) -> bool:
        return all(snapshot.ready() for _, snapshot in self.snapshots)

    def errors(self) -> dict[str, int]:
        """Bad input its kernels skipped, by kind (waits for the counts)."""
        for _, snapshot in self.snapshots:
            snapshot.wait()
        with self._settling:
            if self._errors is None:
                found: Counter[str] = Counter()
                for recorder, snapshot in self.snapshots:
                    found.update(recorder.take_errors(snapshot))
                self._errors = dict(found)
        return self._errors


@dataclass
class PendingDelivery:
    """A finished request's rows on their way to the host, and where they go."""

    key: str
    tokens: list[int]
    start: int
    weight_version: str
    num_experts: int
    handle: GatherHandle
    host_slots: torch.Tensor
    """The KV slots of the rows, on the host once the gather landed."""
    checks: tuple[ForwardCheck, ...]
    """The forwards whose error counts were not yet read when the request finished (oldest first)."""
    sink: str | None
    """The collector to send the record to; None: nowhere."""
    result: Future | None = None
    """Set for a request that asked for its rows inline: its response waits for them."""


@dataclass(frozen=True)
class Delivered:
    record: RoutingRecord
    rows: RoutingRows
    sink_status: dict = field(default_factory=dict)
    """``delivery`` (queued or failed), ``sink`` and ``error`` when sent; empty when not."""


def lost_to_capture_errors(pending: PendingDelivery) -> str:
    """Why some of the request's rows were lost in a forward whose errors were counted late ("" if none)."""
    reasons = []
    for check in pending.checks:
        errors = check.errors()
        if errors and torch.isin(check.host_slots, pending.host_slots).any():
            reasons.append(f"the CUDA recorder skipped bad input in a forward: {describe_errors(errors)}")
    return "; ".join(dict.fromkeys(reasons))


class DeliveryThread:
    """Makes and sends the records of finished requests, in the order they finished."""

    def __init__(self, sender: RoutingSender | None, count_failure: Callable[[str, Exception], str]) -> None:
        """``count_failure(what, exc)`` counts and logs an exception of ours, returning its text."""
        self._sender = sender
        self._count_failure = count_failure
        self._queue: collections.deque[PendingDelivery] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._current: PendingDelivery | None = None
        self.busy_s = 0.0
        """Seconds this thread spent delivering (benchmarks read it)."""
        self._worker = WorkerThread("routing-delivery", self._run, self._fail_everything)
        self._worker.start()

    def put(self, pending: PendingDelivery) -> None:
        """Queues a delivery; never waits. Raises BackgroundThreadDied if the thread died."""
        self._worker.check()
        with self._cond:
            self._queue.append(pending)
            self._cond.notify()

    def check(self) -> None:
        self._worker.check()

    def close(self) -> None:
        """Delivers what is queued, then stops."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._worker.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                pending = self._current = self._queue.popleft()
            started = time.perf_counter()
            self._deliver(pending)
            self.busy_s += time.perf_counter() - started
            self._current = None

    def _deliver(self, pending: PendingDelivery) -> None:
        try:
            rows = pending.handle.wait(check_errors=False)
            lost = lost_to_capture_errors(pending)
            if lost:
                raise RoutingLost(f"routing of this request was lost: {lost}")
            record = RoutingRecord.of(pending.key, rows.ids, rows.valid, num_experts=pending.num_experts,
                                      num_tokens=len(pending.tokens), token_hash=wire_format.token_hash(pending.tokens),
                                      start=pending.start, weight_version=pending.weight_version)
            if record.missing:
                log.warning("routing-replay: %s has %d unrecorded (row, layer) positions", pending.key, record.missing)
            delivered = Delivered(record, rows, self._send(pending, record, rows))
        except Exception as exc:  # noqa: BLE001 - reported to the sink and the inline caller; the thread goes on
            # RoutingLost: bad input from the engine, not a failure of ours
            error = str(exc) if isinstance(exc, RoutingLost) else self._count_failure(
                "delivering a request's routing", exc)
            self._fail(pending, error)
            return
        if pending.result is not None:
            pending.result.set_result(delivered)

    def _send(self, pending: PendingDelivery, record: RoutingRecord, rows: RoutingRows) -> dict:
        if pending.sink is None:
            return {}
        try:
            self._sender.send(record, rows.ids, pending.sink, valid=rows.valid if record.mask_bytes else None,
                              block=False)
        except SenderFull as exc:
            self._sender.send_failure(pending.key, str(exc), pending.sink)
            return {"delivery": "failed", "sink": pending.sink, "error": str(exc)}
        return {"delivery": "queued", "sink": pending.sink}

    def _fail(self, pending: PendingDelivery, error: str) -> None:
        """Tells the sink (and the waiting inline caller) that this routing will not come."""
        if pending.sink is not None:
            try:
                self._sender.send_failure(pending.key, error, pending.sink)
            except Exception as exc:  # noqa: BLE001 - the sender is gone: its own death reaches every caller
                self._count_failure("reporting a failed delivery to its sink", exc)
        if pending.result is not None:
            pending.result.set_exception(RoutingLost(error))

    def _fail_everything(self) -> None:
        """Called by a dying thread: every delivery it had not finished fails, named, on its sink and
        to its waiting inline caller (later requests fail at ``check``)."""
        with self._cond:
            queued, self._queue = [self._current, *self._queue], collections.deque()
        for pending in filter(None, queued):
            if pending.result is None or not pending.result.done():
                self._fail(pending, f"the routing delivery thread died: {self._worker.error!r}")
