"""Final-answer verification for math prompts with Hugging Face's ``math_verify`` (maintained,
used by open-r1 and lighteval): the response's final answer (``\\boxed{...}`` first, then a LaTeX
or plain expression, e.g. "x = 3") must equal the record's ``answer`` mathematically (``1/2`` =
``0.5`` = ``\\frac{1}{2}``, ``x+1`` = ``1+x``).

Timeouts: ``math_verify`` bounds parsing and comparison with ``signal.alarm``, which works only on
a process's main thread. The reward workers are plain (not threaded or async) Ray actors, whose
methods run on the worker's main thread, so the bounds apply there; called from any other thread
the verifier runs without them rather than failing.
"""

from __future__ import annotations

import logging
import threading

from math_verify import parse, verify

TIMEOUT_SECONDS = 5
"""Per parse and per comparison, on the main thread."""

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" and per-parse warnings


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def gold(answer: object) -> list:
    """The reference answer parsed: taken as LaTeX math (``$...$``) unless it carries its own
    delimiters or ``\\boxed``; a plain parse when that finds nothing."""
    text = str(answer).strip()
    parsed = [] if "$" in text or "\\boxed" in text else parse(f"${text}$", parsing_timeout=_timeout())
    return parsed or parse(text, parsing_timeout=_timeout())


def reward(record: dict, response: str) -> float:
    """1 when the response's final answer equals ``record["answer"]`` (per ``math_verify``), else 0."""
    expected = gold(record["answer"])
    found = parse(response, parsing_timeout=_timeout())
    if not expected or not found:
        return 0.0
    return 1.0 if verify(expected, found, timeout_seconds=_timeout()) else 0.0
