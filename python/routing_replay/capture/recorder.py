"""RoutingRecorder: a slot-keyed, preallocated routing buffer with native record/gather/reset."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

from routing_replay.capture import native
from routing_replay.capture.errors import InvalidRoutingInput, MissingRoutingError, RoutingCaptureError
from routing_replay.capture.layout import RoutingLayout

SlotsLike = Union[torch.Tensor, Sequence[int]]
_INDEX_DTYPES = (torch.int32, torch.int64)
_INDEX_BYTES = {torch.int32: 4, torch.int64: 8}
# What torch.from_dlpack calls for a DLPack capsule, minus its Python wrapper (which costs more
# than the native gather of one token). Looked up at import, so a torch without it fails loudly.
_tensor_from_capsule = torch._C._from_dlpack

# Set to 1 to check, on the host, that no slot repeats among one record call's real rows (a sync per
# call; skipped inside CUDA-graph capture). Repeated slots keep the last row on CPU but mix rows on
# CUDA, where the rows of one call are written in parallel.
DEBUG_ENV = "ROUTING_REPLAY_DEBUG"
_DEBUG = os.environ.get(DEBUG_ENV, "") not in ("", "0")

# Error kinds of cpp/include/routing_replay/routing_row.h.
_EXPERT_OUT_OF_RANGE, _SLOT_OUT_OF_RANGE, _PARTIAL_PADDING = 1, 2, 3
_ERROR_NAMES = {
    _EXPERT_OUT_OF_RANGE: "expert id out of range",
    _SLOT_OUT_OF_RANGE: "slot out of range",
    _PARTIAL_PADDING: "row mixing -1 padding with expert ids",
}


@dataclass(slots=True)
class RoutingRows:
    """Routing of ``n`` tokens gathered from a recorder, on the host.

    ``ids`` is ``[n, num_layers, top_k]`` in the layout's dtype; ``valid`` is ``[n, num_layers]``
    bool, False where that (token, layer) was never recorded or was reset. Ids at invalid
    positions are meaningless. Both are contiguous and owned by these rows (no other gather or
    recorder shares their memory). Not frozen: a frozen dataclass's ``__init__`` costs a tenth of
    a one-token gather.
    """

    ids: torch.Tensor
    valid: torch.Tensor

    @property
    def complete(self) -> bool:
        return bool(self.valid.all())

    def missing(self) -> torch.Tensor:
        """``[m, 2]`` int64 (row, layer) of every unrecorded position."""
        return (~self.valid).nonzero()

    def require_complete(self) -> torch.Tensor:
        """The ids, or MissingRoutingError naming how many positions are missing and the first ones."""
        if self.complete:
            return self.ids
        missing = self.missing()
        first = ", ".join(f"(row {r}, layer {l})" for r, l in missing[:5].tolist())
        raise MissingRoutingError(
            f"{len(missing)} of {self.valid.numel()} (row, layer) positions were never recorded: {first}"
        )


class ErrorSnapshot:
    """A recorder's CUDA error counts at one point of its stream, copied to pinned host memory
    without a sync. On CPU there is nothing to copy: the CPU backend raises instead of counting."""

    __slots__ = ("_counts", "_event")

    def __init__(self, counts: torch.Tensor | None = None, event: torch.cuda.Event | None = None) -> None:
        self._counts = counts
        self._event = event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        """Waits until the work queued before this snapshot (and its copy) is done."""
        if self._event is not None:
            self._event.synchronize()

    def counts(self) -> list[int]:
        """The counts per error kind (index 0 unused, all 0 when nothing was copied); waits for the copy."""
        self.wait()
        if self._counts is None:
            return [0] * native.NUM_ERROR_KINDS
        return self._counts.tolist()


def describe_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{count} x {name}" for name, count in errors.items())


class GatherHandle:
    """A gather in flight. On CUDA the copy to pinned host memory runs asynchronously on the
    stream of the recorder's device that was current at ``gather``, followed there by a copy of
    the error counts (``snapshot``), whose event tells when both landed. On CPU it is done."""

    __slots__ = ("_rows", "_recorder", "_snapshot", "_keepalive", "_errors")

    def __init__(
        self,
        rows: RoutingRows,
        recorder: RoutingRecorder | None = None,
        snapshot: ErrorSnapshot | None = None,
        keepalive: tuple[torch.Tensor, ...] = (),
    ) -> None:
        self._rows = rows
        self._recorder = recorder
        self._snapshot = snapshot
        self._keepalive = keepalive  # device staging tensors must outlive the async copy
        self._errors: dict[str, int] | None = None

    def done(self) -> bool:
        return self._snapshot is None or self._snapshot.ready()

    @property
    def errors(self) -> dict[str, int]:
        """Bad input the CUDA kernels skipped since the recorder's previous report, by kind (the
        counts' increase; known once waited on). Always empty on CPU, which raises instead."""
        if self._errors is None:
            raise RuntimeError("errors are known once the gather was waited on: call wait() first")
        return self._errors

    def wait(self, check_errors: bool = True) -> RoutingRows:
        """The gathered rows, once they landed. With ``check_errors``, raises RoutingCaptureError
        when the CUDA kernels of this recorder skipped bad input since its previous report
        (reported once: a later handle, or a second wait, does not report them again)."""
        if self._errors is None:
            if self._snapshot is not None:
                self._snapshot.wait()
            self._errors = {} if self._recorder is None else self._recorder.take_errors(self._snapshot)
            self._keepalive = ()
        if check_errors and self._errors:
            raise RoutingCaptureError(
                f"the CUDA recorder skipped bad input since its previous report: {describe_errors(self._errors)}; "
                "the rows of that input read back as missing"
            )
        return self._rows


