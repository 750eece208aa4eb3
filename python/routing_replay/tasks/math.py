"""Final-answer verification for math prompts: the last ``\\boxed{...}`` (or, failing that, the last
number) of the response must equal the record's ``answer`` after normalisation."""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def final_answer(response: str) -> str | None:
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(response.replace(",", ""))
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _normalise(answer: str) -> str | Fraction:
    cleaned = answer.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return cleaned


def reward(record: dict, response: str) -> float:
    found = final_answer(response)
    return 1.0 if found is not None and _normalise(found) == _normalise(str(record["answer"])) else 0.0
