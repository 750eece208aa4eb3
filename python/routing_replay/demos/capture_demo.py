"""Capture demo: record the routing a toy KV-cached engine uses, deliver it per request, verify it.

A tiny random Qwen3-MoE (Hugging Face transformers, built locally, float32) plays the inference
engine: requests share a cached prompt prefix (its KV slots and routing rows are reused, as with
SGLang's radix cache), then prefill their own tail and decode greedily token by token. A forward
hook on every MoE router records the experts actually used into one RoutingRecorder keyed by KV
slot. When a request finishes its rows are gathered (the last token has no row) and checked:

- exactly equal to the routing the engine used, per token and layer (the recorder's contract);
- against an independent reference: one uncached full-sequence forward of the same tokens,
  whose router top-k sets should agree (float32) - reported, not assumed.

The request's own slots are then freed and reset; the prefix's stay cached.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from routing_replay.capture import RoutingLayout, RoutingRecorder

INT32_BYTES = 4
BASE64_JSON_BYTES_PER_INT32 = 4 * 4 / 3  # base64 of int32 rows, as SGLang returns them


@dataclass(frozen=True)
class DemoConfig:
    requests: int = 4
    new_tokens: int = 12
    seed: int = 0
    layers: int = 4
    experts: int = 16
    top_k: int = 4
    num_slots: int = 512


@dataclass
class RequestReport:
    request: int
    rows: int
    cached_prefix_rows: int
    equal_to_engine: bool
    hf_agreement: float


def build_tiny_moe(cfg: DemoConfig):
    from routing_replay.tiny_models import make_model

    return make_model("qwen3_moe", vocab_size=256, layers=cfg.layers, experts=cfg.experts, top_k=cfg.top_k,
                      seed=cfg.seed).eval()


def routers(model) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers]


class ToyEngine:
    """Just enough of an inference engine: KV slots, a cached prefix, per-forward routing hooks."""

    def __init__(self, model, recorder: RoutingRecorder) -> None:
        self.model, self.recorder = model, recorder
        self.free_slots = list(range(recorder.num_slots - 1, 0, -1))  # slot 0 stays a dummy, as in SGLang
        self.forward_slots: torch.Tensor | None = None  # the per-forward context the hooks read
        self.used: dict[int, torch.Tensor] = {}  # slot -> [L, K] routing the engine used (for checking)
        for layer_id, router in enumerate(routers(model)):
            router.register_forward_hook(self._hook(layer_id))

    def _hook(self, layer_id: int):
        def record(module, inputs, outputs) -> None:
            if self.forward_slots is None:
                return  # a forward that is not the engine's (the reference)
            topk_ids = outputs[2]  # (router_logits, routing_weights, selected_experts)
            self.recorder.record(layer_id, self.forward_slots, topk_ids)
            for slot, ids in zip(self.forward_slots.tolist(), topk_ids):
                self.used.setdefault(slot, torch.empty(len(routers(self.model)), ids.numel(), dtype=torch.int64))[layer_id] = ids

        return record

    @torch.no_grad()
    def forward(self, token_ids: list[int], cache):
        slots = [self.free_slots.pop() for _ in token_ids]
        self.forward_slots = torch.tensor(slots)
        try:
            out = self.model(torch.tensor([token_ids]), past_key_values=cache, use_cache=True)
        finally:
            self.forward_slots = None
        return slots, out.logits[0, -1].argmax().item(), out.past_key_values

    def free(self, slots: list[int]) -> None:
        self.recorder.reset(slots)
        for slot in slots:
            self.used.pop(slot, None)
        self.free_slots.extend(slots)


@torch.no_grad()
def reference_routing(model, token_ids: list[int]) -> torch.Tensor:
    """[T, L, K] routing of one uncached forward over the whole sequence."""
    captured: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, i, o: captured.append(o[2])) for r in routers(model)]
    try:
        model(torch.tensor([token_ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(captured, dim=1)


def run(cfg: DemoConfig) -> list[RequestReport]:
    from transformers import DynamicCache

    model = build_tiny_moe(cfg)
    layout = RoutingLayout(num_layers=cfg.layers, top_k=cfg.top_k, num_experts=cfg.experts)
    recorder = RoutingRecorder(layout, num_slots=cfg.num_slots)
    engine = ToyEngine(model, recorder)
    gen = torch.Generator().manual_seed(cfg.seed)
    prefix = torch.randint(0, 256, (24,), generator=gen).tolist()
    prefix_slots, _, prefix_cache = engine.forward(prefix, DynamicCache(config=model.config))

    reports = []
    for request in range(cfg.requests):
        tail = torch.randint(0, 256, (8,), generator=gen).tolist()
        slots, next_token, cache = engine.forward(tail, copy.deepcopy(prefix_cache))
        tokens, own_slots = prefix + tail, list(slots)
        for _ in range(cfg.new_tokens):
            tokens.append(next_token)
            if len(tokens) == len(prefix) + len(tail) + cfg.new_tokens:
                break  # the last token is never fed forward: it has no routing row
            step_slots, next_token, cache = engine.forward([next_token], cache)
            own_slots += step_slots
        row_slots = prefix_slots + own_slots
        rows = recorder.gather(row_slots).wait().require_complete().to(torch.int64)
        used = torch.stack([engine.used[s] for s in row_slots])
        reference = reference_routing(model, tokens[:-1])
        agree = (rows.sort(-1).values == reference.sort(-1).values).all(-1).float().mean().item()
        reports.append(RequestReport(request, len(row_slots), len(prefix_slots), torch.equal(rows, used), agree))
        engine.free(own_slots)
    return reports


def print_report(cfg: DemoConfig, reports: list[RequestReport], console: Console) -> None:
    layout = RoutingLayout(num_layers=cfg.layers, top_k=cfg.top_k, num_experts=cfg.experts)
    table = Table(title="routing delivered per request")
    for column in ("request", "rows", "cached prefix rows", "equal to engine's routing", "agreement with HF (uncached)"):
        table.add_column(column)
    for r in reports:
        table.add_row(str(r.request), str(r.rows), str(r.cached_prefix_rows), "yes" if r.equal_to_engine else "NO",
                      f"{100 * r.hf_agreement:.1f}%")
    console.print(table)
    ids = layout.ids_per_token
    console.print(
        f"bytes per token: ours {layout.bytes_per_token} ({layout.dtype}), int32 {ids * INT32_BYTES}, "
        f"base64 JSON ~{ids * BASE64_JSON_BYTES_PER_INT32:.0f}"
    )


def main(cfg: DemoConfig, json_path: Path | None = None) -> int:
    console = Console()
    reports = run(cfg)
    print_report(cfg, reports, console)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"config": asdict(cfg), "requests": [asdict(r) for r in reports]}, indent=2))
    ok = all(r.equal_to_engine for r in reports)
    console.print("[green]routing delivered == routing used for every token and layer[/]" if ok
                  else "[red]routing delivered differs from routing used[/]")
    return 0 if ok else 1
