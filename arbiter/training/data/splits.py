"""The pairs a head trains on: every source of a config loaded, tokenized until ``limit`` pairs are kept, and split
train / dev / test by prompt (deterministic for the seed). ``cfg`` is any object with the head recipe's data
fields (``data``, ``seed``, ``limit``, ``max_length``, ``truncate_prompt``, ``dev_fraction``, ``test_fraction``);
the head recipe and the benchmarks that reuse its split call these."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from .pairs import load_pairs, split_pairs
from .records import DataError
from .tokenize import tokenize_pairs

log = logging.getLogger("arbiter.training.recipes.head")


def load_sources(cfg: Any) -> list[tuple[list, Any]]:
    """[(text-level pairs, DataReport)] per source of ``cfg.data``; needs no tokenizer, so it runs before the model
    loads. Raises DataError for a source with zero usable rows."""
    return [load_pairs(src, seed=cfg.seed) for src in cfg.data]


def load_tokenized(cfg: Any, tokenizer: Any, end_id: int, *, chunk: int = 256,
                   sources: list[tuple[list, Any]] | None = None):
    """(tokenized pairs of all sources, merged DataReport). Tokenizes in chunks until ``limit`` are kept.

    ``sources``: ``load_sources(cfg)``'s result when already loaded (its reports are updated in place).
    """
    all_tok, merged = [], None
    for pairs, report in load_sources(cfg) if sources is None else sources:
        kept: list = []
        visited = 0
        while visited < len(pairs) and (cfg.limit is None or len(kept) < cfg.limit):
            part = pairs[visited : visited + chunk]
            visited += len(part)
            # A chunk with no usable pair is not an error here: later chunks may have some; the source as a
            # whole is checked below.
            tok, trep = tokenize_pairs(part, tokenizer, end_id, max_length=cfg.max_length,
                                       truncate_prompt=cfg.truncate_prompt, raise_if_empty=False)
            kept += tok
            for reason, n in (trep.dropped if trep else {}).items():
                report.dropped[reason] = report.dropped.get(reason, 0) + n
            for reason, exs in (trep.examples if trep else {}).items():
                mine = report.examples.setdefault(reason, [])
                mine += exs[: max(0, 3 - len(mine))]
        beyond = len(pairs) - visited
        if cfg.limit is not None and len(kept) > cfg.limit:
            beyond += len(kept) - cfg.limit
            kept = kept[: cfg.limit]
        if beyond:
            report.dropped["beyond_limit"] = report.dropped.get("beyond_limit", 0) + beyond
        report.kept = len(kept)
        report.raise_if_empty()
        log.info("%s", report.summary())
        all_tok += kept
        merged = report if merged is None else merged.merge(report)
    return all_tok, merged


def split_indices(tokenized: Sequence[Any], cfg: Any) -> dict[str, list[int]]:
    """train / dev / test index lists (by prompt, deterministic for the seed)."""
    held_fraction = cfg.dev_fraction + cfg.test_fraction
    train, held = split_pairs(tokenized, dev_fraction=held_fraction, seed=cfg.seed)
    if cfg.test_fraction > 0 and held:
        dev, test = split_pairs(held, dev_fraction=cfg.test_fraction / held_fraction, seed=cfg.seed + 1)
    else:
        dev, test = held, []
    pos = {id(p): i for i, p in enumerate(tokenized)}
    out = {k: [pos[id(p)] for p in v] for k, v in (("train", train), ("dev", dev), ("test", test))}
    if not out["train"]:
        raise DataError("no training pairs left after the dev/test split")
    if cfg.dev_fraction > 0 and not out["dev"]:
        raise DataError(f"dev_fraction {cfg.dev_fraction} of {len(tokenized)} pairs leaves an empty dev set")
    return out
