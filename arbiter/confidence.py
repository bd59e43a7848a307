"""The model's own confidence in a candidate, from its token distributions: the free baselines a learned head must
beat (docs/methods.md "Confidence baselines").

Per generated token t with distribution p_t over the V vocabulary entries (temperature 1, the distribution the
candidate was sampled from):
  log-prob        log p_t(x_t) of the token that was generated;
  DeepConf        token confidence C_t = -(1/k) sum_{j in top-k} log p_t(j), k = 20 (arXiv 2508.15260, eq. 2);
  self-certainty  KL(U || p_t) = -(1/V) sum_j log(V p_t(j)) (arXiv 2502.18581, eq. 3).
A candidate's score is the mean over its tokens (mean log-prob, DeepConf's average trace confidence, mean
self-certainty); higher means more confident for all three. ``vote`` is the confidence-weighted majority vote
(DeepConf's weighted voting without filtering; CISC-style weights are its softmax variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

DEEPCONF_K = 20
SCORES = ("mean_logprob", "deepconf", "self_certainty")
# The free selection rules the reports set a head against: (key, label, score, argmax or vote).
RULES = (("conf_logprob", "mean log-prob argmax", "mean_logprob", "argmax"),
         ("conf_deepconf", "DeepConf argmax", "deepconf", "argmax"),
         ("conf_deepconf_vote", "DeepConf weighted vote", "deepconf", "vote"),
         ("conf_self_certainty", "self-certainty argmax", "self_certainty", "argmax"))


@dataclass(frozen=True)
class Confidence:
    mean_logprob: float
    deepconf: float
    self_certainty: float
    tokens: int

    def score(self, name: str) -> float:
        return float(getattr(self, name))


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, k: int = DEEPCONF_K) -> dict[str, torch.Tensor]:
    """Per-token scores of one candidate: ``logits`` [T, V] (the logits that sampled each of the T tokens),
    ``tokens`` [T]; returns name -> [T] float64 (module docstring)."""
    lp = torch.log_softmax(logits.double(), dim=-1)  # [T, V]
    v = lp.shape[-1]
    return {"logprob": lp.gather(-1, tokens[:, None].long())[:, 0],
            "deepconf": -lp.topk(min(k, v), dim=-1).values.mean(-1),
            "self_certainty": -math.log(v) - lp.mean(-1)}


def summarise(per_token: dict[str, torch.Tensor]) -> Confidence:
    t = int(per_token["logprob"].numel())
    if t == 0:
        return Confidence(float("-inf"), float("-inf"), float("-inf"), 0)
    return Confidence(float(per_token["logprob"].mean()), float(per_token["deepconf"].mean()),
                      float(per_token["self_certainty"].mean()), t)


@torch.no_grad()
def candidate_confidence(model: Any, prompt_ids: Sequence[int], answers: Sequence[Sequence[int]],
                         k: int = DEEPCONF_K, pad_id: int = 0) -> list[Confidence]:
    """Each answer's confidence from a teacher-forced forward over prompt + answer: the logits at the positions that
    predicted each answer token, exactly the distributions a temperature-1 decode sampled them from. The prompt is
    run once and its KV cache shared by the answers, which go in one right-padded batch (causal attention keeps
    each row's real positions exact; tests/test_confidence.py checks it against one plain forward per answer)."""
    from transformers import DynamicCache

    rows = [i for i, a in enumerate(answers) if a]
    out = [summarise({"logprob": torch.zeros(0)})] * len(answers)
    if not rows:
        return out
    p = torch.tensor([list(prompt_ids)])  # [1, P]
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    cache = DynamicCache(config=model.config)
    first = lm_head(decoder(input_ids=p, past_key_values=cache, use_cache=True).last_hidden_state[:, -1])  # [1, V]
    width = max(len(answers[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.cat([torch.ones(len(rows), p.shape[1], dtype=torch.long), torch.zeros_like(ids)], dim=1)
    for r, i in enumerate(rows):
        ids[r, : len(answers[i])] = torch.tensor(list(answers[i]))
        mask[r, p.shape[1] : p.shape[1] + len(answers[i])] = 1
    cache.batch_select_indices(torch.zeros(len(rows), dtype=torch.long))
    pos = (p.shape[1] + torch.arange(width)).expand(len(rows), width)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True).last_hidden_state  # [R, W, d]
    for r, i in enumerate(rows):
        a = list(answers[i])
        logits = torch.cat([first, lm_head(hidden[r, : len(a) - 1])]).float()  # [T, V]: row t predicts token t
        out[i] = summarise(token_confidence(logits, torch.tensor(a), k))
    return out


def vote(scores: Sequence[float], answers: Sequence[str | None], *, shift: bool = True) -> int:
    """The confidence-weighted vote's pick: answers weighted by the sum of their candidates' scores (shifted so
    the least confident answered candidate weighs just above 0 when ``shift``: mean log-probs are negative);
    the heaviest answer wins, its most confident member is returned; ties to the lower index. No answer at all:
    the most confident candidate."""
    idx = [i for i, a in enumerate(answers) if a is not None and math.isfinite(scores[i])]
    if not idx:
        return max(range(len(scores)), key=lambda i: (scores[i], -i))
    low = min(scores[i] for i in idx) if shift else 0.0
    weight: dict[str, float] = {}
    for i in idx:
        a = answers[i]
        assert a is not None
        weight[a] = weight.get(a, 0.0) + (scores[i] - low + 1e-6 if shift else scores[i])
    best = max(weight, key=lambda a: (weight[a], max(scores[i] for i in idx if answers[i] == a),
                                      -min(i for i in idx if answers[i] == a)))
    return max((i for i in idx if answers[i] == best), key=lambda i: (scores[i], -i))


def argmax(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def picks(conf: Sequence[Confidence], answers: Sequence[str | None]) -> dict[str, int]:
    """The candidate each rule of ``RULES`` picks (key -> index), given the candidates' confidences and answers."""
    out = {}
    for key, _, score, how in RULES:
        sc = [c.score(score) for c in conf]
        out[key] = argmax(sc) if how == "argmax" else vote(sc, answers, shift=False)
    return out
