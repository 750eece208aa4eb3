"""Scheduler-side recording: what ``--record-routing`` does inside each SGLang scheduler process.

Per forward, modelled on SGLang's own capturer (``sglang.srt.state_capturer``):

1. every MoE layer's top-k ids are recorded by batch position into a *staging* recorder sized
   once, before SGLang captures its graphs (the capture extension's graph-safe call; padded rows
   and rows past the forward's real token count are skipped; fused shared-expert columns are
   dropped); an eager forward larger than the staging records straight into the main recorder;
2. after the forward, the staged rows are copied once into the slot-keyed *main* recorder at the
   forward's KV slots (``out_cache_loc_virtual`` when the pool is virtual, else ``out_cache_loc``),
   and the whole staging is marked unwritten.

Rows are keyed by KV slot, so a radix-cached prefix keeps the rows computed when it was first
prefilled. Slots are reset when SGLang's allocator actually frees them (after a free group
closes); all rows are dropped when the weights change, so rows of older weights are never
delivered as current. When a request finishes, the gather of its rows ``[start_len, seqlen - 1)``
(the last token has no row) is started and handed to the delivery thread (``delivery``), which
makes their ``RoutingRecord`` once (checksum and token hash) and queues it unchanged on the wire to
the sink: the scheduler thread never waits for it. The request's descriptor then says ``queued``
with the sample's key, rows and weight version; the record itself reaches the consumer. A request
that asked for its rows inline waits for them, and its descriptor is the record's fields, the
delivery's status and the rows.

All of this runs inside SGLang's scheduler, so none of it may end the scheduler: every step runs
in ``SchedulerRecording.attempt``, which counts and logs an exception instead of raising it. A
request whose delivery failed gets a ``delivery: failed`` descriptor naming the reason, with all
its rows counted as missing; a forward whose recording failed (bad ids from the engine included:
on CUDA the kernels count them and the counts are read after the forward) has its rows dropped and
its slots marked lost, and every request over a lost slot is delivered as failed, naming the
reason (on its sink, as a ``failed`` notice, when that is known only after its response went
out); rows that could not be reset are dropped wholesale, and if even that fails the
recording is marked broken and every later descriptor says so. Only during CUDA-graph capture (at
start-up) is an exception raised, so SGLang refuses to start instead of serving without routing.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import torch

from routing_replay.capture import RoutingLayout, RoutingRecorder
from routing_replay.capture.recorder import ErrorSnapshot, describe_errors
from routing_replay.models import moe_layer_ids
from routing_replay.sglang.delivery import Delivered, DeliveryThread, ForwardCheck, PendingDelivery, RoutingLost
from routing_replay.sglang.options import REQUEST_KEY, RecordingOptions, RoutingRequest
from routing_replay.wire import RoutingSender, SenderConfig
from routing_replay.wire.worker import log_rate_limited

log = logging.getLogger("routing_replay.sglang")


# Benchmarks set this to a file path: the recording then times its own work per phase and writes
# the totals there (benchmarks/sglang_bench.py reads them). Off by default: no timing overhead.
PROFILE_ENV = "ROUTING_REPLAY_PROFILE"


@dataclass
class CaptureProfile:
    """Seconds spent by the recording, against the forwards it wrapped (model time included)."""

    forwards: int = 0
    forward_s: float = 0.0
    capture_s: float = 0.0
    scatter_s: float = 0.0
    requests: int = 0
    finish_s: float = 0.0
    """The scheduler thread's time in ``request_finished`` (start the gather, queue the delivery)."""
    delivery_s: float = 0.0
    """The delivery thread's time (wait for the rows, make the record, hand it to the sender)."""

    def dump(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)


_MAX_ERROR_CHARS = 500  # of an exception's text in a descriptor


@dataclass
class _Forward:
    valid_rows: int | torch.Tensor
    slots: torch.Tensor | None = None  # None while SGLang captures graphs: no copy follows
    positions: torch.Tensor | None = None
    started: float = 0.0
    direct: bool = False
    """Recorded straight into the main recorder at ``slots``: an eager forward larger than the
    staging buffer (never a graph: graph batches are bounded when the staging is sized)."""
    error: str | None = None
    """Why its rows are dropped (never copied in part), once something failed."""


