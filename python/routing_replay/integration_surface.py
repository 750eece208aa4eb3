"""Every place where routing-replay hooks into or replaces code of SGLang, megatron-core or torch.

Data only (it imports none of them): ``SURFACE`` lists each target with the parameter names our code
passes through or relies on. ``docs/integration-surface.md`` is its table for readers, and
``tests/unit/test_integration_surface.py`` checks, in the pinned versions installed, that every
target resolves with those parameters, that the plugin registers exactly the hooks listed, that the
CPU workarounds replace exactly the attributes listed, and that the doc lists the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal[
    "hook",  # a HookRegistry AROUND hook, applied by SGLang to every process that loads plugins
    "subclass",  # a method overridden in a subclass our code hands to SGLang
    "class attribute",  # a class attribute set in that subclass
    "monkeypatch",  # an attribute of a foreign module or class replaced by our function
    "added attribute",  # an attribute set on a foreign module only where it is missing
    "dict entry",  # one entry of a foreign registry dict set
    "instance attribute",  # a method of one object replaced on that object
    "forward hook",  # torch.nn.Module.register_forward_hook on each instance
    "config",  # a configuration field our code sets and relies on
    "install-time",  # files of an installed package replaced when the environment is set up
    "stand-in",  # a method SGLang calls on an object of ours put where it expects its own
]
When = Literal[
    "always",
    "no GPU",  # only where torch sees no CUDA device
    "torch Adam",  # only where megatron-core fell back to torch's Adam (no TransformerEngine / Apex)
    "no TE",  # only where TransformerEngine is not installed (CPU or GPU)
]


@dataclass(frozen=True)
class Patch:
    target: str
    """Dotted path of what is hooked or replaced (a dict: the dict; install-time: the module)."""
    kind: Kind
    when: When
    package: str
    """The distribution that defines the target; its pinned versions are the ones tested."""
    where: str
    """Our code that does it: ``module:function``, or ``path.py:function`` outside the package."""
    why: str
    params: tuple[str, ...] | None = None
    """Leading parameter names of the target our code relies on (passes through by name or
    position); ``()`` for a callable whose parameters we pass through untouched; None for a value."""
    key: str | None = None
    """For a ``dict entry``: the key set; its current value's parameters are ``params``."""


_SRT = "sglang.srt"
_PLUGIN = "routing_replay.sglang.plugin"
_STREAMER = f"{_SRT}.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
_ALLOCATORS = f"{_SRT}.mem_cache.allocator"
_MEGATRON_CPU = "routing_replay.megatron.cpu_workarounds"
_ADAM = "routing_replay.megatron.torch_adam_fixes"
_OPTIMIZER = "megatron.core.optimizer.optimizer"
_DISTRIB = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer"
_MLA = "megatron.core.transformer.multi_latent_attention"


def _sglang_hook(target: str, where: str, why: str, params: tuple[str, ...]) -> Patch:
    return Patch(f"{_SRT}.{target}", "hook", "always", "sglang", f"{_PLUGIN}:{where}", why, params)


def _stand_in(target: str, why: str, params: tuple[str, ...]) -> Patch:
    return Patch(f"{_SRT}.state_capturer.{target}", "stand-in", "always", "sglang", f"{_PLUGIN}:RoutedExpertsRecorder",
                 why, params)


_FREE_WHY = "a slot the scheduler's KV allocator frees outside a free group loses its routing rows"
_CLEAR_WHY = "a cleared KV cache drops every routing row"
# Every token-to-KV allocator class of SGLang (under sglang.srt.mem_cache.allocator) that defines
# ``free`` / ``clear`` itself: the scheduler builds one of them (paged, token, SWA, hybrid, HiSparse,
# ...); the others serve as their sub-pools. The plugin hooks exactly these (read from here), and
# tests/unit/test_integration_surface.py checks that they cover every such class installed.
KV_ALLOCATOR_FREES = (
    "token.TokenToKVPoolAllocator", "paged.PagedTokenToKVPoolAllocator",
    "page_interleave.PageInterleavePoolAllocator", "swa.SWATokenToKVPoolAllocator",
    "swa.PureSWATokenToKVPoolAllocator", "hisparse.HiSparseTokenToKVPoolAllocator",
    "hisparse.DeepSeekV4HiSparseTokenToKVPoolAllocator", "unified_hybrid_swa.UnifiedSWAAllocatorBase",
    "unified_mamba.UnifiedMambaTokenToKVPoolAllocator", "unified_sub_pool.MultiEndedAllocator",
    "unified_sub_pool.FloatMultiEndedAllocator",
)
KV_ALLOCATOR_CLEARS = (
    "token.TokenToKVPoolAllocator", "paged.PagedTokenToKVPoolAllocator",
    "page_interleave.PageInterleavePoolAllocator", "swa.SWATokenToKVPoolAllocator",
    "swa.PureSWATokenToKVPoolAllocator", "hisparse.HiSparseTokenToKVPoolAllocator",
    "hisparse.DeepSeekV4HiSparseTokenToKVPoolAllocator", "unified_hybrid_swa.UnifiedSWAAllocatorBase",
    "unified_hybrid_swa.UnifiedMambaSWATokenToKVPoolAllocator", "unified_mamba.UnifiedMambaTokenToKVPoolAllocator",
    "unified_sub_pool.MultiEndedAllocator",
)

