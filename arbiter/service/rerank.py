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
    layers = feature_layers(heads)
    feats = {l: torch.stack([_features(c)[l] for c in candidates]) for l in layers}  # layer -> [N, d]
    return score_features(feats, heads)