@dataclass
class _Attempt:
    error: str | None = None
    """What failed and why, when the attempt raised."""


@dataclass(frozen=True)
class _Span:
    """The rows a finished request asked for: positions ``[start, start + rows)`` of its tokens."""

    key: str
    tokens: list[int]
    start: int

    @property
    def rows(self) -> int:
        return max(len(self.tokens) - 1 - self.start, 0)  # the last token has no row

    @classmethod
    def of(cls, req: Any, params: RoutingRequest) -> _Span:
        tokens = list(req.origin_input_ids) + list(req.output_ids_through_stop)
        return cls(params.delivery_key(req.rid), tokens, min(params.start_len, max(len(tokens) - 1, 0)))


_MIN_STAGING_ROWS = 8192


def staging_rows(max_running_requests: int, chunked_prefill_size: int | None, draft_tokens: int | None) -> int:
    """Rows of the staging recorder, fixed at start-up before SGLang captures any graph: every graph
    batch (decode: up to ``max_running_requests`` requests, each verifying ``draft_tokens`` under
    speculative decoding; prefill: up to a chunk) and most eager forwards fit. A larger eager forward
    records straight into the main recorder; a larger graph batch fails SGLang's start-up, naming it."""
    return max(max_running_requests * max(draft_tokens or 1, 1), chunked_prefill_size or 0, _MIN_STAGING_ROWS)


