"""``--record-routing`` refuses the SGLang paths whose routing it cannot record: real ServerArgs
parsed from each refused flag (directly and through the plugin's launcher hook), real SGLang TopK,
HashTopK and FusedMoE modules whose output format SGLang itself decides, and the doc's table of
paths equal to ``refusals.PATHS``."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import torch
from sglang.srt.server_args import ServerArgs
from transformers import Qwen3MoeConfig

from routing_replay.sglang import options as opts
from routing_replay.sglang import plugin, refusals
from routing_replay.sglang.refusals import RecordingRefused

DOC = Path(__file__).resolve().parents[2] / "docs" / "sglang.md"
COLUMNS = "| path | status | why | instead |"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    opts.add_arguments(parser)
    return parser


def _server_args(*flags: str) -> ServerArgs:
    return ServerArgs.from_cli_args(_parser().parse_args(["--model-path", "dummy", *flags]))


REFUSED_FLAGS = [
    (("--enable-dp-attention", "--dp-size", "2"), refusals.DP_ATTENTION),
    (("--attn-dp-size", "2"), refusals.DP_ATTENTION),
    (("--moe-a2a-backend", "deepep"), refusals.A2A_BACKEND),
    (("--moe-a2a-backend", "megamoe"), refusals.A2A_BACKEND),
    (("--enable-two-batch-overlap",), refusals.TWO_BATCH_OVERLAP),
    (("--disaggregation-mode", "prefill"), refusals.PD_DISAGGREGATION),
    (("--disaggregation-mode", "decode"), refusals.PD_DISAGGREGATION),
    (("--pp-size", "2"), refusals.PIPELINE_PARALLEL),
    (("--attn-cp-size", "2"), refusals.CONTEXT_PARALLEL),
    (("--enable-layernorm-sp",), refusals.LAYERNORM_SP),
    (("--moe-runner-backend", "triton_kernel"), refusals.TRITON_KERNEL_RUNNER),
]


@pytest.mark.parametrize(("flags", "path"), REFUSED_FLAGS, ids=[" ".join(f) for f, _ in REFUSED_FLAGS])
def test_each_refused_flag_is_refused_naming_it_and_the_alternative(flags, path):
    with pytest.raises(RecordingRefused) as refused:
        refusals.check_server_args(_server_args(*flags))
    message = str(refused.value)
    assert refused.value.path is path
    assert flags[0] in message and path.instead in message and "--record-routing" in message


@pytest.mark.parametrize("flags", [(), ("--dp-size", "2"), ("--tp-size", "2", "--ep-size", "2"),
                                   ("--moe-runner-backend", "triton"), ("--enable-return-routed-experts",)])
def test_paths_we_record_are_not_refused(flags):
    refusals.check_server_args(_server_args(*flags))


def _launch(monkeypatch, *flags: str) -> ServerArgs:
    """The plugin's ``from_cli_args`` hook around SGLang's own, as a launcher calls it."""
    monkeypatch.setenv(opts._ENV, "")  # the hook publishes the options there; restored afterwards
    return plugin._from_cli_args(ServerArgs.from_cli_args.__func__, ServerArgs,
                                 _parser().parse_args(["--model-path", "dummy", *flags]))


def test_the_launcher_exits_at_once_naming_the_flag(monkeypatch):
    with pytest.raises(SystemExit) as exited:
        _launch(monkeypatch, "--record-routing", "--enable-dp-attention", "--dp-size", "2")
    assert "--enable-dp-attention" in str(exited.value.code) and "--dp-size N" in str(exited.value.code)
    assert not opts.current().record_routing  # refused before the options reach any scheduler


def test_the_launcher_checks_flags_only_when_recording(monkeypatch):
    assert isinstance(_launch(monkeypatch, "--enable-two-batch-overlap"), ServerArgs)
    assert isinstance(_launch(monkeypatch, "--record-routing", "--dp-size", "2"), ServerArgs)
    assert opts.current().record_routing


# ---- the loaded model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sglang_context():
    """SGLang's runtime context for building MoE modules outside a server (one rank, no groups)."""
    from sglang.srt.runtime_context import create_context, use_context

    context = create_context(ServerArgs(model_path="dummy"), role="scheduler")
    with use_context(context), context.parallel.override(moe_ep_rank=0, moe_tp_rank=0):
        yield context


def _topk(layer_id: int, backend: str = "triton", **kwargs):
    """A real TopK whose output format SGLang decides for ``backend`` (as FusedMoE models bind it)."""
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.moe.utils import MoeRunnerBackend, RoutingMethodType

    topk = TopK(2, layer_id=layer_id, **kwargs)
    topk.bind_runner_backend(MoeRunnerBackend(backend), routing_method_type=RoutingMethodType.Renormalize)
    return topk


def _experts(layer_id: int):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return FusedMoE(num_experts=4, top_k=2, hidden_size=8, intermediate_size=16, layer_id=layer_id)


