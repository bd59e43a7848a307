"""The offline sampler: the serving HF engine itself, so that what training data generation and
``arbiter eval bestofn`` sample is what the server samples (docs/architecture.md "One sampler").

A prompt sampled here with ``n``, ``SamplingParams`` and ``seed`` gives the same candidates (token for token, with
the same features at the closing token) as a ``/v1/chat/completions`` request to the embedded server with the same
messages, ``n``, ``temperature``, ``top_p``, ``max_tokens`` and ``seed``: both run ``HFEngine.generate``, which
seeds candidate i of a request with ``seed * 1_000_003 + i``. The engine batches the prompts of one call
(``batch_prompts`` per decode batch) and leaves the global torch RNG untouched (each candidate has its own
generator).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from arbiter.generation.base import GenerationResult, SamplingParams


def sample(
    backbone: Any,
    prompts: Sequence[list[int]],
    *,
    n: int,
    params: "SamplingParams",
    seeds: Sequence[int],
    feature_layers: Sequence[int] = (),
    batch_prompts: int = 4,
    progress: bool = True,
    desc: str = "sampling",
) -> list["GenerationResult"]:
    """``n`` candidates for each prompt (token ids of a chat prompt, ``arbiter.chat.prompt_ids``), prompt j seeded
    with ``seeds[j]``; ``feature_layers``: also the head features of every candidate (layer -> [d], -1 = after the
    final norm), as the server computes them for reranking. One ``GenerationResult`` per prompt, in order."""
    from tqdm.auto import tqdm

    from arbiter.generation.base import GenerationJob
    from arbiter.generation.hf import HFEngine

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    engine = HFEngine(backbone)
    too_long = [j for j, p in enumerate(prompts) if len(p) + params.max_tokens > engine.context_length]
    if too_long:
        j = too_long[0]
        raise ValueError(f"{len(too_long)} prompt(s) do not fit the model's {engine.context_length}-token context with "
                         f"max_tokens {params.max_tokens} (the first: prompt {j}, {len(prompts[j])} tokens)")
    was_training = backbone.model.training
    backbone.model.eval()
    out: list[GenerationResult] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    try:
        for b0 in range(0, len(prompts), batch_prompts):
            jobs = [GenerationJob(list(p), n, dataclasses.replace(params, seed=int(seeds[b0 + i])),
                                  feature_layers=tuple(feature_layers))
                    for i, p in enumerate(prompts[b0 : b0 + batch_prompts])]
            out += engine.generate(jobs)
            bar.update(len(jobs))
    finally:
        bar.close()
        backbone.model.train(was_training)
    return out
