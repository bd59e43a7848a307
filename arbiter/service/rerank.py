"""Sample N -> score -> pick. No FastAPI here: plain functions the worker and routes call.

Every head scores every candidate from the same features; the first head's reward drives selection, by the
policies of ``arbiter.selection`` (argmax, weighted_vote, majority_vote; the adaptive stopping rule), which
training and evaluation share with the server.
"""

from __future__ import annotations

from typing import Sequence

import torch

from arbiter.generation.base import Candidate
from arbiter.heads import LoadedHead, head_rewards
from arbiter.selection import POLICIES, AdaptiveRule, Selection, select, settled

# The policies live in arbiter.selection; these names stay importable from here (code written against them).
__all__ = ["POLICIES", "AdaptiveRule", "Selection", "select", "settled", "feature_layers", "score_features",
           "score_candidates"]


def feature_layers(heads: Sequence[LoadedHead]) -> tuple[int, ...]:
    return tuple(sorted({h.config.layer for h in heads}))


def score_features(features: dict[int, torch.Tensor], heads: Sequence[LoadedHead]) -> torch.Tensor:
    """features: layer -> [N, d]; returns rewards [N, H] (float32, CPU)."""
    return torch.stack([head_rewards(h.module, features[h.config.layer]) for h in heads], dim=1)  # [N, H]


def _features(c: Candidate) -> dict[int, torch.Tensor]:
    if c.features is None:
        raise ValueError("a candidate to score carries no features (the job asked for no feature layers)")
    return c.features


def score_candidates(candidates: Sequence[Candidate], heads: Sequence[LoadedHead]) -> torch.Tensor:
    """Rewards [N, H] of generated candidates: a head's column from the rewards the engine computed itself
    (``Candidate.rewards``, in the job's head order: the vLLM engine), else from the candidates' features.
    A pruned candidate (``Candidate.pruned``: dropped mid-generation, no final feature) gets -inf under
    every head, so no selection rule picks it and a weighted vote gives it no weight."""
    live = [i for i, c in enumerate(candidates) if not c.pruned]
    if len(live) < len(candidates):
        out = torch.full((len(candidates), len(heads)), float("-inf"))
        if live:
            out[live] = _score([candidates[i] for i in live], heads)
        return out
    return _score(candidates, heads)


def _score(candidates: Sequence[Candidate], heads: Sequence[LoadedHead]) -> torch.Tensor:
    cols: list[torch.Tensor | None] = [None] * len(heads)
    for j in range(len(heads)):
        got = [c.rewards[j] if c.rewards is not None and j < len(c.rewards) else None for c in candidates]
        if candidates and all(r is not None for r in got):
            cols[j] = torch.tensor(got, dtype=torch.float32)
    need = [h for h, col in zip(heads, cols) if col is None]
    if need:
        layers = feature_layers(need)
        feats = {l: torch.stack([_features(c)[l] for c in candidates]) for l in layers}  # layer -> [N, d]
        scored = iter(score_features(feats, need).unbind(1))
        cols = [col if col is not None else next(scored) for col in cols]
    if not heads:
        return torch.zeros(len(candidates), 0)
    return torch.stack([c for c in cols if c is not None], dim=1)  # [N, H]
