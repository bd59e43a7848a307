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

DeepConf's group confidences (the reference code's ``compute_least_grouped`` / ``calculate_bottom_window_confidence``
/ ``calculate_tail_confidence``) over the token confidences C_t with a window of w tokens (``GROUP_WINDOW``): the
means of every full sliding window (one window, the whole trace, when it is shorter than w); lowest_group = their
minimum, bottom10_group = the mean of their lowest 10 % (at least one), tail = the mean of the last w tokens. The
serving engines compute all of these per candidate while decoding (``Trace``); the selection rules over them live
in ``arbiter.selection`` (confidence, deepconf_vote, borda, cisc).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

DEEPCONF_K = 20
GROUP_WINDOW = 2048  # DeepConf's group size and tail length (arXiv 2508.15260; deepconf 0.1's defaults)
BOTTOM_SHARE = 0.1  # bottom10_group: the lowest 10 % of the window means
SCORES = ("mean_logprob", "deepconf", "self_certainty")
# Every per-candidate score a selection rule may rank by (Confidence's fields; higher = more confident): THE list,
# which the request schema (rerank.confidence.score) reads too
ScoreName = Literal["mean_logprob", "deepconf", "self_certainty", "lowest_group", "bottom10_group", "tail"]
SCORE_NAMES: tuple[str, ...] = ScoreName.__args__  # type: ignore[attr-defined]  # a Literal's values, in order
# The free selection rules the reports set a head against: (key, label, score, the serving policy of
# arbiter.selection that applies it); KEEP: DeepConf's kept share for its votes (1.0: no filter).
RULES = (("conf_logprob", "mean log-prob argmax", "mean_logprob", "confidence"),
         ("conf_deepconf", "DeepConf argmax", "deepconf", "confidence"),
         ("conf_deepconf_vote", "DeepConf weighted vote", "deepconf", "deepconf_vote"),
         ("conf_deepconf_high", "DeepConf-high vote (top 90 %)", "bottom10_group", "deepconf_vote"),
         ("conf_deepconf_low", "DeepConf-low vote (top 10 %)", "bottom10_group", "deepconf_vote"),
         ("conf_self_certainty", "self-certainty argmax", "self_certainty", "confidence"),
         ("conf_borda", "self-certainty Borda vote", "self_certainty", "borda"),
         ("conf_cisc", "CISC vote (mean log-prob, T 0.1)", "mean_logprob", "cisc"))
KEEP = {"conf_deepconf_vote": 1.0, "conf_deepconf_high": 0.9, "conf_deepconf_low": 0.1}


@dataclass(frozen=True)
class Confidence:
    mean_logprob: float
    deepconf: float
    self_certainty: float
    tokens: int
    lowest_group: float = float("-inf")  # DeepConf's group confidences (module docstring)
    bottom10_group: float = float("-inf")
    tail: float = float("-inf")

    def score(self, name: str) -> float:
        return float(getattr(self, name))

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in (*SCORE_NAMES, "tokens")}


def window_means(conf: Sequence[float], window: int = GROUP_WINDOW) -> list[float]:
    """The mean token confidence of every full sliding window of ``window`` tokens; the whole trace's mean as one
    window when it is shorter (DeepConf's ``compute_least_grouped``)."""
    c = [float(x) for x in conf]
    if not c:
        return []
    if len(c) < window:
        return [sum(c) / len(c)]
    out, total = [], sum(c[:window])
    out.append(total / window)
    for i in range(window, len(c)):
        total += c[i] - c[i - window]
        out.append(total / window)
    return out


def group_scores(conf: Sequence[float], window: int = GROUP_WINDOW) -> tuple[float, float, float]:
    """(lowest_group, bottom10_group, tail) of one trace's token confidences (module docstring)."""
    means = window_means(conf, window)
    if not means:
        return float("-inf"), float("-inf"), float("-inf")
    low = sorted(means)[: max(1, int(len(means) * BOTTOM_SHARE))]
    tail = [float(x) for x in conf[-window:]]
    return min(means), sum(low) / len(low), sum(tail) / len(tail)