def _model(*modules: torch.nn.Module) -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(modules)
    return model


HF_CONFIG = Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[])
DEFAULT_ARGS = ServerArgs(model_path="dummy")


def _refusal(model: torch.nn.Module, hf_config=HF_CONFIG, server_args=DEFAULT_ARGS) -> RecordingRefused:
    with pytest.raises(RecordingRefused) as refused:
        refusals.check_model(model, hf_config, server_args)
    return refused.value


def test_standard_top_k_on_every_moe_layer_is_recorded(sglang_context):
    refusals.check_model(_model(_topk(0), _experts(0), _topk(1), _experts(1)), HF_CONFIG, DEFAULT_ARGS)


def test_triton_kernel_format_is_refused_naming_format_layers_and_backend(sglang_context):
    refused = _refusal(_model(_topk(0), _experts(0), _topk(1, "triton_kernel"), _experts(1)))
    assert refused.path is refusals.TRITON_KERNEL_FORMAT
    assert all(word in str(refused) for word in ("TRITON_KERNEL", "layers [1]", "triton_kernel",
                                                  "--moe-runner-backend triton"))


def test_bypassed_format_as_sglang_decides_it_is_refused(sglang_context):
    """flashinfer_trtllm with plain renormalized softmax routing: SGLang lets the kernel route."""
    refused = _refusal(_model(_topk(0, "flashinfer_trtllm"), _experts(0), _topk(1), _experts(1)))
    assert refused.path is refusals.BYPASSED_FORMAT
    assert all(word in str(refused) for word in ("BYPASSED", "layers [0]", "flashinfer_trtllm", "triton"))


def test_hash_top_k_layers_are_refused(sglang_context):
    from sglang.srt.layers.moe.hash_topk import HashTopK

    refused = _refusal(_model(HashTopK(2, 4, vocab_size=16, layer_id=0), _experts(0), _topk(1), _experts(1)))
    assert refused.path is refusals.HASH_TOPK and "HashTopK" in str(refused) and "layers [0]" in str(refused)


def test_experts_without_a_top_k_in_their_layer_are_refused(sglang_context):
    refused = _refusal(_model(_topk(0), _experts(0), _experts(1)))
    assert refused.path is refusals.OWN_ROUTING
    assert "layers [1] have experts and no TopK" in str(refused) and refused.path.instead in str(refused)


def test_a_draft_top_k_is_not_ours_to_check(sglang_context):
    refusals.check_model(_model(_topk(0), _experts(0), _topk(1), _experts(1), _topk(1, "triton_kernel", is_draft=True)),
                         HF_CONFIG, DEFAULT_ARGS)


def test_the_resolved_server_args_are_checked_in_the_scheduler_too(sglang_context):
    refused = _refusal(_model(_topk(0), _experts(0), _topk(1), _experts(1)),
                       server_args=_server_args("--enable-two-batch-overlap"))
    assert refused.path is refusals.TWO_BATCH_OVERLAP


def test_routed_layers_must_be_the_checkpoints_moe_layers(sglang_context):
    refused = _refusal(_model(_topk(0), _experts(0), _topk(1), _experts(1)),
                       Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]))
    assert refused.path is refusals.LAYER_MAP
    assert "SGLang routes layers [0, 1] but the checkpoint's config has MoE layers [1]" in str(refused)


def test_every_class_refused_by_name_exists_in_the_installed_sglang():
    """A renamed SGLang class would silently slip past the check: fail here instead."""
    for name in refusals.OWN_ROUTING_CLASSES:
        module, cls = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), cls, None), type), name


# ---- the table of paths -----------------------------------------------------------------------------


def _doc_rows() -> list[tuple[str, ...]]:
    text = DOC.read_text()
    assert COLUMNS in text, f"docs/sglang.md has no table headed {COLUMNS}"
    rows = []
    for line in text[text.index(COLUMNS):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip("|").split(" | ")))
    return rows


def test_paths_are_unique_complete_and_every_refusal_names_an_alternative():
    names = [path.name for path in refusals.PATHS]
    assert len(names) == len(set(names))
    constants = [value for value in vars(refusals).values() if isinstance(value, refusals.RoutingPath)]
    assert set(constants) <= set(refusals.PATHS), "a refusal the table does not list"
    for path in refusals.PATHS:
        assert not any("|" in text for text in (path.name, path.why, path.instead)), path
        assert bool(path.instead) == (path.status == "refused"), path


def test_the_doc_lists_exactly_the_paths():
    code = [(p.name, p.status, p.why, p.instead) for p in refusals.PATHS]
    doc = _doc_rows()
    missing = [row for row in code if row not in doc]
    assert not missing and len(doc) == len(code), (
        "rows to put in docs/sglang.md's Paths table:\n"
        + "\n".join("| " + " | ".join(row) + " |" for row in code))
    assert re.search(r"^## Paths$", DOC.read_text(), re.MULTILINE)
