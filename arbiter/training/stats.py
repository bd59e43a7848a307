"""Small statistics the reports share."""

from __future__ import annotations

import math
from typing import Sequence


def accuracy_se(p: float, n: int) -> float:
    """The binomial standard error sqrt(p (1 - p) / n) of an accuracy ``p`` over ``n`` items (NaN for n = 0)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired_gain(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """(mean of a - b, its standard error) over paired per-question outcomes: is rule a better than rule b beyond
    noise on the same questions?"""
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return (d[0] if d else 0.0), float("inf")
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / (n - 1)
    return m, math.sqrt(var / n)
