"""The SGLang plugin: ``register()`` is the ``sglang.srt.plugins`` entry point.

SGLang calls it in every one of its processes before it parses arguments or builds a scheduler.
It applies the CPU workarounds there (``cpu_workarounds.apply``, only without a GPU: the one place
SGLang processes get them) and registers AROUND hooks (``HookRegistry``); besides them only SGLang's
routed-experts capturer slot is filled, in a recording scheduler. Each hook acts only in the process where its target runs (every target, with the
signature it relies on, is listed in ``docs/integration-surface.md``):

launcher   ``ServerArgs.add_cli_args`` / ``from_cli_args``: the ``--record-routing`` flags, and
           refuses flags whose routing cannot be recorded (``refusals.check_server_args``);
           ``engine._wait_for_scheduler_ready``: refuses to serve when recording was asked for but
           a scheduler did not report it live (SGLang logs and ignores a failing plugin or hook).
tokenizer  ``TokenizerManager._validate_one_request`` (every endpoint) and ``/generate``'s
           ``generate_contract_error`` (before a stream starts): a request asking for routing from
           a server that is not recording, or with malformed parameters, gets HTTP 400.
scheduler  ``ModelRunner.init_routed_experts_capturer`` (the target model's, once the model and KV
           pool exist, before any CUDA graph is captured) refuses models and server flags we cannot
           record (``refusals``), builds the recording and puts ``RoutedExpertsRecorder`` in
           SGLang's routed-experts capturer slot: every capture call of every MoE path reaches it,
           and it hands them on to SGLang's own capturer when that is on too;
           ``Scheduler.__init__`` notes the KV allocator; ``Scheduler.get_init_info`` reports the
           recording; ``Scheduler.get_output_streamer_class`` picks an output streamer that attaches
           the descriptor to ``meta_info["routing_replay"]``; the KV allocators' ``free`` / ``clear``
           reset the rows of slots the scheduler's allocator frees; ``ModelRunner.forward`` scopes
           each forward; the result processor's ``_maybe_collect_routed_experts`` runs when a
           request finishes, before its KV is released; the weight updater's
           ``flush_cache_after_weight_update`` drops rows of the old weights.
           None of these lets an exception of ours into the scheduler (``SchedulerRecording.attempt``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from routing_replay.integration_surface import KV_ALLOCATOR_CLEARS, KV_ALLOCATOR_FREES
from routing_replay.sglang import options as opts

log = logging.getLogger("routing_replay.sglang")

META_KEY = opts.REQUEST_KEY
_TARGETS = "sglang.srt"
_recording = None  # the SchedulerRecording of this process, when it is a recording scheduler
_allocator = None  # the scheduler's KV allocator, whose frees reset routing rows

_ALLOCATOR = "mem_cache.allocator"  # the KV allocator classes the surface names live below it


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from routing_replay.sglang import cpu_workarounds

    cpu_workarounds.apply()
    for target, hook in _hooks().items():
        HookRegistry.register(f"{_TARGETS}.{target}", hook, HookType.AROUND)


def _hooks() -> dict[str, Any]:
    """Each AROUND hook of the plugin by its target, relative to ``sglang.srt``."""
    return {
        "server_args.ServerArgs.add_cli_args": _add_cli_args,
        "server_args.ServerArgs.from_cli_args": _from_cli_args,
        "entrypoints.engine._wait_for_scheduler_ready": _wait_for_scheduler_ready,
        "managers.tokenizer_manager.TokenizerManager._validate_one_request": _validate_request,
        "entrypoints.api_contract.generate_contract_error": _generate_contract_error,
        "managers.scheduler.Scheduler.__init__": _scheduler_init,
        "managers.scheduler.Scheduler.get_init_info": _scheduler_init_info,
        "managers.scheduler.Scheduler.get_output_streamer_class": _output_streamer_class,
        "model_executor.model_runner.ModelRunner.init_routed_experts_capturer": _init_capturer,
        "model_executor.model_runner.ModelRunner.forward": _model_forward,
        "managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
        "._maybe_collect_routed_experts": _request_finished,
        "managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
        ".flush_cache_after_weight_update": _weights_updated,
        **{f"{_ALLOCATOR}.{cls}.free": _allocator_free for cls in KV_ALLOCATOR_FREES},
        **{f"{_ALLOCATOR}.{cls}.clear": _allocator_clear for cls in KV_ALLOCATOR_CLEARS},
    }


# ---- launcher -------------------------------------------------------------------------------------


def _add_cli_args(original, parser):
    original(parser)
    opts.add_arguments(parser)


def _from_cli_args(original, cls, args):
    from routing_replay.sglang.refusals import RecordingRefused, check_server_args

    options = opts.from_namespace(args)
    server_args = original(cls, args)
    if options.record_routing:
        try:  # at once, in the launcher: a refused flag never starts a scheduler
            check_server_args(server_args)
        except RecordingRefused as exc:
            raise SystemExit(str(exc)) from None
    opts.publish(options)  # before SGLang spawns its scheduler processes
    return server_args


def _wait_for_scheduler_ready(original, *args, **kwargs):
    infos = original(*args, **kwargs)
    if opts.current().record_routing:
        silent = [i for i, info in enumerate(infos) if META_KEY not in info]
        if silent:
            raise RuntimeError(
                f"--record-routing is set but routing-replay is not active in scheduler(s) {silent}: "
                "the plugin or one of its hooks failed to load there (see the log above); refusing to "
                "serve without routing"
            )
        log.info("routing-replay: recording live in %d scheduler(s): %s", len(infos), [i[META_KEY] for i in infos])
    return infos


# ---- tokenizer ------------------------------------------------------------------------------------


def _validate_request(original, self, obj, *args, **kwargs):
    # our RoutingRequestError is a ValueError: SGLang answers HTTP 400 with its message
    _check_routing([_custom_params(getattr(obj, "sampling_params", None))], [getattr(obj, "rid", None)])
    return original(self, obj, *args, **kwargs)


def _generate_contract_error(original, body):
    """``/generate`` answers a stream with HTTP 200 before the tokenizer validates it (a refusal
    then arrives as an event inside the stream) but runs this check before: refused here, every
    ``/generate`` request with bad routing parameters, streamed or not, is an HTTP 400."""
    error = original(body)
    if error is not None or not isinstance(body, dict):
        return error
    try:
        _check_routing([_custom_params(sampling) for sampling in _listed(body.get("sampling_params"))],
                       _listed(body.get("rid")))
    except opts.RoutingRequestError as exc:
        return str(exc)
    return None


def _check_routing(custom_params: list, rids: list) -> None:
    """RoutingRequestError unless this server can serve the routing asked for with these
    ``custom_params``; ``rids`` are the requests' ids, the key of those that give none."""
    options = opts.current()
    requests = [opts.servable_request(custom, options) for custom in custom_params]
    if any(request is not None and request.key is None for request in requests):
        for rid in rids:
            if isinstance(rid, str):  # else SGLang assigns one, or refuses the request itself
                opts.RoutingRequest().delivery_key(rid)


