"""Scheduler-side recording: what ``--record-routing`` does inside each SGLang scheduler process.

Per forward, modelled on SGLang's own capturer (``sglang.srt.state_capturer``):

1. every MoE layer's top-k ids are recorded by batch position into a small *staging* recorder
   (the capture extension's graph-safe call; padded rows and rows past the forward's real token
   count are skipped);
2. after the forward, the staged rows are copied once into the slot-keyed *main* recorder at the
   forward's KV slots (``out_cache_loc_virtual`` when the pool is virtual, else ``out_cache_loc``),
   and the staging flags are cleared.

Rows are keyed by KV slot, so a radix-cached prefix keeps the rows computed when it was first
prefilled. Slots are reset when SGLang's allocator actually frees them (after a free group
closes); all rows are dropped when the weights change, so rows of older weights are never
delivered as current. When a request finishes, its rows ``[start_len, seqlen - 1)`` are gathered
(the last token has no row) and delivered: queued on the wire to the sink, and/or returned inline.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from routing_replay.capture import RoutingLayout, RoutingRecorder, RoutingRows
from routing_replay.capture.layout import moe_layer_ids
from routing_replay.sglang.options import RecordingOptions, RoutingRequest
from routing_replay.wire import RoutingMeta, RoutingSender, SenderConfig, SenderFull, token_hash
from routing_replay.wire import format as wire_format

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
    gather_deliver_s: float = 0.0

    def dump(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)


@dataclass
class _Forward:
    tokens: int
    valid_rows: int | torch.Tensor


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class SchedulerRecording:
    """The recorders, the sender and the per-request descriptors of one scheduler process."""

    def __init__(self, options: RecordingOptions, hf_config: Any, num_slots: int, max_batch: int,
                 device: str, sends: bool) -> None:
        self.options = options
        self.layout = RoutingLayout.from_hf_config(hf_config)
        self.router_of_layer = {layer: i for i, layer in enumerate(moe_layer_ids(hf_config))}
        self.main = RoutingRecorder(self.layout, num_slots, device)
        self._staging_for(max_batch)
        self.sender = self._make_sender() if sends else None
        self.descriptors: dict[str, dict] = {}
        self.forward_context: _Forward | None = None
        self.weights_dropped = 0
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

    def _staging_for(self, tokens: int) -> None:
        self.staging = RoutingRecorder(self.layout, tokens, self.main.device)
        self.positions = torch.arange(tokens, device=self.main.device)

    def status(self) -> dict:
        """Reported to the launcher at start-up: proof that recording is live in this process."""
        return {"pid": os.getpid(), "layout": [self.layout.num_layers, self.layout.top_k, self.layout.num_experts],
                "num_slots": self.main.num_slots, "bytes": self.main.nbytes}

    # ---- inside the forward ---------------------------------------------------------------------

    def run_forward(self, forward_batch: Any, run):
        slots = forward_batch.out_cache_loc_virtual
        if slots is None:
            slots = forward_batch.out_cache_loc
        if slots is None or slots.numel() == 0:
            return run()
        tokens = slots.shape[0]
        if tokens > self.staging.num_slots:
            self._staging_for(tokens)  # eager forwards only: graph batches are bounded at capture
        padded = forward_batch.num_token_non_padded
        valid = padded if isinstance(padded, torch.Tensor) and padded.device == self.main.device else tokens
        self.forward_context = _Forward(tokens, valid)
        started = time.perf_counter()
        try:
            result = run()
        finally:
            self.forward_context = None
        scatter_start = time.perf_counter()
        positions = self.positions[:tokens]
        self.main.copy_rows_from(self.staging, positions, slots)
        self.staging.reset(positions)
        if self.profile_path:
            done = time.perf_counter()
            self.profile.forwards += 1
            self.profile.forward_s += done - started
            self.profile.scatter_s += done - scatter_start
            if self.profile.forwards % 20 == 0:
                self.profile.dump(self.profile_path)
        return result

    def capture(self, layer_id: int | None, topk_ids: torch.Tensor) -> None:
        context = self.forward_context
        if context is None:
            if not _capturing_cuda_graph():
                return  # not a forward of the target model (draft model, warm-up outside forwards)
            # SGLang captures its CUDA graphs by calling the model directly, outside
            # ModelRunner.forward: record every row into the graph; each replay's run_forward
            # then copies only the forward's real rows, so padded rows never reach the recorder.
            context = _Forward(topk_ids.shape[0], topk_ids.shape[0])
        router = self.router_of_layer.get(layer_id)
        if router is None:
            raise RuntimeError(f"routing-replay: layer {layer_id} routed tokens but the model config "
                               f"says its MoE layers are {sorted(self.router_of_layer)}")
        rows = topk_ids.shape[0]
        if rows > self.staging.num_slots:
            raise RuntimeError(f"routing-replay: {rows} routed rows exceed the staging buffer of "
                               f"{self.staging.num_slots} (forward of {context.tokens} tokens)")
        started = time.perf_counter() if self.profile_path else 0.0
        self.staging.record(router, self.positions[:rows], topk_ids, valid_rows=context.valid_rows)
        if self.profile_path:
            self.profile.capture_s += time.perf_counter() - started

    # ---- lifecycle --------------------------------------------------------------------------------

    def slots_freed(self, slots: torch.Tensor) -> None:
        self.main.reset(slots)

    def weights_changed(self) -> None:
        """Rows computed by the previous weights must never be delivered as current."""
        self.main.clear()
        self.weights_dropped += 1

    # ---- delivery ---------------------------------------------------------------------------------

    def request_finished(self, req: Any, req_to_token: torch.Tensor, weight_version: str) -> None:
        params = RoutingRequest.from_custom_params(getattr(req.sampling_params, "custom_params", None))
        if params is None:
            return
        started = time.perf_counter()
        tokens = list(req.origin_input_ids) + list(req.output_ids_through_stop)
        start = min(params.start_len, max(len(tokens) - 1, 0))
        slots = req_to_token[req.kv.req_pool_idx, start : len(tokens) - 1].to(torch.int64)
        rows = self.main.gather(slots).wait()
        self.descriptors[req.rid] = self._deliver(params, params.key or req.rid, rows, tokens, start, weight_version)
        if self.profile_path:
            self.profile.requests += 1
            self.profile.gather_deliver_s += time.perf_counter() - started
            self.profile.dump(self.profile_path)

    def descriptor_for(self, req: Any) -> list:
        """The meta_info entry of a request: ``[descriptor]`` once it finished, else ``[]``."""
        if not req.finished():
            return []
        descriptor = self.descriptors.pop(req.rid, None)
        if descriptor is not None:
            return [descriptor]
        params = RoutingRequest.from_custom_params(getattr(req.sampling_params, "custom_params", None))
        if params is None:
            return []
        return [{"delivery": "failed", "error": f"request finished without routing ({req.finished_reason})"}]

    def _deliver(self, params: RoutingRequest, key: str, rows: RoutingRows, tokens: list[int], start: int,
                 weight_version: str) -> dict:
        ids = rows.ids
        missing = int((~rows.valid).sum())
        mask = None if missing == 0 else rows.valid
        payload = [memoryview(ids.numpy()).cast("B")]
        if mask is not None:
            payload.append(memoryview(mask.numpy()).cast("B"))
        descriptor = {
            "key": key, "rows": ids.shape[0], "start": start, "num_tokens": len(tokens),
            "layout": {"num_layers": self.layout.num_layers, "top_k": self.layout.top_k,
                       "num_experts": self.layout.num_experts, "dtype": wire_format.storage_dtype_name(self.layout.num_experts)},
            "bytes": ids.nbytes, "checksum": wire_format.checksum(*payload), "token_hash": token_hash(tokens),
            "weight_version": weight_version, "missing": missing,
        }
        if missing:
            log.warning("routing-replay: %s has %d unrecorded (row, layer) positions", key, missing)
        if params.inline:
            descriptor["inline"] = base64.b64encode(payload[0]).decode()
            if mask is not None:
                descriptor["inline_valid"] = base64.b64encode(payload[1]).decode()
        sink = params.sink or self.options.routing_sink
        descriptor.update(self._send(key, ids, mask, tokens, start, weight_version, sink) if sink else
                          {"delivery": "inline" if params.inline else "none"})
        return descriptor

    def _send(self, key: str, ids: torch.Tensor, mask: torch.Tensor | None, tokens: list[int], start: int,
              weight_version: str, sink: str) -> dict:
        if self.sender is None:
            return {"delivery": "not-this-rank"}
        if self.sender.reachable(sink) is False:
            return {"delivery": "failed", "sink": sink, "error": f"routing sink {sink} is unreachable"}
        meta = RoutingMeta(key, self.layout.num_experts, len(tokens), token_hash(tokens), start, weight_version)
        try:
            self.sender.send(meta, ids, sink, valid=mask, block=False)
        except SenderFull as exc:
            return {"delivery": "failed", "sink": sink, "error": str(exc)}
        return {"delivery": "queued", "sink": sink}

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
