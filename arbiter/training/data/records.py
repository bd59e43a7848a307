"""DataError, DataReport and the record types (PreferencePair, TokenizedPair); shared constants."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import TypeVar

T = TypeVar("T")

MAX_EXAMPLES = 3  # examples kept per drop reason
_EXAMPLE_CHARS = 160


class DataError(ValueError):
    """A data source cannot be used (not found, unreadable, or zero usable rows)."""


# --------------------------------------------------------------------------------------------------
# Reports and records
# --------------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What happened to a source's rows: ``total == kept + sum(dropped.values())`` for every loader here.

    ``stats`` holds extra numbers that are not row outcomes (e.g. sample counts of ``sample_math_pairs``).
    """

    source: str
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def drop(self, reason: str, example: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            example = " ".join(str(example).split())  # one line
            if len(example) > _EXAMPLE_CHARS:
                example = example[: _EXAMPLE_CHARS - 3] + "..."
            ex.append(example)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "DataReport") -> "DataReport":
        """A new report adding both (sources joined with '+'); neither input is modified."""
        out = DataReport(
            source=self.source if self.source == other.source else f"{self.source}+{other.source}",
            total=self.total + other.total,
            kept=self.kept + other.kept,
            dropped=dict(self.dropped),
            examples={k: list(v) for k, v in self.examples.items()},
            stats=dict(self.stats),
        )
        for reason, n in other.dropped.items():
            out.dropped[reason] = out.dropped.get(reason, 0) + n
        for reason, exs in other.examples.items():
            mine = out.examples.setdefault(reason, [])
            mine.extend(exs[: max(0, MAX_EXAMPLES - len(mine))])
        for k, v in other.stats.items():
            out.stats[k] = out.stats.get(k, 0) + v
        return out

    def summary(self) -> str:
        line = f"{self.source}: read {self.total}, kept {self.kept}, dropped {self.n_dropped}"
        if self.dropped:
            line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) + ")"
        if self.stats:
            line += "; " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.stats.items())
        return line

    def to_dict(self) -> dict:
        return asdict(self)

    def take(self, items: list[T], *, seed: int, limit: int | None) -> list[T]:
        """Every loader's order and limit: raise if nothing is usable, a seeded shuffle of all usable items, then
        the first ``limit`` (the rest counted as ``beyond_limit``, so total == kept + sum(dropped) holds and
        ``limit=n`` is a prefix of the unlimited order for the same seed)."""
        self.raise_if_empty()
        items = list(items)
        random.Random(seed).shuffle(items)
        if limit is not None and len(items) > limit:
            self.dropped["beyond_limit"] = self.dropped.get("beyond_limit", 0) + len(items) - limit
            self.kept = limit
            items = items[:limit]
        return items

    def raise_if_empty(self) -> None:
        if self.kept == 0:
            detail = "; ".join(
                f"{r}: {n} (e.g. {' | '.join(self.examples.get(r, [])[:2])})" for r, n in sorted(self.dropped.items())
            )
            raise DataError(
                f"{self.source}: zero usable rows out of {self.total} read"
                + (f"; dropped per reason: {detail}" if detail else "")
            )


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


@dataclass
class PreferencePair:
    prompt: list[dict]  # chat messages [{"role", "content"}, ...], ends with a user turn
    chosen: str  # assistant answer text
    rejected: str
    meta: dict = field(default_factory=dict)  # {"source", "row", ...}; may carry precomputed ref log-probs


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with <|im_end|>
    rejected_ids: list[int]  # ends with <|im_end|>
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Builtin preference sources
# --------------------------------------------------------------------------------------------------

HH_SPLITS = ("helpful-online", "helpful-rejection-sampled", "harmless-base")


def _prompt_key(prompt: list[dict]) -> str:
    return hashlib.sha1(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