def _check_index_meta(name: str, t: object, ndim: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidRoutingInput(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise InvalidRoutingInput(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != ndim:
        raise InvalidRoutingInput(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise InvalidRoutingInput(f"{name} is on {t.device} but the recorder is on {device}")
    return t


def _check_index_tensor(name: str, t: object, ndim: int, device: torch.device) -> torch.Tensor:
    t = _check_index_meta(name, t, ndim, device)
    if not t.is_contiguous():
        raise InvalidRoutingInput(f"{name} must be contiguous (call .contiguous())")
    return t


def _check_topk_ids(t: object, top_k: int, device: torch.device) -> torch.Tensor:
    """``[N, top_k]`` int32/int64 ids on ``device``. Each row must be contiguous, but rows may be spaced wider: a column slice such as SGLang's
    ``topk_ids[:, :top_k]`` (dropping fused shared-expert columns) is recorded without a copy."""
    t = _check_index_meta("topk_ids", t, 2, device)
    if t.shape[1] != top_k:
        raise InvalidRoutingInput(f"topk_ids has {t.shape[1]} columns, the layout's top_k is {top_k}")
    if t.shape[0] > 1 and not t.is_contiguous() and ((t.stride(1) != 1 and top_k > 1) or t.stride(0) < top_k):
        raise InvalidRoutingInput(
            f"topk_ids' rows must each be contiguous, got strides {t.stride()} (call .contiguous())"
        )
    return t


def _row_stride(topk_ids: torch.Tensor) -> int:
    """Elements from one row of ``topk_ids`` to the next (validated by ``_check_topk_ids``)."""
    return topk_ids.stride(0) if topk_ids.shape[0] > 1 else topk_ids.shape[1]


class RoutingRecorder:
    """Preallocated ``[num_slots, L, K]`` routing buffer keyed by KV-cache slot.

    Args:
        layout: the model's routing layout; picks the storage dtype.
        num_slots: size of the inference engine's KV pool (one row per token slot).
        device: where the buffer lives; ``cuda`` needs the CUDA module.

    Memory: ``num_slots * (layout.bytes_per_token + 4 * layout.valid_words)`` bytes (``nbytes``).
    """

    def __init__(self, layout: RoutingLayout, num_slots: int, device: str | torch.device = "cpu") -> None:
        if not isinstance(layout, RoutingLayout):
            raise InvalidRoutingInput(f"layout must be a RoutingLayout, got {type(layout).__name__}")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
            raise InvalidRoutingInput(f"num_slots must be a positive int, got {num_slots!r}")
        self.layout = layout
        self.num_slots = num_slots
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._backend = native.backend_for(self.device)
        self._on_cpu = self.device.type == "cpu"
        self.ids = torch.zeros((num_slots, layout.num_layers, layout.top_k), dtype=layout.dtype, device=self.device)
        self.valid_bits = torch.zeros((num_slots, layout.valid_words), dtype=torch.int32, device=self.device)
        self.error_counts = torch.zeros(native.NUM_ERROR_KINDS, dtype=torch.int64, device=self.device)
        """CUDA only: rows skipped per error kind; the counts only grow (``take_errors`` reports deltas)."""
        self._reported = [0] * native.NUM_ERROR_KINDS
        self._reported_lock = threading.Lock()  # snapshots may be settled from two threads
        self._view = make_view(self._backend, self.ids, self.valid_bits, self.error_counts, layout.num_experts)
        if not self._on_cpu:
            self._warm_up()

    def _warm_up(self) -> None:
        """Launches every kernel this recorder can run once, outside any graph: CUDA loads kernels
        lazily at their first launch, which must not happen inside a CUDA-graph capture. Writes
        nothing (padding rows) or rewrites slot 0 with itself."""
        if torch.cuda.is_current_stream_capturing():
            raise InvalidRoutingInput("create recorders outside CUDA-graph capture (they allocate and warm up)")
        for slot_dtype in _INDEX_DTYPES:
            for id_dtype in _INDEX_DTYPES:
                padding = torch.full((1, self.layout.top_k), -1, dtype=id_dtype, device=self.device)
                self.record(0, torch.zeros(1, dtype=slot_dtype, device=self.device), padding)
        self.copy_rows_from(self, [0], [0])
        self.gather([0]).wait(check_errors=False)
        torch.cuda.synchronize(self.device)

    @property
    def nbytes(self) -> int:
        """Device bytes held: the id buffer plus the validity bitmask."""
        return self.ids.nbytes + self.valid_bits.nbytes + self.error_counts.nbytes

    def record(
        self,
        layer_id: int,
        slots: torch.Tensor,
        topk_ids: torch.Tensor,
        valid_rows: int | torch.Tensor | None = None,
    ) -> None:
        """Converts one layer's ``[N, K]`` int32/int64 ids and writes row i at ``slots[i]``.

        Rows whose ids are all -1 (engine padding) are skipped, and so is every row at or past
        ``valid_rows`` (an int, or a one-element int tensor on the recorder's device whose value
        may change between CUDA-graph replays; an int is frozen into a captured graph). On CPU bad
        input raises InvalidRoutingInput and nothing is written; on CUDA the call never syncs, bad
        rows are skipped and counted, and the next ``gather(...).wait()`` raises RoutingCaptureError.
        Each row of ``topk_ids`` must be contiguous; rows may be spaced wider (a column slice).
        A slot must not repeat among one call's real rows: the CPU keeps the last such row, CUDA
        mixes them; ``ROUTING_REPLAY_DEBUG=1`` checks it (a sync per call).
        """
        self._check_layer(layer_id)
        _check_index_tensor("slots", slots, 1, self.device)
        _check_topk_ids(topk_ids, self.layout.top_k, self.device)
        if slots.shape[0] != topk_ids.shape[0]:
            raise InvalidRoutingInput(f"slots has {slots.shape[0]} rows but topk_ids has {topk_ids.shape[0]}")
        n_rows, valid_tensor = self._resolve_valid_rows(valid_rows, topk_ids.shape[0])
        if _DEBUG:
            _check_slots_unique(slots, topk_ids, n_rows, valid_tensor)
        if torch.compiler.is_compiling():
            torch.ops.routing_replay.record(
                self.ids, self.valid_bits, self.error_counts, slots, topk_ids, valid_tensor, layer_id,
                n_rows, self.layout.num_experts,
            )
            return
        launch_record(self._backend, self._view, self.device, layer_id, slots, topk_ids, n_rows, valid_tensor)

    def gather(self, slots: SlotsLike, report_errors: bool = True) -> GatherHandle:
        """Starts copying the rows of ``slots`` (in order) to the host; ``.wait()`` returns RoutingRows.

        Raises InvalidRoutingInput for a slot outside the recorder (on CUDA: RoutingCaptureError at
        ``wait``, the kernel skips and counts it; the row reads back as missing). With
        ``report_errors=False`` the handle reports no error counts (on CUDA its event only tells
        when the rows landed): for callers that settle the counts per forward themselves, so that
        one forward's errors are never reported as a gather's.
        """
        slots, slots_bytes = self._slots_on_device(slots)
        n = slots.shape[0]
        if self._on_cpu:
            # One native call checks the slots, allocates both outputs and fills them; torch adopts
            # the buffers through DLPack. Two torch.empty calls would cost more than a small gather.
            error, ids, valid = self._backend.gather_new(self._view, slots.data_ptr(), slots_bytes, n)
            if error is not None:
                raise_call_error(error, self.num_slots, self.layout.num_experts)
            return GatherHandle(RoutingRows(_tensor_from_capsule(ids), _tensor_from_capsule(valid)))
        rows = self._empty_rows(n, self.device)
        self._call("gather", slots, slots_bytes, rows.ids.data_ptr(), rows.valid.data_ptr())
        host = self._empty_rows(n, torch.device("cpu"), pin_memory=True)
        host.ids.copy_(rows.ids, non_blocking=True)
        host.valid.copy_(rows.valid, non_blocking=True)
        if report_errors:
            snapshot = self.error_snapshot()  # after the gather kernel: its bad slots are counted in it
        else:
            landed = torch.cuda.Event()
            landed.record(torch.cuda.current_stream(self.device))
            snapshot = ErrorSnapshot(event=landed)
        return GatherHandle(host, self if report_errors else None, snapshot, keepalive=(rows.ids, rows.valid, slots))

    def error_snapshot(self) -> ErrorSnapshot:
        """Starts copying the error counts to the host, ordered after the work queued so far on
        the current stream of the recorder's device; never syncs."""
        if self._on_cpu:
            return ErrorSnapshot()
        counts = torch.empty(self.error_counts.shape, dtype=torch.int64, pin_memory=True)
        counts.copy_(self.error_counts, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return ErrorSnapshot(counts, event)

    def take_errors(self, snapshot: ErrorSnapshot) -> dict[str, int]:
        """What ``snapshot`` counted beyond the counts reported so far, by kind, and marks it
        reported (waits for the snapshot's copy). The counts on the device only grow, so no
        count is lost to a reset racing a kernel on another stream; snapshots taken in any order
        report each error once."""
        counts = snapshot.counts()
        with self._reported_lock:
            errors = {name: counts[k] - self._reported[k] for k, name in _ERROR_NAMES.items()
                      if counts[k] > self._reported[k]}
            self._reported = [max(seen, now) for seen, now in zip(self._reported, counts)]
        return errors

    def reset(self, slots: SlotsLike) -> None:
        """Marks every layer of ``slots`` unwritten (the engine freed those KV slots). A slot outside
        the recorder raises InvalidRoutingInput on CPU; on CUDA it is skipped and counted."""
        self._call("reset", *self._slots_on_device(slots))

    def clear(self) -> None:
        """Marks every slot unwritten (e.g. after the weights that produced the rows changed)."""
        self.valid_bits.zero_()

    def copy_rows_from(self, source: RoutingRecorder, source_slots: SlotsLike, slots: SlotsLike) -> None:
        """Copies whole rows (ids and written flags) from ``source`` at ``source_slots`` to ``slots``.

        Engines stage one forward's routing by batch position and copy it once per forward to the
        slot-keyed recorder. Both recorders must share layout and device.
        """
        if source.layout != self.layout or source.device != self.device:
            raise InvalidRoutingInput(
                f"copy_rows_from needs the same layout and device: {source.layout} on {source.device} "
                f"vs {self.layout} on {self.device}"
            )
        source_slots, source_bytes = self._slots_on_device(source_slots)
        slots, slots_bytes = self._slots_on_device(slots)
        if source_slots.shape != slots.shape:
            raise InvalidRoutingInput(f"{source_slots.shape[0]} source slots but {slots.shape[0]} destination slots")
        error = self._backend.copy_rows(
            self._view, source._view, source_slots.data_ptr(), source_bytes, slots.data_ptr(), slots_bytes,
            slots.shape[0], native.stream_handle(self.device),
        )
        raise_call_error(error, self._view.num_slots, self._view.num_experts)

    def _empty_rows(self, n: int, device: torch.device, pin_memory: bool = False) -> RoutingRows:
        shape = (n, self.layout.num_layers)
        return RoutingRows(
            torch.empty((*shape, self.layout.top_k), dtype=self.layout.dtype, device=device, pin_memory=pin_memory),
            torch.empty(shape, dtype=torch.bool, device=device, pin_memory=pin_memory),
        )

    def _call(self, op: str, slots: torch.Tensor, slots_bytes: int, *outputs: int) -> None:
        error = getattr(self._backend, op)(
            self._view, slots.data_ptr(), slots_bytes, slots.shape[0], *outputs, native.stream_handle(self.device),
        )
        raise_call_error(error, self._view.num_slots, self._view.num_experts)

    def _slots_on_device(self, slots: SlotsLike) -> tuple[torch.Tensor, int]:
        """``slots`` as a contiguous 1-D index tensor on the recorder's device, and its element size."""
        if not isinstance(slots, torch.Tensor):
            slots = torch.as_tensor(list(slots), dtype=torch.int64)
        slots_bytes = _INDEX_BYTES.get(slots.dtype)
        if slots_bytes is None:
            raise InvalidRoutingInput(f"slots must be int32 or int64, got {slots.dtype}")
        if slots.dim() != 1:
            raise InvalidRoutingInput(f"slots must be 1-D, got shape {tuple(slots.shape)}")
        if slots.device != self.device:
            slots = slots.to(self.device, non_blocking=True)
        return slots.contiguous(), slots_bytes

    def _check_layer(self, layer_id: int) -> None:
        if isinstance(layer_id, bool) or not isinstance(layer_id, int):
            raise InvalidRoutingInput(f"layer_id must be an int, got {type(layer_id).__name__}")
        if not 0 <= layer_id < self.layout.num_layers:
            raise InvalidRoutingInput(f"layer_id {layer_id} is outside 0..{self.layout.num_layers - 1}")

    def _resolve_valid_rows(self, valid_rows: int | torch.Tensor | None, n: int) -> tuple[int, torch.Tensor | None]:
        if valid_rows is None:
            return n, None
        if isinstance(valid_rows, torch.Tensor):
            if valid_rows.numel() != 1:
                raise InvalidRoutingInput(f"valid_rows must hold one element, got shape {tuple(valid_rows.shape)}")
            _check_index_tensor("valid_rows", valid_rows.view(1), 1, self.device)
            return n, valid_rows
        if isinstance(valid_rows, bool) or not isinstance(valid_rows, int) or valid_rows < 0:
            raise InvalidRoutingInput(f"valid_rows must be a non-negative int or a tensor, got {valid_rows!r}")
        return min(valid_rows, n), None


def make_view(backend, ids: torch.Tensor, valid_bits: torch.Tensor, error_counts: torch.Tensor, num_experts: int):
    """The native RecorderView over a recorder's three tensors."""
    return backend.RecorderView(
        ids.data_ptr(), valid_bits.data_ptr(), error_counts.data_ptr(), ids.shape[0], ids.shape[1],
        ids.shape[2], num_experts, ids.element_size(), ids.device.index or 0,
    )


def launch_record(
    backend, view, device: torch.device, layer_id: int, slots: torch.Tensor, topk_ids: torch.Tensor,
    n_rows: int, valid_rows: torch.Tensor | None,
) -> None:
    """One native record call on validated tensors (shared by the eager path and the custom op)."""
    valid_ptr, valid_bytes = (0, 8) if valid_rows is None else (valid_rows.data_ptr(), valid_rows.element_size())
    error = backend.record(
        view, layer_id, slots.data_ptr(), slots.element_size(), topk_ids.data_ptr(), topk_ids.element_size(),
        _row_stride(topk_ids), n_rows, valid_ptr, valid_bytes, native.stream_handle(device),
    )
    raise_call_error(error, view.num_slots, view.num_experts)


def _check_slots_unique(slots: torch.Tensor, topk_ids: torch.Tensor, n_rows: int,
                        valid_rows: torch.Tensor | None) -> None:
    """Debug mode: InvalidRoutingInput when a slot repeats among the real (not padding) rows."""
    if slots.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # reading values would sync, which a capture forbids
    if valid_rows is not None:
        n_rows = max(0, min(int(valid_rows.reshape(())), n_rows))
    real = slots[:n_rows][topk_ids[:n_rows, 0] != -1]
    values, counts = real.unique(return_counts=True)
    if (counts > 1).any():
        slot = int(values[counts > 1][0])
        raise InvalidRoutingInput(f"slot {slot} appears in {int(counts[counts > 1][0])} rows of one record call "
                                  f"({DEBUG_ENV} check): each slot takes one row per call")


def raise_call_error(error: tuple[int, int, int, int], num_slots: int, num_experts: int) -> None:
    kind, row, col, value = error
    if kind == 0:
        return
    if kind == _EXPERT_OUT_OF_RANGE:
        raise InvalidRoutingInput(
            f"topk_ids[{row}, {col}] = {value} is not an expert id (valid: 0..{num_experts - 1}, or -1 for a padded row)"
        )
    if kind == _SLOT_OUT_OF_RANGE:
        raise InvalidRoutingInput(f"slots[{row}] = {value} is outside the recorder's slots 0..{num_slots - 1}")
    if kind == _PARTIAL_PADDING:
        raise InvalidRoutingInput(
            f"topk_ids row {row} mixes the padding mark -1 (column {col}) with expert ids; a padded row is all -1"
        )
    raise RuntimeError(f"native recorder returned unknown error kind {kind}")
