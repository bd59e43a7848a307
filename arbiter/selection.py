"""Selection policies, shared by the server (``arbiter.service.rerank``) and training / evaluation (verifier
heads, ``arbiter eval bestofn``, the benchmarks): pure functions of rewards and extracted answers.

Policies (``rerank.select``), over the first head's reward r_i:
  argmax         the highest r_i (the default);
  weighted_vote  candidates grouped by their extracted answer (``arbiter.answers``), each group weighted by
                 the sum of softmax(r)_i over its members; the heaviest group wins;
  majority_vote  the group with the most members wins (its weight is its share of the answered candidates);
  verify         answer-level verification (README "Verifying answers"): the groups are ranked by the head's
                 reward of their answer in its canonical form (``verified``: answer -> reward, each distinct
                 answer scored once), plus ``vote_weight`` x the group's vote share and ``text_weight`` x its
                 best member's text reward (weights fitted on dev by ``arbiter train verifier``); an answer
                 with no canonical reward (it cannot be rendered) ranks after every verified one.
The training-free policies rank by the model's own confidence in each candidate (``confidence``: one
``arbiter.confidence.Confidence`` per candidate, None for a candidate stopped early; ``ConfidenceRule`` names the
score, s_i, and the rule's knobs), no head needed:
  confidence     the highest s_i (DeepConf's / self-certainty's argmax);
  deepconf_vote  DeepConf's filtered confidence-weighted vote (arXiv 2508.15260): keep the candidates whose score is
                 in the top ``keep`` share (ceil(keep x answered), at least one), each votes s_i (shifted to be
                 positive when some s_i <= 0) for its answer;
  borda          self-certainty's Borda vote (arXiv 2502.18581, eq. 11): candidates ranked by s_i, rank r (1 = most
                 confident) of N answered gives (N - r + 1)^p votes (``borda_p``);
  cisc           CISC (arXiv 2502.06233): each candidate votes softmax(s / ``temperature``)_i.
Ties go to the group whose best member has the higher reward, then to the lower candidate index, so the
same scores always pick the same candidate. Within a group, members are ordered by reward. Candidates with
no extractable answer never vote; if none has one, the vote policies fall back to argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from arbiter.heads.config import CONFIDENCE_POLICIES, POLICIES

__all__ = ["POLICIES", "AdaptiveRule", "ConfidenceRule", "Selection", "VerifyWeights", "select", "settled"]


@dataclass(frozen=True)
class ConfidenceRule:
    """The training-free policies' knobs (module docstring): the score they rank by (``confidence.SCORE_NAMES``),
    DeepConf's kept share, the Borda exponent and CISC's softmax temperature."""

    score: str = "deepconf"
    keep: float = 0.9  # DeepConf-high (eta = 90 %); 0.1 is DeepConf-low
    borda_p: float = 1.0
    temperature: float = 0.1

    @staticmethod
    def default_score(policy: str) -> str:
        """What each policy ranks by unless told: the token confidence for argmax, DeepConf's bottom-10 % group
        confidence for its vote, self-certainty for Borda, the mean log-prob (length-normalised sequence
        probability) for CISC."""
        return {"deepconf_vote": "bottom10_group", "borda": "self_certainty", "cisc": "mean_logprob"}.get(policy, "deepconf")


@dataclass(frozen=True)
class VerifyWeights:
    """The verify policy's group score: canonical reward + ``vote`` x vote share + ``text`` x best text reward."""

    vote: float = 0.0
    text: float = 0.0


@dataclass
class Selection:
    policy: str
    order: list[int]  # candidate indices, best first
    groups: list[dict[str, Any]] | None  # vote policies: [{"answer", "votes", "weight", "candidates"}], winner first

    def top(self, n: int) -> list[int]:
        return self.order[:n]


def select(rewards: torch.Tensor, policy: str = "argmax", answers: Sequence[str | None] | None = None,
           verified: Mapping[str, float | None] | None = None, weights: VerifyWeights | None = None,
           confidence: Sequence[Any] | None = None, rule: ConfidenceRule | None = None) -> Selection:
    """Rank candidates under ``policy`` (module docstring); ``answers`` (one per candidate) for the vote policies;
    ``verified`` (each answer's canonical reward, None where it cannot be rendered) and ``weights`` for verify;
    ``confidence`` (one ``Confidence`` or None per candidate) and ``rule`` for the training-free policies, where
    ``rewards`` may have no column (no head): the score then stands in for the reward in every tie-break."""
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; available: {', '.join(POLICIES)}")
    if policy in CONFIDENCE_POLICIES:
        return _by_confidence(policy, confidence, answers, rule or ConfidenceRule(ConfidenceRule.default_score(policy)))
    r = rewards[:, 0].double()
    by_reward = sorted(range(len(r)), key=lambda i: (-float(r[i]), i))
    if policy == "argmax":
        return Selection(policy, by_reward, None)
    if answers is None or len(answers) != len(r):
        raise ValueError("vote policies need one extracted answer per candidate")
    if policy == "verify" and verified is None:
        raise ValueError("verify needs the canonical reward of every answer")
    soft = torch.softmax(r, dim=0).tolist() if policy == "weighted_vote" else None
    groups: dict[str, dict[str, Any]] = {}
    for i in by_reward:  # members in reward order
        a = answers[i]
        if a is None:
            continue
        g = groups.setdefault(a, {"answer": a, "votes": 0, "weight": 0.0, "candidates": []})
        g["votes"] += 1
        g["candidates"].append(i)
        if soft is not None:
            g["weight"] += soft[i]
    answered = sum(g["votes"] for g in groups.values())
    if soft is None:
        for g in groups.values():
            g["weight"] = g["votes"] / answered
    if policy == "verify":
        assert verified is not None
        w = weights or VerifyWeights()
        for g in groups.values():
            cr = verified.get(g["answer"])
            g["canonical_reward"] = cr
            best_text = float(r[g["candidates"][0]])
            g["score"] = (-math.inf if cr is None else
                          cr + w.vote * g["weight"] + (w.text * best_text if w.text and math.isfinite(best_text) else 0.0))
        by = "score"
    else:
        by = "weight" if soft is not None else "votes"
    ranked = sorted(groups.values(), key=lambda g: (-g[by], -float(r[g["candidates"][0]]), g["candidates"][0]))
    order = [i for g in ranked for i in g["candidates"]] + [i for i in by_reward if answers[i] is None]
    return Selection(policy, order, ranked)