class Failures:
    """Our exceptions inside SGLang's scheduler, counted by reason (what failed and the exception
    type). The first of each reason is logged with its traceback, later ones rate-limited."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self._lock = threading.Lock()  # counted by the scheduler and the delivery thread

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def count(self, what: str, exc: Exception) -> str:
        """Counts and logs ``exc``; returns the error text for descriptors."""
        reason = f"{what}: {type(exc).__name__}"
        with self._lock:
            self.by_reason[reason] += 1
            count = self.by_reason[reason]
        error = f"{what} failed: {type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        if count == 1:
            log.error("routing-replay: %s (SGLang goes on; counted in descriptors' scheduler_errors)", error,
                      exc_info=exc)
        else:
            log_rate_limited(log, count, "routing-replay: %s", error)
        return error


class SchedulerRecording:
    """The recorders, the sender and the per-request descriptors of one scheduler process."""

    def __init__(self, options: RecordingOptions, hf_config: Any, num_slots: int, max_batch: int,
                 device: str, sends: bool, fused_shared_experts: int, in_graph_capture: Callable[[], bool]) -> None:
        """``max_batch``: the most tokens one graph-replayed forward can hold (the staging is sized for
        it once, before any graph is captured, and never replaced: captured graphs keep its address).
        ``fused_shared_experts``: the columns SGLang appends to top-k ids for fused shared experts
        (dropped). ``in_graph_capture``: SGLang's own capture-mode flag."""
        self.options = options
        self.layout = RoutingLayout.from_hf_config(hf_config)
        self.router_of_layer = {layer: i for i, layer in enumerate(moe_layer_ids(hf_config))}
        self.fused_shared_experts = fused_shared_experts
        self.in_graph_capture = in_graph_capture
        self.main = RoutingRecorder(self.layout, num_slots, device)
        self.staging = RoutingRecorder(self.layout, max_batch, device)
        self.positions = torch.arange(max_batch, device=self.main.device)
        self._staging_dirty = False  # rows recorded outside a forward (graph capture) await a clear
        self._counts_errors = self.main.device.type == "cuda"  # the CPU backend raises instead
        # CUDA: gathers run on a stream of their own, ordered after the last forward's copy only, so
        # a finishing request never waits behind a forward SGLang has queued since (overlap scheduling).
        self._delivery_stream = torch.cuda.Stream(self.main.device) if self._counts_errors else None
        self._rows_written: torch.cuda.Event | None = None
        self._checks: list[ForwardCheck] = []
        self.lost: dict[int, str] = {}
        """Slots whose rows a capture error lost, with the reason; a request over any of them is
        delivered as failed. Cleared when the slot is freed."""
        self.sender = self._make_sender() if sends else None
        self.descriptors: dict[str, dict] = {}
        self.forward_context: _Forward | None = None
        self.weights_dropped = 0
        self.failures = Failures()
        self.delivery = DeliveryThread(self.sender, self.failures.count)
        self.broken: str | None = None
        """Why recording stopped for good (rows could not be dropped), else None."""
        self.profile_path = os.environ.get(PROFILE_ENV)
        self.profile = CaptureProfile()
        log.info("routing-replay: recording %s in scheduler pid %d: %d slots, %.1f MB + %.1f MB staging on %s, "
                 "outside --mem-fraction-static (on a GPU, lower it by this much)", self.layout, os.getpid(),
                 num_slots, self.main.nbytes / 1e6, self.staging.nbytes / 1e6, device)

    def _make_sender(self) -> RoutingSender:
        sender = RoutingSender(SenderConfig(max_queued_bytes=self.options.routing_max_queued_mb << 20,
                                            shared_memory=self.options.routing_shm))
        if self.options.routing_sink:
            sender.connect(self.options.routing_sink)
        return sender

    def status(self) -> dict:
        """Reported to the launcher at start-up: proof that recording is live in this process."""
        return {"pid": os.getpid(), "layout": [self.layout.num_layers, self.layout.top_k, self.layout.num_experts],
                "num_slots": self.main.num_slots, "bytes": self.main.nbytes}

    # ---- failure containment ----------------------------------------------------------------------

    @contextmanager
    def attempt(self, what: str) -> Iterator[_Attempt]:
        """Runs a step of ours inside SGLang: an exception is counted and logged, and ``error`` of the
        yielded record says what failed; it never reaches SGLang. During CUDA-graph capture it is
        raised: a failure at start-up must stop SGLang, not leave it serving graphs that record nothing."""
        attempt = _Attempt()
        try:
            yield attempt
        except Exception as exc:  # noqa: BLE001 - counted, logged and reported in the descriptors
            if self.in_graph_capture():
                raise
            attempt.error = self.failures.count(what, exc)

    def _break(self, error: str) -> None:
        if self.broken is None:
            self.broken = f"routing recording in scheduler pid {os.getpid()} stopped (restart the server): {error}"
            log.critical("routing-replay: %s", self.broken)

    # ---- inside the forward ---------------------------------------------------------------------

    def run_forward(self, forward_batch: Any, run: Callable[[], Any]) -> Any:
        """Runs SGLang's forward (``run``) recording its routing; SGLang's own exceptions propagate."""
        forward = self._begin_forward(forward_batch)
        if forward is None:
            return run()
        self.forward_context = forward
        try:
            return run()
        except BaseException as exc:
            forward.error = f"SGLang's forward raised {type(exc).__name__}"
            raise
        finally:
            self.forward_context = None
            self._end_forward(forward)

    def _begin_forward(self, forward_batch: Any) -> _Forward | None:
        """The forward to record; None when there is nothing to record or preparing failed (its rows
        then stay unrecorded: their slots are fresh, reset when last freed)."""
        if self.broken:
            return None
        with self.attempt("preparing a forward"):
            self._settle_checks()
            if self._staging_dirty:
                self._clear_staging()
            slots = forward_batch.out_cache_loc_virtual
            if slots is None:
                slots = forward_batch.out_cache_loc
            if slots is None or slots.numel() == 0:
                return None
            tokens = slots.shape[0]
            padded = forward_batch.num_token_non_padded
            valid = padded if isinstance(padded, torch.Tensor) and padded.device == self.main.device else tokens
            direct = tokens > self.staging.num_slots
            return _Forward(valid, slots, None if direct else self.positions[:tokens], time.perf_counter(), direct=direct)
        return None

    def _end_forward(self, forward: _Forward) -> None:
        """Copies the staged rows to the forward's slots (or drops them all if any step failed, and
        marks the slots lost), then clears the staging."""
        copy_started = time.perf_counter()
        if forward.error is None and not forward.direct:
            with self.attempt("copying a forward's rows") as copying:
                self.main.copy_rows_from(self.staging, forward.positions, forward.slots)
            forward.error = copying.error
        if forward.error is None and self._counts_errors:
            with self.attempt("checking a forward's capture errors") as checking:
                host_slots = _to_host(forward.slots)  # before the snapshots: their events cover it
                self._checks.append(ForwardCheck(forward.slots, host_slots, self._error_snapshots(forward)))
            forward.error = checking.error
        if forward.error is not None:
            self._drop_forward(forward.slots, forward.error)
        if not forward.direct:
            self._clear_staging()
        if self._counts_errors:
            with self.attempt("marking a forward's rows written"):
                self._rows_written = torch.cuda.Event()
                self._rows_written.record(torch.cuda.current_stream(self.main.device))
        if self.profile_path:
            with self.attempt("writing the profile"):
                done = time.perf_counter()
                self.profile.forwards += 1
                self.profile.forward_s += done - forward.started
                self.profile.scatter_s += done - copy_started
                if self.profile.forwards % 20 == 0:
                    self.profile.dump(self.profile_path)

    def _error_snapshots(self, forward: _Forward) -> tuple[tuple[RoutingRecorder, ErrorSnapshot], ...]:
        recorders = (self.main,) if forward.direct else (self.staging, self.main)
        return tuple((recorder, recorder.error_snapshot()) for recorder in recorders)

    def _drop_forward(self, slots: torch.Tensor, error: str) -> None:
        """Resets a failed forward's rows (part of them would be delivered as whole) and marks its
        slots lost, so the requests over them are delivered as failed, naming ``error``."""
        with self.attempt("dropping a failed forward's rows") as dropping:
            self.main.reset(slots)
            self.lost.update(dict.fromkeys(slots.tolist(), error))
        if dropping.error:
            self._break(dropping.error)

    def _clear_staging(self) -> None:
        """Marks the whole staging unwritten: a graph replay records every padded row of its batch,
        beyond the forward's tokens, and none of those may be copied as a later forward's."""
        with self.attempt("clearing the staged rows") as clearing:
            self.staging.clear()
            self._staging_dirty = False
        if clearing.error:
            self._break(clearing.error)  # this forward's rows would be copied as the next one's

    def _settle_checks(self) -> None:
        """Reads the error counts of finished forwards, oldest first, without waiting for the others,
        and drops the rows of each forward whose kernels skipped bad input."""
        while self._checks and self._checks[0].ready():
            check = self._checks.pop(0)
            errors = check.errors()
            if errors:
                self._drop_forward(check.slots, f"the CUDA recorder skipped bad input in a forward: "
                                                f"{describe_errors(errors)}")

    def capture(self, layer_id: int | None, topk_ids: torch.Tensor) -> None:
        context = self.forward_context
        capturing_graphs = context is None and self.in_graph_capture()
        if context is None and not capturing_graphs:
            return  # not a forward of the target model (draft model, warm-up outside forwards)
        if context is not None and context.error is not None:
            return
        with self.attempt("capturing a layer's routing") as capturing:
            if capturing_graphs:
                # SGLang captures its graphs by calling the model directly, outside
                # ModelRunner.forward: record every row into the graph; each replay's run_forward
                # then copies only the forward's real rows, so padded rows never reach the recorder.
                context = _Forward(valid_rows=topk_ids.shape[0])
                self._staging_dirty = True
            router = self.router_of_layer.get(layer_id)
            if router is None:
                raise RuntimeError(f"routing-replay: layer {layer_id} routed tokens but the model config "
                                   f"says its MoE layers are {sorted(self.router_of_layer)}")
            topk_ids = self._routed_columns(topk_ids)
            started = time.perf_counter() if self.profile_path else 0.0
            if context.direct:
                self.main.record(router, context.slots[: topk_ids.shape[0]], topk_ids, valid_rows=context.valid_rows)
            else:
                rows = topk_ids.shape[0]
                if rows > self.staging.num_slots:
                    raise RuntimeError(f"routing-replay: a graph batch of {rows} rows exceeds the staging buffer "
                                       f"of {self.staging.num_slots} rows sized at start-up")
                self.staging.record(router, self.positions[:rows], topk_ids, valid_rows=context.valid_rows)
            if self.profile_path:
                self.profile.capture_s += time.perf_counter() - started
        if capturing.error and self.forward_context is not None:
            self.forward_context.error = capturing.error  # outside graph capture: this forward's

    def _routed_columns(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' columns: SGLang appends one column per fused shared expert (its id is
        num_experts) on paths that fuse them (DeepSeek-V2/V3, GLM-4.5 on CUDA); they are dropped by a
        view, not a copy."""
        width, top_k = topk_ids.shape[1], self.layout.top_k
        if width == top_k:
            return topk_ids
        if width == top_k + self.fused_shared_experts:
            return topk_ids[:, :top_k]
        raise RuntimeError(f"routing-replay: SGLang passed {width} top-k columns; the model routes {top_k} experts "
                           f"per token plus {self.fused_shared_experts} fused shared expert(s)")

    # ---- lifecycle --------------------------------------------------------------------------------

    def slots_freed(self, slots: torch.Tensor) -> None:
        with self.attempt("resetting freed slots") as resetting:
            if slots.numel():
                self.main.reset(slots)
                if self.lost:  # reading the slots syncs: only after a capture error
                    for slot in slots.tolist():
                        self.lost.pop(slot, None)
        if resetting.error:
            self._drop_all_rows()  # the freed slots' rows would be delivered as their next owner's

    def cache_cleared(self) -> None:
        self.lost.clear()  # every slot is free
        self._drop_all_rows()

    def weights_changed(self) -> None:
        """Rows computed by the previous weights must never be delivered as current."""
        self.weights_dropped += 1
        self._drop_all_rows()

    def _drop_all_rows(self) -> None:
        with self.attempt("dropping every row") as dropping:
            self.main.clear()
        if dropping.error:
            self._break(dropping.error)  # rows that must be gone would be delivered as current

    # ---- delivery ---------------------------------------------------------------------------------

    def request_finished(self, req: Any, req_to_token_pool: Any, weight_version: Callable[[], str]) -> None:
        """Starts the gather of a finished request's rows and queues their delivery; waits only for a
        request that asked for its rows inline. A failure becomes its descriptor."""
        span: _Span | None = None
        with self.attempt("delivering a request's routing") as delivering:
            started = time.perf_counter()
            params = _requested(req)
            if params is None:
                return
            span = _Span.of(req, params)
            self.descriptors[req.rid] = self._start_delivery(req, req_to_token_pool, params, span, weight_version())
            if self.profile_path:
                with self.attempt("writing the profile"):
                    self.profile.requests += 1
                    self.profile.finish_s += time.perf_counter() - started
                    self.profile.delivery_s = self.delivery.busy_s
                    self.profile.dump(self.profile_path)
        if delivering.error:
            with self.attempt("reporting a failed delivery"):  # else descriptor_for says it had none
                self.descriptors[req.rid] = self._failed(delivering.error, span)

    def _start_delivery(self, req: Any, req_to_token_pool: Any, params: RoutingRequest, span: _Span,
                        weight_version: str) -> dict:
        """The request's descriptor, once its delivery is queued (or known to have failed)."""
        if self.broken:
            return self._failed(self.broken, span)
        sink, status = self._destination(params)
        if status["delivery"] == "failed":
            return {**self._failed(status["error"], span), "sink": sink}
        queued = {**self._span_fields(span), "weight_version": weight_version, **status,
                  "scheduler_errors": self.failures.total}
        if sink is None and not params.inline:
            return queued  # nothing to deliver
        self.delivery.check()  # a dead delivery thread fails this request, naming it
        with self._on_delivery_stream():
            slots = req_to_token_pool.req_to_token[req.kv.req_pool_idx, span.start : span.start + span.rows]
            slots = slots.to(torch.int64)
            host_slots = _to_host(slots)  # before the gather: its event then covers this copy too
            handle = self.main.gather(slots, report_errors=False)  # errors are read per forward (_checks)
        self._settle_checks()
        lost = self._lost_reasons(slots)
        if lost:
            return self._failed(f"routing of this request was lost: {lost}", span)
        pending = PendingDelivery(span.key, span.tokens, span.start, weight_version, self.layout.num_experts, handle,
                                  host_slots, tuple(self._checks), sink, Future() if params.inline else None)
        self.delivery.put(pending)
        if pending.result is None:
            return queued
        try:
            delivered: Delivered = pending.result.result()  # inline: the response carries the rows
        except RoutingLost as exc:
            return self._failed(str(exc), span)
        return self._inline_descriptor(delivered, delivered.sink_status or status)

    def _destination(self, params: RoutingRequest) -> tuple[str | None, dict]:
        """The sink to send the record to (None: none) and the delivery status to report."""
        sink = params.sink or self.options.routing_sink
        if not sink:
            return None, {"delivery": "inline" if params.inline else "none"}
        if self.sender is None:
            return None, {"delivery": "not-this-rank"}
        if self.sender.never_answered(sink):  # a busy collector that answered before is still sent to
            return sink, {"delivery": "failed", "error": f"routing sink {sink} is unreachable (it never answered "
                                                          "a heartbeat)"}
        return sink, {"delivery": "queued", "sink": sink}

    @contextmanager
    def _on_delivery_stream(self) -> Iterator[None]:
        """CUDA: makes the delivery stream current, ordered after the last forward's copy (which
        wrote every row of a request finishing now), and orders the forward stream's later work
        (slot resets, new rows) after the gather. A no-op on CPU."""
        if self._delivery_stream is None:
            yield
            return
        if self._rows_written is not None:
            self._delivery_stream.wait_event(self._rows_written)
        with torch.cuda.stream(self._delivery_stream):
            yield
            gathered = torch.cuda.Event()
            gathered.record(self._delivery_stream)
        torch.cuda.current_stream(self.main.device).wait_event(gathered)

    def _lost_reasons(self, slots: torch.Tensor) -> str:
        """Why some of ``slots``' rows were lost to capture errors known now ("" when none were)."""
        if not self.lost:  # reading the slots syncs: only after a capture error
            return ""
        return "; ".join(dict.fromkeys(self.lost[slot] for slot in slots.tolist() if slot in self.lost))

    def with_descriptors(self, info: dict, reqs: list) -> dict:
        """SGLang's per-batch customized output ``info`` plus each request's descriptor entry."""
        with self.attempt("attaching descriptors"):
            return {**info, REQUEST_KEY: [self.descriptor_for(req) for req in reqs]}
        return info

    def descriptor_for(self, req: Any) -> list:
        """The meta_info entry of a request: ``[descriptor]`` once it finished, else ``[]``."""
        with self.attempt("looking up a request's descriptor") as looking_up:
            if not req.finished():
                return []
            descriptor = self.descriptors.pop(req.rid, None)
            if descriptor is not None:
                return [descriptor]
            if _requested(req) is None:
                return []
            return [self._failed(f"request finished without routing ({req.finished_reason})", None)]
        return [self._failed(looking_up.error, None)]

    def _failed(self, error: str, span: _Span | None) -> dict:
        """The descriptor of an undelivered request: every row it asked for is missing."""
        descriptor: dict[str, Any] = {"delivery": "failed", "error": error, "scheduler_errors": self.failures.total}
        if span is not None:
            descriptor.update(self._span_fields(span), missing=span.rows * self.layout.num_layers)
        return descriptor

    @staticmethod
    def _span_fields(span: _Span) -> dict:
        return {"key": span.key, "rows": span.rows, "start": span.start, "num_tokens": len(span.tokens)}

    def _inline_descriptor(self, delivered: Delivered, status: dict) -> dict:
        """The record's fields, the rows (base64) and the delivery's status."""
        descriptor = msgspec.to_builtins(delivered.record)
        descriptor["scheduler_errors"] = self.failures.total
        descriptor["inline"] = base64.b64encode(delivered.rows.ids.numpy()).decode()
        if delivered.record.mask_bytes:
            descriptor["inline_valid"] = base64.b64encode(delivered.rows.valid.numpy()).decode()
        descriptor.update(status)
        return descriptor

    def close(self) -> None:
        self.delivery.close()
        if self.sender is not None:
            self.sender.close()


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host: CUDA, a copy into pinned memory queued on the current stream (read it
    after an event recorded later on that stream); CPU, the tensor itself."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def _requested(req: Any) -> RoutingRequest | None:
    return RoutingRequest.from_custom_params(getattr(req.sampling_params, "custom_params", None))