SGLANG: tuple[Patch, ...] = (
    _sglang_hook("server_args.ServerArgs.add_cli_args", "_add_cli_args",
                 "adds the --record-routing flags to every SGLang launcher", ("parser",)),
    _sglang_hook("server_args.ServerArgs.from_cli_args", "_from_cli_args",
                 "publishes the recording options, and refuses flags whose routing we cannot record, before "
                 "SGLang spawns its schedulers", ("cls", "args")),
    _sglang_hook("entrypoints.engine._wait_for_scheduler_ready", "_wait_for_scheduler_ready",
                 "refuses to serve when --record-routing is set and a scheduler did not report recording live",
                 ()),
    _sglang_hook("managers.tokenizer_manager.TokenizerManager._validate_one_request", "_validate_request",
                 "malformed or unservable routing parameters are an HTTP 400 on every endpoint", ("self", "obj")),
    _sglang_hook("entrypoints.api_contract.generate_contract_error", "_generate_contract_error",
                 "/generate refuses bad routing parameters before a stream starts (HTTP 400)", ("body",)),
    _sglang_hook("managers.scheduler.Scheduler.__init__", "_scheduler_init",
                 "notes the scheduler's KV allocator, whose frees reset routing rows", ("self",)),
    _sglang_hook("managers.scheduler.Scheduler.get_init_info", "_scheduler_init_info",
                 "reports the recording's status to the launcher", ("self",)),
    _sglang_hook("managers.scheduler.Scheduler.get_output_streamer_class", "_output_streamer_class",
                 "a recording scheduler streams outputs through a subclass that attaches descriptors", ("self",)),
    _sglang_hook("model_executor.model_runner.ModelRunner.init_routed_experts_capturer", "_init_capturer",
                 "builds the recording and fills the capturer slot once the model and KV pool exist, before "
                 "any CUDA graph is captured", ("self",)),
    _sglang_hook("model_executor.model_runner.ModelRunner.forward", "_model_forward",
                 "scopes each forward of the target model (not a draft worker's)", ("self", "forward_batch")),
    _stand_in("routed_experts.set_global_experts_capturer", "puts RoutedExpertsRecorder in SGLang's "
              "capturer slot, where every MoE path's capture call and SGLang's fused-path guards look",
              ("capturer",)),
    _stand_in("routed_experts.get_global_experts_capturer", "SGLang's own capturer, wrapped when it is on", ()),
    _stand_in("routed_experts.RoutedExpertsCapturer.capture", "logical expert ids per MoE layer, from every "
              "top-k path and every direct caller (fused gates, models)", ("self", "layer_id", "topk_indices")),
    _stand_in("routed_experts.RoutedExpertsCapturer.on_forward_end", "handed on to SGLang's own capturer",
              ("self", "forward_batch", "can_run_graph", "cuda_graph_batch", "no_copy_to_cpu")),
    _stand_in("routed_experts.RoutedExpertsCapturer.get_topk", "handed on to SGLang's own capturer",
              ("self", "req_pool_idx", "seqlen", "req_to_token_pool", "start_len")),
    _stand_in("routed_experts.RoutedExpertsCapturer.destroy", "handed on to SGLang's own capturer", ("self",)),
    _sglang_hook("managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
                 "._maybe_collect_routed_experts", "_request_finished",
                 "a finished request's rows are read and delivered before its KV slots are released",
                 ("self", "req")),
    _sglang_hook("managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
                 ".flush_cache_after_weight_update", "_weights_updated",
                 "rows computed by the old weights are never delivered as current",
                 ("self", "recv_req", "success", "message")),
    *(_sglang_hook(f"mem_cache.allocator.{cls}.free", "_allocator_free", _FREE_WHY, ("self", "free_index"))
      for cls in KV_ALLOCATOR_FREES),
    *(_sglang_hook(f"mem_cache.allocator.{cls}.clear", "_allocator_clear", _CLEAR_WHY, ("self",))
      for cls in KV_ALLOCATOR_CLEARS),
    Patch(f"{_STREAMER}.has_additional_customized_info", "class attribute", "always", "sglang",
          f"{_PLUGIN}:_recording_streamer", "set in the recording streamer: SGLang then asks it for customized "
          "output on every batch"),
    Patch(f"{_STREAMER}.build_additional_customized_info", "subclass", "always", "sglang",
          f"{_PLUGIN}:_recording_streamer", "attaches each finished request's descriptor to its meta_info",
          ("self", "reqs")),
    Patch(f"{_STREAMER}.is_request_level_customized_info_key", "subclass", "always", "sglang",
          f"{_PLUGIN}:_recording_streamer", "the descriptor is sent once per request, not sliced per token",
          ("self", "key")),
    Patch("sglang.kernels.ops.elementwise.elementwise.fused_gate_sigmoid_mul_add", "hook", "no GPU", "sglang",
          "routing_replay.sglang.cpu_workarounds:_gate_sigmoid_mul_add_on_cpu",
          "Qwen2-MoE's shared-expert gate is a Triton kernel: plain torch for CPU tensors",
          ("hidden_states", "gate_weight", "shared_output", "final_hidden_states")),
    Patch(f"{_SRT}.mem_cache.pool_host.common.ALLOC_MEMORY_FUNCS", "dict entry", "no GPU", "sglang",
          "routing_replay.sglang.cpu_workarounds:apply",
          "SGLang's own --enable-return-routed-experts buffer registers CUDA host memory: a plain CPU "
          "allocation instead", ("dims", "dtype", "device", "pin_memory"), key="cpu"),
)

