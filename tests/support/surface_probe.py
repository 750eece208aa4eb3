"""Resolves every target of ``routing_replay.integration_surface`` in the installed SGLang,
megatron-core and torch, then applies our patches and reports what they changed; prints JSON.

Run in its own process (``python -m tests.support.surface_probe``): it imports SGLang and
megatron-core and applies the CPU workarounds, which change torch for the rest of the process. The
report is the last line of stdout, after ``MARKER``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import pkgutil
from typing import Any

from routing_replay.integration_surface import SURFACE, Patch

MARKER = "surface-probe: "
_MISSING = object()


def _import_prefix(path: str) -> tuple[Any, list[str]]:
    """The longest importable module of a dotted path, and the attribute names after it."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            return importlib.import_module(name), parts[end:]
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
    raise ModuleNotFoundError(path)


def _resolve(path: str) -> Any:
    obj, attributes = _import_prefix(path)
    for attribute in attributes:
        obj = inspect.getattr_static(obj, attribute)
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _params(obj: Any) -> list[str] | None:
    if isinstance(obj, type) or not callable(obj):
        return None
    return list(inspect.signature(obj).parameters)


def _probe(patch: Patch) -> dict:
    """Whether the target exists, and its parameter names."""
    if patch.kind == "install-time":
        return {"exists": importlib.util.find_spec(patch.target) is not None, "params": None}
    if patch.kind == "added attribute":
        parent, name = patch.target.rsplit(".", 1)
        owner = _resolve(parent)  # the attribute itself may be absent: that is when it is added
        return {"exists": True, "params": None, "present": hasattr(owner, name)}
    try:
        target = _resolve(patch.target)
    except (ImportError, AttributeError) as exc:
        return {"exists": False, "error": f"{type(exc).__name__}: {exc}"}
    if patch.kind == "dict entry":
        if not isinstance(target, dict):
            return {"exists": False, "error": f"not a dict: {type(target).__name__}"}
        value = target.get(patch.key) or getattr(target, "default_factory", lambda: None)()
        return {"exists": value is not None, "params": _params(value)}
    if patch.kind == "config":
        owner, field = patch.target.rsplit(".", 1)
        fields = {f.name for f in dataclasses.fields(_resolve(owner))}
        return {"exists": field in fields, "params": None}
    return {"exists": True, "params": _params(target)}


def _allocator_methods() -> list[str]:
    """Every token-to-KV allocator class in SGLang's allocator package with its own free / clear."""
    import sglang.srt.mem_cache.allocator as package
    from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    found, stack = [], [BaseTokenToKVPoolAllocator]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith(package.__name__) and cls is not BaseTokenToKVPoolAllocator:
            found += [f"{cls.__module__}.{cls.__qualname__}.{name}" for name in ("free", "clear") if name in vars(cls)]
    return sorted(found)


def _replaced_by_workarounds() -> list[str]:
    """Attributes of every module or class a megatron-side monkeypatch targets that the megatron
    CPU workarounds, the torch Adam fixes and the TransformerEngine-absent fix change (an attribute
    they add counts)."""
    from routing_replay.megatron import cpu_workarounds, torch_adam_fixes, without_transformer_engine

    owners = {p.target.rsplit(".", 1)[0] for p in SURFACE
              if p.kind in ("monkeypatch", "added attribute") and p.where.startswith("routing_replay.megatron.")}
    before = {owner: dict(vars(_resolve(owner))) for owner in owners}
    cpu_workarounds.apply()
    torch_adam_fixes.apply()
    without_transformer_engine.multi_latent_attention_knows_te_is_absent()
    changed = []
    for owner, old in before.items():
        for name, value in vars(_resolve(owner)).items():
            if old.get(name, _MISSING) is not value:
                changed.append(f"{owner}.{name}")
    return sorted(changed)


def _registered_by_plugin() -> dict:
    """The hooks ``register()`` registers, and what it sets in SGLang's registry dicts."""
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    from sglang.srt.mem_cache.pool_host.common import ALLOC_MEMORY_FUNCS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from routing_replay.sglang import plugin

    plugin.register()
    hooks = sorted(target for target, entries in HookRegistry._hooks.items()
                   for hook_type, _, _ in entries if hook_type is HookType.AROUND)
    streamer = plugin._recording_streamer(SchedulerOutputStreamer)
    overridden = sorted(name for name in vars(streamer) if not name.startswith("__"))
    cpu_alloc = dict.get(ALLOC_MEMORY_FUNCS, "cpu")
    return {"hooks": hooks, "streamer_overrides": overridden,
            "alloc_cpu_module": getattr(cpu_alloc, "__module__", None)}


def main() -> None:
    import torch
    from megatron.core import optimizer
    from megatron.core.extensions import transformer_engine

    report = {
        "cuda": torch.cuda.is_available(),
        "torch_adam": bool(optimizer.USING_PYTORCH_OPTIMIZER),
        "te": bool(transformer_engine.HAVE_TE),
        "targets": {f"{p.target}|{p.where}": _probe(p) for p in SURFACE},
        "allocator_methods": _allocator_methods(),
    }
    report["plugin"] = _registered_by_plugin()
    report["replaced"] = _replaced_by_workarounds()
    print(MARKER + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