def _listed(value: Any) -> list:
    """A batch field of a ``/generate`` body (one value, or one per request) as a list."""
    return value if isinstance(value, list) else [value]


def _custom_params(sampling: Any) -> Any:
    return sampling.get("custom_params") if isinstance(sampling, dict) else None


# ---- scheduler ------------------------------------------------------------------------------------


def _scheduler_init(original, self, *args, **kwargs):
    """Notes the scheduler's KV allocator, whose frees reset rows (the recording itself was built
    while the model runner initialised, see ``_init_capturer``)."""
    original(self, *args, **kwargs)
    global _allocator
    if _recording is not None:
        _allocator = self.token_to_kv_pool_allocator


def _init_capturer(original, self, *args, **kwargs):
    """Builds the recording and takes SGLang's routed-experts capturer slot. SGLang calls this once
    the model and KV pool exist and before it captures any CUDA graph, so the graphs record, every
    caller of the capturer (top-k, fused gates, models that call it directly) reaches us, and the
    fused paths SGLang takes only without a capturer stay off. A draft worker keeps none."""
    original(self, *args, **kwargs)
    options = opts.current()
    if not options.record_routing or self.is_draft_worker:
        return
    global _recording
    from sglang.srt.model_executor.runner_utils.capture_mode import get_is_capture_mode
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer, set_global_experts_capturer

    from routing_replay.sglang.recording import SchedulerRecording, staging_rows
    from routing_replay.sglang.refusals import check_model

    model, hf_config, server_args = self.model, self.model_config.hf_text_config, self.server_args
    check_model(model, hf_config, server_args)
    if _recording is not None:  # a re-initialised model runner: its rows and graphs start afresh
        _recording.close()
    allocator = self.token_to_kv_pool_allocator
    _recording = SchedulerRecording(
        options, hf_config, num_slots=allocator.size + allocator.page_size,
        max_batch=staging_rows(self.max_running_requests, server_args.chunked_prefill_size,
                               server_args.speculative_num_draft_tokens),
        device=self.device, sends=get_parallel().attn_tp_rank == 0,  # one sender per data-parallel group
        fused_shared_experts=model.shared_experts_config.num_fused_shared_experts,
        in_graph_capture=get_is_capture_mode,
    )
    set_global_experts_capturer(RoutedExpertsRecorder(get_global_experts_capturer(), _recording))