_OPTIMIZER_WHY = ("runs under a torch function mode that sends CUDA factory calls to the CPU, makes .cuda() "
                  "the identity and names CPU float tensors by their CUDA type")
# The optimizer methods megatron-core defines that the CPU workarounds wrap (vars of each class).
_OPTIMIZER_METHODS = (
    (f"{_OPTIMIZER}.MegatronOptimizer", ("__init__", "step", "sharded_state_dict", "load_state_dict")),
    (f"{_OPTIMIZER}.MixedPrecisionOptimizer", ("__init__", "step")),
    (f"{_OPTIMIZER}.Float16OptimizerWithFloat16Params", ("__init__", "sharded_state_dict", "load_state_dict")),
    (f"{_OPTIMIZER}.FP32Optimizer", ("__init__", "step", "sharded_state_dict", "load_state_dict")),
    (f"{_OPTIMIZER}.ChainedOptimizer", ("__init__", "step", "sharded_state_dict", "load_state_dict")),
    (_DISTRIB, ("__init__", "sharded_state_dict", "load_state_dict")),
)


def _megatron_cpu(target: str, package: str, where: str, why: str, params: tuple[str, ...] | None = (),
                  kind: Kind = "monkeypatch") -> Patch:
    return Patch(target, kind, "no GPU", package, f"{_MEGATRON_CPU}:{where}", why, params)


