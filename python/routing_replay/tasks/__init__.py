"""Tasks: prompt sources and reward functions (``module:function`` import paths in the config).

A reward function takes the prompt record (a dict with at least ``prompt`` and ``answer``) and the
response text, and returns a float. Prompts come from a local JSONL file (one record per line) or
from a built-in generator. Built in: ``addition`` (a verifiable task a tiny model learns on CPU)
and ``math`` (a final-answer verifier for real models).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

RewardFn = Callable[[dict, str], float]


def load_reward(path: str) -> RewardFn:
    """Resolves ``module:function``; errors name the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, TypeError) as exc:  # TypeError: a relative name such as ".x"
        raise ValueError(f"reward {path!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable")
    return fn


BUILT_IN_PROMPTS = {"addition": "routing_replay.tasks.addition:prompts"}


def load_prompts(name: str, path: str | None, seed: int, count: int = 4096,
                 args: Mapping[str, object] | None = None) -> list[dict]:
    """The prompt records of a task: from ``path`` (JSONL) when given, else the built-in generator
    ``name`` (``count`` records from ``seed``). Errors name the file and line."""
    if path is not None:
        records = []
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: a record needs a string 'prompt'")
            records.append(record)
        if not records:
            raise ValueError(f"{path}: no prompts")
        return records
    if name not in BUILT_IN_PROMPTS:
        raise ValueError(f"task {name!r} has no built-in prompts; set task.prompts to a JSONL file "
                         f"(built in: {sorted(BUILT_IN_PROMPTS)})")
    module, _, attr = BUILT_IN_PROMPTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(count, seed, **dict(args or {}))
