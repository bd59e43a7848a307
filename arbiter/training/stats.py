"""Small statistics the reports share."""

from __future__ import annotations

import math


def accuracy_se(p: float, n: int) -> float:
    """The binomial standard error sqrt(p (1 - p) / n) of an accuracy ``p`` over ``n`` items (NaN for n = 0)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")
