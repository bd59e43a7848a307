"""Sample N -> score -> pick. No FastAPI here: plain functions the worker and routes call.

Selection is an exact argmax under the first head (ties go to the lower candidate index, so the same
scores always pick the same candidate); every head scores every candidate from the same features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from arbiter.heads import LoadedHead

from .engine.base import Candidate


def feature_layers(heads: Sequence[LoadedHead]) -> tuple[int, ...]:
    return tuple(sorted({h.config.layer for h in heads}))


def score_features(features: dict[int, torch.Tensor], heads: Sequence[LoadedHead]) -> torch.Tensor:
    """features: layer -> [N, d]; returns rewards [N, H] (float32, CPU)."""
    cols = []
    with torch.inference_mode():
        for h in heads:
            x = features[h.config.layer]
            p = next(h.module.parameters())
            cols.append(h.module(x.to(p.device, p.dtype)).float().cpu())  # [N]
    return torch.stack(cols, dim=1)  # [N, H]


def score_candidates(candidates: Sequence[Candidate], heads: Sequence[LoadedHead]) -> torch.Tensor:
    layers = feature_layers(heads)
    feats = {l: torch.stack([c.features[l] for c in candidates]) for l in layers}  # layer -> [N, d]
    return score_features(feats, heads)


@dataclass
class Pick:
    order: list[int]  # candidate indices, best first
    rewards: torch.Tensor  # [N, H]

    def top(self, n: int) -> list[int]:
        return self.order[:n]


def pick(rewards: torch.Tensor) -> Pick:
    """Rank candidates by the first head's reward, descending; stable on ties."""
    first = rewards[:, 0].tolist()
    order = sorted(range(len(first)), key=lambda i: (-first[i], i))
    return Pick(order, rewards)