MEGATRON: tuple[Patch, ...] = (
    Patch("megatron.core.transformer.moe.router_replay.RouterReplay.get_replay_topk", "instance attribute",
          "always", "megatron-core", "routing_replay.megatron.replay:ModelReplay",
          "each router of the trained model replays or records its own top-k (megatron-core calls it with "
          "the router's default top-k function)",
          ("self", "scores", "topk", "num_groups", "group_topk", "default_compute_topk")),
    Patch("megatron.core.transformer.moe.router.TopKRouter.forward", "forward hook", "always", "megatron-core",
          "routing_replay.megatron.replay:ModelReplay",
          "verifies each replayed forward: the routing map it returns (output 1) is the replayed one",
          ("self", "input")),
    Patch("megatron.core.transformer.transformer_config.TransformerConfig.moe_enable_routing_replay", "config",
          "always", "megatron-core", "routing_replay.megatron.hf_checkpoint:build_model",
          "gives every TopKRouter the RouterReplay instance replay wraps"),
    _megatron_cpu("torch.cuda.current_device", "torch", "apply", "RoPE and router gating ask for it: \"cpu\""),
    _megatron_cpu("torch.cuda.Stream", "torch", "apply", "the alltoall dispatcher's streams: a do-nothing stream",
                  None),
    _megatron_cpu("torch.cuda.current_stream", "torch", "apply", "the do-nothing stream"),
    _megatron_cpu("torch.cuda.stream", "torch", "apply", "a do-nothing context"),
    _megatron_cpu("torch.cuda.synchronize", "torch", "apply", "pipeline p2p synchronises the device after sends"),
    _megatron_cpu("megatron.core.transformer.moe.moe_utils.te_general_gemm", "megatron-core", "apply",
                  "referenced without TransformerEngine, defined only with it: None", None, "added attribute"),
    _megatron_cpu("megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__", "megatron-core",
                  "_allow_sequence_parallel_torch_norm",
                  "the plain-torch norm refuses sequence_parallel: built without it, weights marked sequence-parallel",
                  ("cls", "config")),
    _megatron_cpu("torch.distributed.all_to_all_single", "torch", "_all_to_all_with_list_splits",
                  "gloo rejects tensor split sizes: turned into lists",
                  ("output", "input", "output_split_sizes", "input_split_sizes", "group", "async_op")),
    _megatron_cpu("megatron.core.tensor_parallel.random._get_cuda_rng_state", "megatron-core",
                  "_cpu_rng_state_for_recompute", "activation recompute saves the CPU generator's state instead"),
    _megatron_cpu("megatron.core.tensor_parallel.random._set_cuda_rng_state", "megatron-core",
                  "_cpu_rng_state_for_recompute", "activation recompute restores the CPU generator's state instead",
                  ("new_state",)),
    *(_megatron_cpu(f"{cls}.{method}", "megatron-core", "_optimizers_on_cpu", _OPTIMIZER_WHY)
      for cls, methods in _OPTIMIZER_METHODS for method in methods),
    *(Patch(f"{_MLA}.{name}", "monkeypatch", "no TE", "megatron-core",
            "routing_replay.megatron.without_transformer_engine:multi_latent_attention_knows_te_is_absent",
            "the module takes TransformerEngine's mock classes for real ones (MLA then fails): what its own "
            "ImportError branch sets")
      for name in ("HAVE_TE", "TEColumnParallelLinear", "TELinear", "Linear", "set_save_original_input")),
    Patch(f"{_DISTRIB}.sharded_state_dict", "monkeypatch", "torch Adam", "megatron-core",
          f"{_ADAM}:_fresh_state_for_loading",
          "a fresh optimizer has no Adam state to build its load template from: zero state first",
          ("self", "model_sharded_state_dict", "is_loading")),
    Patch(f"{_DISTRIB}._set_main_param_and_optimizer_states", "monkeypatch", "torch Adam", "megatron-core",
          f"{_ADAM}:_copy_states_without_step",
          "loading copied the template's step 0 over the restored step: tensors only, step kept",
          ("self", "model_param", "tensors")),
    Patch(f"{_DISTRIB}.load_state_dict", "monkeypatch", "torch Adam", "megatron-core",
          f"{_ADAM}:_unshared_steps_after_load",
          "every parameter shared one step tensor after a load: each gets its own", ("self", "state_dict")),
)

INSTALL: tuple[Patch, ...] = (
    Patch("torchvision._meta_registrations", "install-time", "no GPU", "torchvision",
          "cpu_workarounds/apply.py:neutralise_torchvision_registrations",
          "the CUDA torchvision wheel's op registrations fail against CPU torch: file emptied"),
    Patch("torchvision._autograd_registrations", "install-time", "no GPU", "torchvision",
          "cpu_workarounds/apply.py:neutralise_torchvision_registrations",
          "as above: file emptied"),
    Patch("sgl_kernel", "install-time", "no GPU", "sglang", "cpu_workarounds/apply.py:install_sgl_kernel_stub",
          "no CPU build of sgl_kernel on PyPI: a stub package SGLang's CPU path imports"),
)

SURFACE: tuple[Patch, ...] = SGLANG + MEGATRON + INSTALL
