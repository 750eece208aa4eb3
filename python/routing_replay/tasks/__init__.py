"""Tasks: prompt sources and reward functions (``module:function`` import paths in the config).

A reward function takes the prompt record (a dict with at least ``prompt`` and ``answer``) and the
response text, and returns a float. Built in: ``addition`` (a verifiable task a tiny model learns
on CPU) and ``math`` (a final-answer verifier for real models).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

RewardFn = Callable[[dict, str], float]


def load_reward(path: str) -> RewardFn:
    """Resolves ``module:function``; errors name the path."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {path!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward {path!r} is not callable")
    return fn
