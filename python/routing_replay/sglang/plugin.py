"""The SGLang plugin: ``register()`` is the ``sglang.srt.plugins`` entry point.

SGLang calls it in every one of its processes before it parses arguments or builds a scheduler.
It registers AROUND hooks (``HookRegistry``); each acts only in the process where its target runs:

launcher   ``ServerArgs.add_cli_args`` / ``from_cli_args``: the ``--record-routing`` flags;
           ``engine._wait_for_scheduler_ready``: refuses to serve when recording was asked for but
           a scheduler did not report it live (SGLang logs and ignores a failing plugin or hook).
tokenizer  ``TokenizerManager._validate_one_request`` (every endpoint) and ``/generate``'s
           ``generate_contract_error`` (before a stream starts): a request asking for routing from
           a server that is not recording, or with malformed parameters, gets HTTP 400.
scheduler  ``Scheduler.__init__`` builds the recording and wraps the KV allocator's frees;
           ``Scheduler.get_init_info`` reports it; ``ModelRunner.forward`` scopes each forward;
           ``capture_routed_experts_if_allowed`` is SGLang's single capture site for every MoE
           backend (logical expert ids, before the expert-location remap); the result processor's
           ``_maybe_collect_routed_experts`` runs when a request finishes, before its KV is released;
           the output streamer attaches the descriptor to ``meta_info["routing_replay"]``; the weight
           updater's ``flush_cache_after_weight_update`` drops rows of the old weights.
           None of these lets an exception of ours into the scheduler (``SchedulerRecording.attempt``).
"""

from __future__ import annotations

import logging
from typing import Any

from routing_replay.sglang import options as opts

log = logging.getLogger("routing_replay.sglang")

META_KEY = opts.REQUEST_KEY
_TARGETS = "sglang.srt"
_recording = None  # the SchedulerRecording of this process, when it is a recording scheduler


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from routing_replay.sglang import cpu_workarounds

    cpu_workarounds.apply()
    hooks = {
        "server_args.ServerArgs.add_cli_args": _add_cli_args,
        "server_args.ServerArgs.from_cli_args": _from_cli_args,
        "entrypoints.engine._wait_for_scheduler_ready": _wait_for_scheduler_ready,
        "managers.tokenizer_manager.TokenizerManager._validate_one_request": _validate_request,
        "entrypoints.api_contract.generate_contract_error": _generate_contract_error,
        "managers.scheduler.Scheduler.__init__": _scheduler_init,
        "managers.scheduler.Scheduler.get_init_info": _scheduler_init_info,
        "model_executor.model_runner.ModelRunner.forward": _model_forward,
        "layers.moe.topk.capture_routed_experts_if_allowed": _capture,
        "managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
        "._maybe_collect_routed_experts": _request_finished,
        "managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
        ".build_additional_customized_info": _customized_info,
        "managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
        ".is_request_level_customized_info_key": _request_level_key,
        "managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
        ".flush_cache_after_weight_update": _weights_updated,
    }
    for target, hook in hooks.items():
        HookRegistry.register(f"{_TARGETS}.{target}", hook, HookType.AROUND)


# ---- launcher -------------------------------------------------------------------------------------


def _add_cli_args(original, parser):
    original(parser)
    opts.add_arguments(parser)


def _from_cli_args(original, cls, args):
    opts.publish(opts.from_namespace(args))  # before SGLang spawns its scheduler processes
    return original(cls, args)


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
    original(self, *args, **kwargs)
    options = opts.current()
    if not options.record_routing:
        return
    global _recording
    from sglang.srt.runtime_context import get_parallel

    from routing_replay.sglang.recording import SchedulerRecording

    allocator = self.token_to_kv_pool_allocator
    check_router_layers(self.tp_worker.model_runner.model, self.model_config.hf_text_config)
    _recording = SchedulerRecording(
        options, self.model_config.hf_text_config, num_slots=allocator.size + allocator.page_size,
        max_batch=max(self.max_running_requests, getattr(self, "chunked_prefill_size", 0) or 0, 8192),
        device=self.device, sends=get_parallel().attn_tp_rank == 0,  # one sender per data-parallel group
    )
    _watch_frees(allocator, _recording)
    enable_customized_output()


def check_router_layers(model: Any, hf_config: Any) -> None:
    """Routing rows are indexed by the checkpoint's MoE layers (what the trainer builds); refuse to
    record when SGLang's model routes other layers (e.g. it ignores ``mlp_only_layers``)."""
    from sglang.srt.layers.moe.topk import TopK

    from routing_replay.capture.layout import moe_layer_ids

    engine = sorted({m.layer_id for m in model.modules() if isinstance(m, TopK) and not getattr(m, "is_draft", False)})
    checkpoint = moe_layer_ids(hf_config)
    if engine != checkpoint:
        raise RuntimeError(
            f"routing-replay: SGLang routes layers {engine} but the checkpoint's config has MoE layers "
            f"{checkpoint}; rows could not be matched to the trainer's routers, so recording is refused"
        )


def _watch_frees(allocator: Any, recording: Any) -> None:
    """Resets routing rows when the allocator really frees slots. Inside a free group SGLang only
    queues frees; ``free_group_end`` frees them through ``free`` again with the group closed."""
    free, clear = allocator.free, allocator.clear

    def free_and_reset(free_index, *args, **kwargs):
        if allocator.free_group is None:
            recording.slots_freed(free_index)
        return free(free_index, *args, **kwargs)

    def clear_and_reset(*args, **kwargs):
        recording.cache_cleared()
        return clear(*args, **kwargs)

    allocator.free, allocator.clear = free_and_reset, clear_and_reset


def _scheduler_init_info(original, self, *args, **kwargs):
    info = original(self, *args, **kwargs)
    if _recording is not None:
        info[META_KEY] = _recording.status()
    return info


def _model_forward(original, self, forward_batch, *args, **kwargs):
    if _recording is None or self.is_draft_worker:
        return original(self, forward_batch, *args, **kwargs)
    return _recording.run_forward(forward_batch, lambda: original(self, forward_batch, *args, **kwargs))


def _capture(original, topk_config, layer_id, topk_ids, *args, **kwargs):
    original(topk_config, layer_id, topk_ids, *args, **kwargs)
    if _recording is not None and topk_config.allow_routed_experts_capture:
        _recording.capture(layer_id, topk_ids)


def _request_finished(original, self, req, *args, **kwargs):
    original(self, req, *args, **kwargs)
    if _recording is not None:
        _recording.request_finished(req, self.req_to_token_pool, _weight_version)


def _weight_version() -> str:
    from sglang.srt.runtime_context import get_serving

    return str(get_serving().weight_version)


def _customized_info(original, self, reqs, *args, **kwargs):
    info = original(self, reqs, *args, **kwargs)
    return info if _recording is None else _recording.with_descriptors(info, reqs)


def _request_level_key(original, self, key, *args, **kwargs):
    return key == META_KEY or original(self, key, *args, **kwargs)


def _weights_updated(original, self, recv_req, success, message, *args, **kwargs):
    if _recording is not None and success:
        _recording.weights_changed()
    return original(self, recv_req, success, message, *args, **kwargs)


def enable_customized_output() -> None:
    """Makes SGLang's output streamer call ``build_additional_customized_info`` (off by default)."""
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    SchedulerOutputStreamer.has_additional_customized_info = True
