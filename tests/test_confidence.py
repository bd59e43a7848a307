"""The confidence baselines (``arbiter.confidence``) against a plain numpy computation over the full vocabulary,
and the confidence-weighted vote by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arbiter.confidence import RULES, Confidence, picks, summarise, token_confidence, vote


def _reference(logits: np.ndarray, tokens: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Straight from the formulas: p = softmax(logits); log p(x_t); -(1/k) sum of the k largest log p;
    KL(U || p) = sum_j (1/V) log((1/V) / p_j)."""
    out = {"logprob": [], "deepconf": [], "self_certainty": []}
    for row, tok in zip(logits.astype(np.float64), tokens):
        p = np.exp(row - row.max())
        p /= p.sum()
        logp = np.log(p)
        v = len(p)
        out["logprob"].append(logp[tok])
        out["deepconf"].append(-np.sort(logp)[::-1][:k].mean())
        out["self_certainty"].append(np.sum((1.0 / v) * np.log((1.0 / v) / p)))
    return {key: np.array(val) for key, val in out.items()}


@pytest.mark.parametrize("v,k", [(50, 20), (7, 20), (49152, 20)])
def test_token_scores_equal_the_full_vocabulary_formulas(v, k):
    g = np.random.default_rng(v)
    logits = (g.standard_normal((6, v)) * 3).astype(np.float32)
    tokens = g.integers(0, v, 6)
    got = token_confidence(torch.from_numpy(logits), torch.from_numpy(tokens), k)
    want = _reference(logits, tokens, k)
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-9, atol=1e-9, err_msg=name)
    c = summarise(got)
    assert c.tokens == 6 and c.mean_logprob == pytest.approx(want["logprob"].mean())
    assert c.deepconf == pytest.approx(want["deepconf"].mean())
    assert c.self_certainty == pytest.approx(want["self_certainty"].mean())
    # A sharper distribution is more confident under all three.
    sharp = summarise(token_confidence(torch.from_numpy(logits) * 4, torch.from_numpy(logits.argmax(-1))))
    assert sharp.mean_logprob > c.mean_logprob and sharp.deepconf > c.deepconf and sharp.self_certainty > c.self_certainty


def test_confidence_weighted_vote_by_hand():
    # answers a, a, b, None, b with scores -1.0, -3.0, -0.5, 5.0, -0.6: shifted by the lowest answered (-3.0):
    # a = 2.0 + 0 = 2.0, b = 2.5 + 2.4 = 4.9 -> b wins, its most confident member is candidate 2.
    assert vote([-1.0, -3.0, -0.5, 5.0, -0.6], ["a", "a", "b", None, "b"]) == 2
    # Unshifted (DeepConf's positive confidences): a = 3 + 3, b = 5 -> a, member 0 (tie to the lower index).
    assert vote([3.0, 3.0, 5.0, 9.0], ["a", "a", "b", None], shift=False) == 0
    assert vote([1.0, 2.0], [None, None]) == 1  # nobody answered: the most confident candidate
    assert vote([-math.inf, 1.0], ["a", "b"]) == 1
    # every rule's pick from the candidates' confidences: logprob / deepconf / self-certainty / group per candidate
    conf = [Confidence(-0.5, 3.0, 1.0, 4, 3.0, 3.0, 3.0), Confidence(-0.2, 2.0, 2.0, 4, 2.0, 2.0, 2.0),
            Confidence(-0.9, 2.5, 0.5, 4, 2.5, 2.5, 2.5)]
    got = picks(conf, ["x", "y", "y"])
    assert set(got) == {key for key, _, _, _ in RULES}
    # deepconf vote: x 3.0 vs y 2.0 + 2.5 = 4.5 -> y, its most confident member (2.5) is candidate 2; the top 90 %
    # (ceil 2.7 = all 3) the same; the top 10 % (1: candidate 0) -> x. Borda on self-certainty: ranks 1, 0, 2 ->
    # y 3 + 1 = 4 vs x 2 -> y, member 1. CISC on the log-prob, T 0.1: e^-2 + e^-9 (y) > e^-5 (x) -> y, member 1.
    assert got == {"conf_logprob": 1, "conf_deepconf": 0, "conf_deepconf_vote": 2, "conf_deepconf_high": 2,
                   "conf_deepconf_low": 0, "conf_self_certainty": 1, "conf_borda": 1, "conf_cisc": 1}


def test_deepconf_token_confidence_and_weighted_vote_equal_the_reference_package(deepconf_utils):
    from types import SimpleNamespace

    dc = deepconf_utils
    g = np.random.default_rng(0)
    logits = torch.from_numpy((g.standard_normal((5, 300)) * 2).astype(np.float32))
    tokens = torch.from_numpy(g.integers(0, 300, 5))
    lp = torch.log_softmax(logits.double(), -1)
    # vLLM's logprobs=20 per position: the top 20 (token -> Logprob object), which deepconf reads
    top = [{int(j): SimpleNamespace(logprob=float(row[j])) for j in row.topk(20).indices} for row in lp]
    want = dc.compute_confidence(top)  # rounded to 3 decimals by the package
    got = token_confidence(logits, tokens)["deepconf"].tolist()
    assert got == pytest.approx(want, abs=5e-4)
    answers = ["a", "b", "a", None, "b", "c"]
    weights = [1.0, 2.5, 1.2, 9.0, 0.1, 2.4]
    assert answers[vote(weights, answers, shift=False)] == dc.weighted_majority_vote(answers, weights)


def test_one_batch_of_answers_gives_each_answer_its_own_forwards_scores(backbone):
    """The shared prompt cache and the right-padded batch of a prompt's answers give what one plain forward per answer
    gives (the real model)."""
    from arbiter.chat import answer_ids, prompt_ids
    from arbiter.confidence import candidate_confidence

    p = prompt_ids(backbone.tokenizer, [{"role": "user", "content": "Name a colour."}])
    answers = [answer_ids(backbone.tokenizer, t, backbone.end_id, close=False)
               for t in ("Blue.", "A deep shade of green, like moss in spring.", "Red")]
    batched = candidate_confidence(backbone.model, p, answers + [[]])
    with torch.no_grad():  # the reference: one plain full forward per answer, its logits at the answer's positions
        alone = [summarise(token_confidence(backbone.model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1].float(),
                                            torch.tensor(a))) for a in answers]
    assert batched[3].tokens == 0
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens
        for name in ("mean_logprob", "deepconf", "self_certainty"):
            assert b.score(name) == pytest.approx(a.score(name), rel=2e-2, abs=2e-2), name