def _by_confidence(policy: str, confidence: Sequence[Any] | None, answers: Sequence[str | None] | None,
                   rule: ConfidenceRule) -> Selection:
    if confidence is None:
        raise ValueError(f"{policy} needs every candidate's confidence")
    n = len(confidence)
    s = [c.score(rule.score) if c is not None else -math.inf for c in confidence]
    s = [x if math.isfinite(x) else -math.inf for x in s]
    by_score = sorted(range(n), key=lambda i: (-s[i], i))
    if policy == "confidence":
        return Selection(policy, by_score, None)
    if answers is None or len(answers) != n:
        raise ValueError("vote policies need one extracted answer per candidate")
    voters = [i for i in by_score if answers[i] is not None and math.isfinite(s[i])]
    weight: dict[int, float] = {}
    if policy == "deepconf_vote":
        voters = voters[: max(1, math.ceil(rule.keep * len(voters) - 1e-9))] if voters else []
        low = min((s[i] for i in voters), default=0.0)
        shift = -low + 1e-6 if low <= 0 else 0.0  # DeepConf's confidences are positive; a log-prob is not
        weight = {i: s[i] + shift for i in voters}
    elif policy == "borda":
        weight = {i: float(len(voters) - r) ** rule.borda_p for r, i in enumerate(voters)}  # rank r + 1
    else:  # cisc
        if voters:
            soft = torch.softmax(torch.tensor([s[i] for i in voters], dtype=torch.float64) / rule.temperature, 0).tolist()
            weight = dict(zip(voters, soft))
    groups: dict[str, dict[str, Any]] = {}
    for i in by_score:  # members in score order; every answered candidate is listed, only voters weigh
        a = answers[i]
        if a is None:
            continue
        g = groups.setdefault(a, {"answer": a, "votes": 0, "weight": 0.0, "candidates": []})
        g["candidates"].append(i)
        if i in weight:
            g["votes"] += 1
            g["weight"] += weight[i]
    ranked = sorted(groups.values(), key=lambda g: (-g["weight"], -s[g["candidates"][0]], g["candidates"][0]))
    order = [i for g in ranked for i in g["candidates"]] + [i for i in by_score if answers[i] is None]
    return Selection(policy, order, ranked or None)


@dataclass(frozen=True)
class AdaptiveRule:
    """When adaptive rerank stops sampling (docs: README "Rerank extension", `adaptive`): after each round, the leader is settled
    when (argmax) its reward beats the runner-up's by more than ``margin``, (vote policies) the leading answer
    group holds at least ``supermajority`` of the weight with at least two answered candidates, or (verify) with
    at least two answered candidates, the leading answer's verified score beats every other answer's by more
    than ``margin`` or it is the only answer found."""

    round: int = 2
    margin: float = 1.0
    supermajority: float = 0.75


def settled(rewards: torch.Tensor, policy: str, answers: Sequence[str | None] | None, rule: AdaptiveRule,
            verified: Mapping[str, float | None] | None = None, weights: VerifyWeights | None = None,
            confidence: Sequence[Any] | None = None, conf_rule: ConfidenceRule | None = None) -> bool:
    """Whether adaptive rerank stops after this round (``AdaptiveRule``); for the confidence votes this is
    DeepConf's consensus stop: the leading answer holds ``supermajority`` of the confidence weight."""
    n = rewards.shape[0] if confidence is None else len(confidence)
    if n < 2:
        return False
    if policy in ("argmax", "confidence"):
        if policy == "argmax":
            vals = rewards[:, 0].tolist()
        else:
            cr = conf_rule or ConfidenceRule()
            vals = [c.score(cr.score) if c is not None else -math.inf for c in confidence or ()]
        top = sorted(vals, reverse=True)
        return bool(top[0] - top[1] > rule.margin)
    sel = select(rewards, policy, answers, verified, weights, confidence, conf_rule)
    if policy == "verify":
        if not sel.groups or sum(g["votes"] for g in sel.groups) < 2 or not math.isfinite(sel.groups[0]["score"]):
            return False
        return len(sel.groups) == 1 or bool(sel.groups[0]["score"] - sel.groups[1]["score"] > rule.margin)
    if not sel.groups or sum(g["votes"] for g in sel.groups) < 2:
        return False
    total = sum(g["weight"] for g in sel.groups)
    return bool(sel.groups[0]["weight"] / total >= rule.supermajority)
