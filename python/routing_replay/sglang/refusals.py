"""What ``--record-routing`` cannot record, refused before SGLang serves.

The plugin sees routing where SGLang calls its routed-experts capturer (the plugin holds that slot:
``plugin.RoutedExpertsRecorder``) with a forward's rows in batch order. Some SGLang paths never call
it (the routing stays inside a kernel, or a model routes on its own) and some call it with rows
that are not this scheduler's batch (gathered from every attention-DP rank, one rank's slice, one
micro-batch). On those paths a recording would be silently empty or silently wrong, so a server
asked to record refuses to start, naming the flag, format or module and what to run instead.

``PATHS`` is every path as data (``docs/sglang.md``'s "Paths" table mirrors it, checked by
``tests/unit/test_sglang_refusals.py``). ``check_server_args`` reads the launcher's ServerArgs
(the plugin calls it before SGLang spawns schedulers, and again on the resolved arguments in each
scheduler); ``check_model`` reads the loaded model in each scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["recorded", "refused", "not applicable"]


@dataclass(frozen=True)
class RoutingPath:
    name: str
    """The flag, top-k output format or SGLang module, as a reader finds it."""
    status: Status
    why: str
    instead: str = ""
    """For a refused path: what to run instead (every refusal message names it)."""


class RecordingRefused(RuntimeError):
    """``--record-routing`` asked for on a path whose routing we cannot record."""

    def __init__(self, path: RoutingPath, detail: str = "") -> None:
        self.path = path
        where = f" ({detail})" if detail else ""
        super().__init__(f"routing-replay: --record-routing cannot record {path.name}{where}: {path.why}; "
                         f"instead: {path.instead}")


def _refused(name: str, why: str, instead: str) -> RoutingPath:
    return RoutingPath(name, "refused", why, instead)


# ---- server arguments (checked in the launcher, then on the resolved arguments in each scheduler) --

DP_ATTENTION = _refused(
    "--attn-dp-size N > 1 (or --enable-dp-attention)",
    "with data-parallel attention the capture receives the rows gathered from every attention-DP "
    "rank, so each rank but the first would store rank 0's rows as its own",
    "--dp-size N (independent replicas, each recorded by its own scheduler)")
A2A_BACKEND = _refused(
    "--moe-a2a-backend other than none (DeepEP and every other all-to-all backend)",
    "tokens are dispatched between ranks: with attention-TP > 1 each rank's top-k covers only its "
    "own slice of the batch, and the mega-MoE gate (--moe-a2a-backend megamoe) writes its ids into "
    "the dispatch buffer without calling the capture",
    "--moe-a2a-backend none (experts split by --tp-size / --ep-size without all-to-all)")
TWO_BATCH_OVERLAP = _refused(
    "--enable-two-batch-overlap",
    "the capture is called once per micro-batch with that micro-batch's rows, which would be "
    "stored at the whole batch's positions",
    "leave two-batch overlap off")
PD_DISAGGREGATION = _refused(
    "--disaggregation-mode prefill or decode",
    "a prefill server hands each request to the decode server, so the hook that delivers a "
    "finished request's routing never fires there; a decode server never ran the prompt's forward, "
    "so its records would lack every prompt row",
    "one server that prefills and decodes (--disaggregation-mode null)")
PIPELINE_PARALLEL = _refused(
    "--pp-size > 1",
    "each pipeline stage's scheduler runs only its own layers, while a routing record holds every "
    "MoE layer of the model",
    "--tp-size / --ep-size (every scheduler runs every layer)")
CONTEXT_PARALLEL = _refused(
    "--attn-cp-size > 1",
    "prefill context parallelism splits a sequence's tokens across ranks, so a rank's capture "
    "would not hold every position of its requests (not verified otherwise)",
    "--attn-cp-size 1")
LAYERNORM_SP = _refused(
    "--enable-layernorm-sp",
    "during prefill the MoE runs on sequence-sharded tokens, so each rank captures only its shard",
    "leave --enable-layernorm-sp off")
TRITON_KERNEL_RUNNER = _refused(
    "--moe-runner-backend triton_kernel (given, or SGLang's choice for auto, e.g. for gpt-oss)",
    "its TopK returns the TRITON_KERNEL format: the routing kernel's output never passes the capture",
    "--moe-runner-backend triton (or another backend that takes SGLang's standard top-k ids)")

# ---- the loaded model (checked in each scheduler) ---------------------------------------------------

TRITON_KERNEL_FORMAT = _refused(
    "top-k output format TRITON_KERNEL",
    "the routing kernel's output (gather/scatter indices) never passes the capture",
    "--moe-runner-backend triton (or another backend that takes SGLang's standard top-k ids)")
BYPASSED_FORMAT = _refused(
    "top-k output format BYPASSED (e.g. flashinfer_trtllm on DeepSeek-style routing, "
    "flashinfer_mxfp4, MiMo-V2's fused gate)",
    "the MoE kernel routes from the router logits itself, so the top-k ids are never materialized "
    "for the capture",
    "a --moe-runner-backend that takes SGLang's standard top-k ids, e.g. triton, deep_gemm or "
    "flashinfer_cutlass where the checkpoint's quantization allows")
PACKED_FORMAT = _refused(
    "top-k output format PACKED",
    "expert ids and weights travel packed for FlashInfer's routed MoE and never pass the capture",
    "a --moe-runner-backend that takes SGLang's standard top-k ids")
HASH_TOPK = _refused(
    "HashTopK layers (hash-routed MoE, e.g. DeepSeek-V4)",
    "experts are looked up from the token id (tid2eid) without passing the capture",
    "a model without hash-routed layers")
OWN_ROUTING = _refused(
    "a MoE layer routed outside SGLang's TopK (its own torch.topk, e.g. QuantMixtralForCausalLM, "
    "ZAYA, or experts with no TopK in their layer)",
    "its top-k never passes the capture",
    "a model whose MoE layers route through SGLang's TopK")
OWN_CAPTURE = _refused(
    "a MoE gate that calls SGLang's capturer itself (Inkling's InklingGate, Muse Spark's MoE)",
    "its calls reach the capturer slot we hold (and it leaves its fused gate while the slot is "
    "filled), but it routes outside SGLang's TopK, so the layer map cannot be checked, and the "
    "trainer has no model family for it (routing_replay.models): never verified",
    "a model whose MoE layers route through SGLang's TopK")
LAYER_MAP = _refused(
    "a model whose routed layers differ from the checkpoint's MoE layers",
    "routing rows are indexed by the checkpoint's MoE layers (the trainer's routers), e.g. SGLang's "
    "Qwen3-MoE ignores mlp_only_layers",
    "a checkpoint whose MoE layers SGLang routes as its config says")

PATHS: tuple[RoutingPath, ...] = (
    RoutingPath("top-k output format STANDARD (every TopK that select_experts serves: softmax, sigmoid, "
                "grouped, biased, custom routing functions, CPU)", "recorded",
                "select_experts passes each layer's logical ids to the capture site before the EPLB remap"),
    TRITON_KERNEL_FORMAT, BYPASSED_FORMAT, PACKED_FORMAT, TRITON_KERNEL_RUNNER,
    HASH_TOPK, OWN_ROUTING, OWN_CAPTURE, LAYER_MAP,
    RoutingPath("mega-MoE gate (SGLANG_OPT_DEEPGEMM_MEGA_GATE)", "refused",
                "SGLang takes it only while its capturer slot is empty, which it never is while we "
                "record; with --moe-a2a-backend megamoe its ids would skip the capture in the dispatch "
                "buffer, and every all-to-all backend is refused", A2A_BACKEND.instead),
    DP_ATTENTION, A2A_BACKEND, TWO_BATCH_OVERLAP, PD_DISAGGREGATION, PIPELINE_PARALLEL, CONTEXT_PARALLEL,
    LAYERNORM_SP,
    RoutingPath("--tp-size N, --ep-size N without all-to-all", "recorded",
                "every rank routes the whole batch; one sender per data-parallel group "
                "(attention-TP rank 0) delivers"),
    RoutingPath("--dp-size N (replicas)", "recorded", "each replica's scheduler records its own requests"),
    RoutingPath("EPLB / expert-location remap", "recorded",
                "the capture site receives logical expert ids, before the remap to physical slots"),
    RoutingPath("CUDA graphs", "recorded",
                "the recording exists before SGLang captures its graphs, so the capture runs inside "
                "them; each replay copies only the forward's real rows (not yet run on a GPU)"),
    RoutingPath("speculative decoding: the draft model", "not applicable",
                "the draft's TopK opts out (allow_routed_experts_capture), so only the target's routing "
                "is recorded; speculative decoding itself is not tested here"),
)

_OWN_ROUTING_CLASSES = {  # SGLang 0.5.23 MoE blocks that pick experts with their own torch.topk
    "sglang.srt.models.mixtral_quant.MixtralMoE": "QuantMixtralForCausalLM's MixtralMoE",
    "sglang.srt.models.zaya.ZayaRouter": "ZAYA's ZayaRouter",
}
_OWN_CAPTURE_CLASSES = {  # ... and those that call the capturer themselves
    "sglang.srt.models.inkling_common.moe.InklingGate": "Inkling's InklingGate",
    "sglang.srt.models.muse_spark.MuseSpark1xMoE": "Muse Spark's MuseSpark1xMoE",
}
OWN_ROUTING_CLASSES = tuple(_OWN_ROUTING_CLASSES) + tuple(_OWN_CAPTURE_CLASSES)
"""Every SGLang class refused by name (a test checks each still exists in the installed SGLang)."""


def check_server_args(server_args: Any) -> None:
    """RecordingRefused naming the first flag whose routing we cannot record. Reads the values
    SGLang resolved so far (a raw ServerArgs in the launcher, the resolved one in a scheduler)."""
    from sglang.srt.arg_groups.model_override_base import resolving_view

    args = resolving_view(server_args)
    if args.enable_dp_attention or args.attn_dp_size > 1:
        given = "--enable-dp-attention" if args.enable_dp_attention else f"--attn-dp-size {args.attn_dp_size}"
        raise RecordingRefused(DP_ATTENTION, given)
    if args.moe_a2a_backend != "none":
        raise RecordingRefused(A2A_BACKEND, f"--moe-a2a-backend {args.moe_a2a_backend}")
    if args.enable_two_batch_overlap:
        raise RecordingRefused(TWO_BATCH_OVERLAP)
    if args.disaggregation_mode != "null":
        raise RecordingRefused(PD_DISAGGREGATION, f"--disaggregation-mode {args.disaggregation_mode}")
    if args.pp_size > 1:
        raise RecordingRefused(PIPELINE_PARALLEL, f"--pp-size {args.pp_size}")
    if args.attn_cp_size > 1:
        raise RecordingRefused(CONTEXT_PARALLEL, f"--attn-cp-size {args.attn_cp_size}")
    if args.enable_layernorm_sp:
        raise RecordingRefused(LAYERNORM_SP)
    if args.moe_runner_backend == "triton_kernel":
        raise RecordingRefused(TRITON_KERNEL_RUNNER)


def check_model(model: Any, hf_config: Any, server_args: Any) -> None:
    """RecordingRefused when the loaded ``model`` (this scheduler's target model) routes a layer
    where we cannot see it, or when SGLang's resolved ``server_args`` do; then ``check_router_layers``.

    Runs after the model is built: every TopK's output format is then what SGLang decided for this
    model, GPU and runner backend (``TopK.bind_runner_backend`` or the model itself set it)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.hash_topk import HashTopK
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

    check_server_args(server_args)
    modules = [m for m in model.modules() if not getattr(m, "is_draft", False)]
    for module in modules:
        name = f"{type(module).__module__}.{type(module).__qualname__}"
        if name in _OWN_CAPTURE_CLASSES:
            raise RecordingRefused(OWN_CAPTURE, f"{_OWN_CAPTURE_CLASSES[name]}{_layer_of(module)}")
        if name in _OWN_ROUTING_CLASSES:
            raise RecordingRefused(OWN_ROUTING, f"{_OWN_ROUTING_CLASSES[name]}{_layer_of(module)}")
    hashed = sorted({m.layer_id for m in modules if isinstance(m, HashTopK)})
    if hashed:
        raise RecordingRefused(HASH_TOPK, f"layers {hashed}")
    topks = [m for m in modules if isinstance(m, TopK)]
    refused_formats = {TopKOutputFormat.TRITON_KERNEL: TRITON_KERNEL_FORMAT, TopKOutputFormat.BYPASSED: BYPASSED_FORMAT,
                       TopKOutputFormat.PACKED: PACKED_FORMAT}
    for output_format, path in refused_formats.items():
        layers = sorted({m.layer_id for m in topks if m.topk_config.output_format == output_format})
        if layers:
            backends = sorted({_backend(m.topk_config.runner_backend) for m in topks if m.layer_id in layers})
            raise RecordingRefused(path, f"layers {layers}, MoE runner backend {', '.join(backends)}")
    unrouted = sorted({m.layer_id for m in modules if isinstance(m, FusedMoE)} - {m.layer_id for m in topks})
    if unrouted:
        raise RecordingRefused(OWN_ROUTING, f"{type(model).__name__} layers {unrouted} have experts and no TopK")
    check_router_layers(model, hf_config)


def check_router_layers(model: Any, hf_config: Any) -> None:
    """Routing rows are indexed by the checkpoint's MoE layers (what the trainer builds); refuse to
    record when SGLang's model routes other layers (e.g. it ignores ``mlp_only_layers``)."""
    from sglang.srt.layers.moe.topk import TopK

    from routing_replay.models import moe_layer_ids

    engine = sorted({m.layer_id for m in model.modules() if isinstance(m, TopK) and not getattr(m, "is_draft", False)})
    checkpoint = moe_layer_ids(hf_config)
    if engine != checkpoint:
        raise RecordingRefused(LAYER_MAP, f"SGLang routes layers {engine} but the checkpoint's config has MoE "
                                          f"layers {checkpoint}")


def _layer_of(module: Any) -> str:
    layer = getattr(module, "layer_id", getattr(module, "layer_idx", None))
    return "" if layer is None else f", layer {layer}"


def _backend(runner_backend: Any) -> str:
    return "unbound" if runner_backend is None else str(getattr(runner_backend, "value", runner_backend))
