"""The engine interface: sample N candidates per prompt in one batch, and score answers in one pass.

It fits both backends: the HF engine captures the reward features inside its own decode loop (one extra
decode step feeding ``<|im_end|>``); the vLLM engine samples with vLLM's ``n`` and computes the features
in a separate pooling pass over the finished candidates (``features``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


# Streaming callback: (candidate index, text delta) called from the worker thread as text becomes final.
DeltaCallback = Callable[[int, str], None]


@dataclass
class GenerationJob:
    """One request's share of a generation batch."""

    prompt_ids: list[int]
    n: int
    params: SamplingParams
    feature_layers: tuple[int, ...] = ()  # () = plain sampling, no reward features needed
    on_delta: DeltaCallback | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Candidate:
    token_ids: list[int]  # answer tokens, without the closing <|im_end|>
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    features: dict[int, torch.Tensor] | None = None  # layer -> [d] at the closing <|im_end|>


@dataclass
class GenerationResult:
    candidates: list[Candidate]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.candidates)


class Engine(Protocol):
    model_name: str
    tokenizer: object
    fingerprint: object  # arbiter.heads.BackboneFingerprint
    context_length: int
    end_id: int

    def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        """Sample every job's n candidates in one batch; features for jobs that ask for them."""

    def features(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Head features of complete answers (closed by <|im_end|> here): layer -> [N, d], one batched pass."""