class Trace:
    """One candidate's confidence, accumulated token by token while it is decoded (the HF engine's decode loop; the
    vLLM engine from its top-k log-probs). ``group`` is the mean confidence of the last full window, what DeepConf's
    online mode compares with its threshold (None until ``window`` tokens exist)."""

    def __init__(self, window: int = GROUP_WINDOW):
        self.window = window
        self.logprob: list[float] = []
        self.conf: list[float] = []
        self.certainty: list[float] = []
        self._sum = 0.0  # the last window's confidence sum

    def add(self, logprob: float, conf: float, certainty: float) -> None:
        self.logprob.append(logprob)
        self.conf.append(conf)
        self.certainty.append(certainty)
        self._sum += conf
        if len(self.conf) > self.window:
            self._sum -= self.conf[-self.window - 1]

    def cut(self, tokens: int) -> None:
        """Keep the first ``tokens`` entries (a stop string cut the answer)."""
        del self.logprob[tokens:], self.conf[tokens:], self.certainty[tokens:]
        self._sum = sum(self.conf[-self.window :])

    def group(self) -> float | None:
        return self._sum / self.window if len(self.conf) >= self.window else None

    def summary(self) -> Confidence:
        return summarise({"logprob": torch.tensor(self.logprob, dtype=torch.float64),
                          "deepconf": torch.tensor(self.conf, dtype=torch.float64),
                          "self_certainty": torch.tensor(self.certainty, dtype=torch.float64)}, self.window)


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, k: int = DEEPCONF_K) -> dict[str, torch.Tensor]:
    """Per-token scores of one candidate: ``logits`` [T, V] (the logits that sampled each of the T tokens),
    ``tokens`` [T]; returns name -> [T] float64 (module docstring)."""
    lp = torch.log_softmax(logits.double(), dim=-1)  # [T, V]
    v = lp.shape[-1]
    return {"logprob": lp.gather(-1, tokens[:, None].long())[:, 0],
            "deepconf": -lp.topk(min(k, v), dim=-1).values.mean(-1),
            "self_certainty": -math.log(v) - lp.mean(-1)}


def summarise(per_token: dict[str, torch.Tensor], window: int = GROUP_WINDOW) -> Confidence:
    t = int(per_token["logprob"].numel())
    if t == 0:
        return Confidence(float("-inf"), float("-inf"), float("-inf"), 0)
    low, bottom, tail = group_scores(per_token["deepconf"].tolist(), window)
    return Confidence(float(per_token["logprob"].mean()), float(per_token["deepconf"].mean()),
                      float(per_token["self_certainty"].mean()), t, low, bottom, tail)


def topk_token_confidence(chosen: float, top: Sequence[float], vocab: int, k: int = DEEPCONF_K) -> tuple[float, float, float]:
    """(log-prob, DeepConf confidence, self-certainty) of one token from what an engine returns: the sampled token's
    log-prob and the top-k log-probs (the vLLM engine). The log-prob is exact, the DeepConf confidence is exact when
    ``top`` holds at least k entries (it reads only the top k). Self-certainty needs every entry of the distribution:
    the approximation spreads the mass outside the top k evenly over the other V - k tokens: exact when that mass
    is flat, otherwise a lower bound (the log of an average exceeds the average of the logs), far below the exact
    value on a long-tailed distribution, so the vLLM engine's self-certainty ranks but does not equal the HF one."""
    top = sorted((float(x) for x in top), reverse=True)
    kk = min(k, len(top))
    conf = -sum(top[:kk]) / kk if kk else 0.0
    inside = sum(math.exp(x) for x in top)
    rest = max(vocab - len(top), 0)
    log_v = math.log(vocab)
    total = sum(x for x in top)
    if rest:
        other = max(1.0 - inside, 1e-30) / rest
        total += rest * math.log(other)
    return float(chosen), conf, -log_v - total / vocab


@torch.no_grad()
def candidate_confidence(model: Any, prompt_ids: Sequence[int], answers: Sequence[Sequence[int]],
                         k: int = DEEPCONF_K, pad_id: int = 0, window: int = GROUP_WINDOW) -> list[Confidence]:
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
        out[i] = summarise(token_confidence(logits, torch.tensor(a), k), window)
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
    """The candidate each rule of ``RULES`` picks (key -> index), given the candidates' confidences and answers: the
    server's own selection code (``arbiter.selection.select`` under the rule's policy), so a report's column is
    what a request with that ``select`` returns."""
    from arbiter.selection import ConfidenceRule, select

    none = torch.zeros(len(conf), 0)
    return {key: select(none, policy, answers, confidence=conf,
                        rule=ConfidenceRule(score, keep=KEEP.get(key, 0.9))).order[0]
            for key, _, score, policy in RULES}