class RoutedExpertsRecorder:
    """What SGLang finds in its routed-experts capturer slot while we record: it records every
    ``capture`` call and hands all calls on to SGLang's own capturer when that is on too
    (``--enable-return-routed-experts``), which then works as without us."""

    def __init__(self, sglang_capturer: Any, recording: Any) -> None:
        self.sglang_capturer = sglang_capturer
        self.recording = recording

    def capture(self, layer_id: int, topk_indices: Any) -> None:
        if self.sglang_capturer is not None:
            self.sglang_capturer.capture(layer_id=layer_id, topk_indices=topk_indices)
        self.recording.capture(layer_id, topk_indices)

    def on_forward_end(self, **kwargs: Any) -> Any:
        return None if self.sglang_capturer is None else self.sglang_capturer.on_forward_end(**kwargs)

    def get_topk(self, **kwargs: Any) -> Any:
        return None if self.sglang_capturer is None else self.sglang_capturer.get_topk(**kwargs)

    def destroy(self) -> None:
        if self.sglang_capturer is not None:
            self.sglang_capturer.destroy()

    def __repr__(self) -> str:
        inner = type(self.sglang_capturer).__name__ if self.sglang_capturer is not None else "none"
        return f"RoutedExpertsRecorder(SGLang's own capturer: {inner})"


def _allocator_free(original, self, free_index, *args, **kwargs):
    """Resets routing rows when the scheduler's allocator really frees slots. Inside a free group
    SGLang only queues frees; ``free_group_end`` frees them through ``free`` again with the group
    closed. A subclass's ``free`` that calls another hooked ``free`` resets the same rows twice
    (harmless: a reset row stays reset)."""
    if _recording is not None and self is _allocator and self.free_group is None:
        _recording.slots_freed(free_index)
    return original(self, free_index, *args, **kwargs)


def _allocator_clear(original, self, *args, **kwargs):
    if _recording is not None and self is _allocator:
        _recording.cache_cleared()
    return original(self, *args, **kwargs)


def _scheduler_init_info(original, self, *args, **kwargs):
    info = original(self, *args, **kwargs)
    if _recording is not None:
        from sglang.srt.state_capturer.routed_experts import get_global_experts_capturer

        info[META_KEY] = {**_recording.status(), "capturer": repr(get_global_experts_capturer())}
    return info


def _output_streamer_class(original, self, *args, **kwargs):
    """SGLang's streamer class, or (recording) a subclass that opts in to customized output: SGLang
    calls it while ``Scheduler.__init__`` runs, before the recording exists, so the options decide."""
    base = original(self, *args, **kwargs)
    return _recording_streamer(base) if opts.current().record_routing else base


@functools.cache
def _recording_streamer(base: type) -> type:
    """``base`` with ``has_additional_customized_info`` on (SGLang then calls
    ``build_additional_customized_info`` on every output batch): each finished request's descriptor
    is attached once, not sliced per token."""

    class RoutingReplayOutputStreamer(base):
        __slots__ = ()  # SGLang's streamer is a slots dataclass
        has_additional_customized_info = True

        def build_additional_customized_info(self, reqs: list) -> dict[str, list]:
            info = super().build_additional_customized_info(reqs)
            return info if _recording is None else _recording.with_descriptors(info, reqs)

        def is_request_level_customized_info_key(self, key: str) -> bool:
            return key == META_KEY or super().is_request_level_customized_info_key(key)

    return RoutingReplayOutputStreamer


def _model_forward(original, self, forward_batch, *args, **kwargs):
    if _recording is None or self.is_draft_worker:
        return original(self, forward_batch, *args, **kwargs)
    return _recording.run_forward(forward_batch, lambda: original(self, forward_batch, *args, **kwargs))


def _request_finished(original, self, req, *args, **kwargs):
    original(self, req, *args, **kwargs)
    if _recording is not None:
        _recording.request_finished(req, self.req_to_token_pool, _weight_version)


def _weight_version() -> str:
    from sglang.srt.runtime_context import get_serving

    return str(get_serving().weight_version)


def _weights_updated(original, self, recv_req, success, message, *args, **kwargs):
    if _recording is not None and success:
        _recording.weights_changed()
    return original(self, recv_req, success, message, *args, **kwargs)
