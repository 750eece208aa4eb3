"""Addition: "What is 12 + 5? The answer is" -> " 17". Verifiable, learnable by a tiny model
(``max_operand=9``, single digits, is what the CPU demo learns in minutes)."""

from __future__ import annotations

import random
import re


def prompts(count: int, seed: int, max_operand: int = 49) -> list[dict]:
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append({"prompt": f"What is {a} + {b}? The answer is", "answer": str(a + b)})
    return out


def reward(record: dict, response: str) -> float:
    """1 when the response begins with the correct number, else 0."""
    match = re.match(r"\s*(-?\d+)", response)
    return 1.0 if match and match.group(1) == record["answer"] else 0.0
