"""Training-free selection and DeepConf's online stop (README "Training-free selection"): the group confidences
against the ``deepconf`` package's own functions, the top-k approximation against a full-vocabulary numpy
computation, every policy worked by hand, and the API on the scripted fake engine with no head loaded. The real
model's decode-loop confidences are checked against a teacher-forced forward at the end (integration)."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch

from arbiter.confidence import RULES, Confidence, Trace, group_scores, topk_token_confidence, window_means
from arbiter.selection import AdaptiveRule, ConfidenceRule, select, settled
from arbiter.service.app import create_app
from arbiter.service.settings import Settings
from arbiter.testing.fakes import FakeEngine, Scripted, ServerThread, registry_with


@pytest.mark.parametrize("n, window", [(7, 16), (40, 8), (40, 1), (9, 9)])
def test_group_confidences_equal_the_reference_package(n, window, deepconf_utils):
    dc = deepconf_utils
    conf = np.random.default_rng(n * window).uniform(0.5, 4.0, n).tolist()
    trace = {"confs": conf}
    low, bottom, tail = group_scores(conf, window)
    assert min(dc.compute_least_grouped(conf, window)) == pytest.approx(low, abs=5e-4)  # the package rounds to 3 places
    assert dc.calculate_bottom_window_confidence(trace, window, 0.1) == pytest.approx(bottom, rel=1e-9)
    assert dc.calculate_bottom_window_confidence(trace, window, -1) == pytest.approx(low, rel=1e-9)
    assert dc.calculate_tail_confidence(trace, window) == pytest.approx(tail, rel=1e-9)
    # the decode loop's running window: the mean of the last full window, None before one exists
    t = Trace(window)
    for k, c in enumerate(conf):
        t.add(-1.0, c, 0.0)
        want = None if k + 1 < window else sum(conf[k + 1 - window : k + 1]) / window
        assert t.group() == (None if want is None else pytest.approx(want, rel=1e-9))
    assert t.summary().lowest_group == pytest.approx(low, rel=1e-12)
    assert window_means([], 4) == []


def test_topk_confidence_is_exact_where_it_can_be_and_says_how_it_approximates():
    """The vLLM engine's per-token confidence from the sampled token's log-prob and the top 20: log-prob and DeepConf
    exact; self-certainty exact when the mass outside the top k is flat, a lower bound otherwise (numpy over all V)."""
    g = np.random.default_rng(3)
    v, k = 500, 20
    for flat in (True, False):
        logits = g.standard_normal(v) * 3
        if flat:
            order = np.argsort(-logits)
            logits[order[k:]] = logits[order[k]]  # every entry outside the top k alike
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        top = np.sort(logp)[::-1][:k]
        tok = int(np.argsort(-logp)[3])
        lp, conf, sc = topk_token_confidence(float(logp[tok]), top.tolist(), v, k)
        assert lp == logp[tok] and conf == pytest.approx(-top.mean(), rel=1e-12)
        want = -np.log(v) - logp.mean()  # KL(U || p)
        if flat:
            assert sc == pytest.approx(want, rel=1e-9)
        else:
            assert 0 < sc < want  # the log of a mean exceeds the mean of the logs: a lower bound


def _c(x: float) -> Confidence:
    return Confidence(mean_logprob=-1 / x, deepconf=x, self_certainty=x / 2, tokens=5, lowest_group=x,
                      bottom10_group=x, tail=x)


# answers and DeepConf confidences of five candidates, used by hand below
ANS = ["positive", "positive", "negative", "negative", "positive"]
CONF = [_c(2.0), _c(1.0), _c(3.0), _c(0.5), _c(1.5)]
NONE = torch.zeros(5, 0)  # no head


def test_the_training_free_policies_by_hand():
    assert select(NONE, "confidence", confidence=CONF).order == [2, 0, 4, 1, 3]
    # DeepConf's filtered vote, bottom-10 % group score: all five kept (ceil 0.9 x 5): positive 4.5 > negative 3.5
    s = select(NONE, "deepconf_vote", ANS, confidence=CONF)
    assert s.order[0] == 0 and [(g["answer"], g["weight"]) for g in s.groups] == [("positive", 4.5), ("negative", 3.5)]
    # keep 0.4: the two most confident (3.0 negative, 2.0 positive) vote
    assert select(NONE, "deepconf_vote", ANS, confidence=CONF, rule=ConfidenceRule("bottom10_group", keep=0.4)).order[0] == 2
    # Borda on self-certainty: ranks 2, 0, 4, 1, 3 -> votes 5, 4, 3, 2, 1: positive 9 > negative 6; p = 3: 126 > 99
    s = select(NONE, "borda", ANS, confidence=CONF)
    assert s.order[0] == 0 and [g["weight"] for g in s.groups] == [9.0, 6.0]
    assert select(NONE, "borda", ANS, confidence=CONF, rule=ConfidenceRule("self_certainty", borda_p=3.0)).order[0] == 2
    # CISC on the mean log-prob (-1/c): T = 0.1 -> e^-3.33 beats e^-5 + e^-6.67 + e^-10; T = 10 -> near 3 vs 2
    assert select(NONE, "cisc", ANS, confidence=CONF).order[0] == 2
    assert select(NONE, "cisc", ANS, confidence=CONF, rule=ConfidenceRule("mean_logprob", temperature=10.0)).order[0] == 0
    # a candidate stopped early (None) neither votes nor is picked; unanswered ones come last
    s = select(NONE, "deepconf_vote", ["x", None, "y"], confidence=[_c(1.0), _c(9.0), None])
    assert s.order == [0, 2, 1] and [g["votes"] for g in s.groups] == [1, 0]
    with pytest.raises(ValueError, match="confidence"):
        select(NONE, "confidence")


def test_deepconf_vote_equals_the_reference_packages_filter_and_vote(deepconf_utils):
    dc = deepconf_utils
    g = np.random.default_rng(7)
    for _ in range(20):
        ans = [str(a) for a in g.integers(0, 3, 16)]
        confs = g.uniform(0.5, 5.0, 16).tolist()
        traces = [{"confs": [c] * 3, "extracted_answer": a} for a, c in zip(ans, confs)]
        kept = dc.filter_top_confidence(traces, "mean", 0.1)  # DeepConf-low: the top 10 % (numpy percentile)
        want = dc.weighted_majority_vote([t["extracted_answer"] for t in kept], [np.mean(t["confs"]) for t in kept])
        cc = [_c(c) for c in confs]
        got = select(torch.zeros(16, 0), "deepconf_vote", ans, confidence=cc, rule=ConfidenceRule("deepconf", keep=0.1))
        assert ans[got.order[0]] == want


def test_consensus_stopping_for_the_confidence_votes():
    rule = AdaptiveRule(supermajority=0.75)
    # 4.5 / 8.0 of the weight: not settled; once the negative answers are gone from the round, 4.5 / 4.5 is
    assert not settled(NONE, "deepconf_vote", ANS, rule, confidence=CONF)
    assert settled(torch.zeros(3, 0), "deepconf_vote", ["positive", "positive", "positive"], rule, confidence=CONF[:2] + [CONF[4]])
    assert settled(torch.zeros(2, 0), "confidence", None, AdaptiveRule(margin=0.5), confidence=[_c(3.0), _c(2.0)])
    assert not settled(torch.zeros(2, 0), "confidence", None, AdaptiveRule(margin=1.5), confidence=[_c(3.0), _c(2.0)])


# --- through the API, no head loaded ---------------------------------------------------------------------------
SCRIPT = [Scripted(t, (0.0, 0, 0, 0)) for t in ("positive", "positive!", "negative", "negative?", "positive.")]
TOKEN_CONF = {t: [c] * len(t) for t, c in zip((s.text for s in SCRIPT), (2.0, 1.0, 3.0, 0.5, 1.5))}
LABELS = {"extractor": "label_words", "labels": ["negative", "positive"]}


@pytest.fixture(scope="module")
def srv():
    engine = FakeEngine(SCRIPT, token_confidence=TOKEN_CONF)
    app = create_app(Settings(), engine=engine, heads=registry_with(), exit_on_engine_death=False)
    with ServerThread(app) as s:
        s.engine = engine
        yield s


def _post(srv, rerank, **kw):
    body = {"model": "fake-backbone", "messages": [{"role": "user", "content": "Sentiment?"}], "max_tokens": 32,
            "rerank": {"candidates": 5, "return_candidates": True, **rerank}, **kw}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=20)


@pytest.mark.parametrize("rerank, chosen", [
    ({"select": "confidence"}, 2),
    ({"select": "deepconf_vote", **LABELS}, 0),
    ({"select": "deepconf_vote", **LABELS, "confidence": {"keep": 0.4}}, 2),
    ({"select": "borda", **LABELS}, 0),
    ({"select": "borda", **LABELS, "confidence": {"borda_p": 3}}, 2),
    ({"select": "cisc", **LABELS}, 2),
    ({"select": "confidence", "confidence": {"score": "mean_logprob"}}, 2),
])
def test_api_training_free_policies_need_no_head(srv, rerank, chosen):
    r = _post(srv, rerank)
    assert r.status_code == 200, r.text
    info = r.json()["rerank"]
    assert info["chosen"] == [chosen] and info["heads"] == [] and info["rewards"] == []
    assert info["policy"] == rerank["select"]
    score = (rerank.get("confidence") or {}).get("score") or ConfidenceRule.default_score(rerank["select"])
    assert info["confidence"]["score"] == score
    cand = info["candidates"][2]
    assert cand["rewards"] == {} and cand["confidence"]["deepconf"] == pytest.approx(3.0)
    assert cand["confidence"]["mean_logprob"] == pytest.approx(-1 / 3) and cand["confidence"]["tokens"] == 8
    assert info["confidence"]["chosen"] == [pytest.approx(CONF[chosen].score(score))]


def test_api_online_stop_warms_up_then_stops_weak_candidates(srv):
    """Warm-up 0, 1 (lowest group confidences 2.0 and 1.0, window 2): threshold = the 10 % quantile, 1.1; then
    2 (3.0) and 4 (1.5) go on and 3 (0.5) stops after its first full window, 2 tokens."""
    r = _post(srv, {"select": "deepconf_vote", **LABELS, "confidence": {"window": 2, "online": {"warmup": 2}}})
    assert r.status_code == 200, r.text
    info = r.json()["rerank"]
    conf = info["confidence"]
    assert conf["threshold"] == pytest.approx(1.1) and conf["warmup"] == 2
    assert conf["stopped"] == 1 and conf["stopped_tokens"] == 2
    c3 = info["candidates"][3]
    assert c3["finish_reason"] == "pruned" and c3["completion_tokens"] == 2 and c3["text"] == "ne"
    assert info["chosen"] == [0]  # positive 2 + 1 + 1.5 against negative 3
    jobs = srv.engine.batches[-2:]
    assert [(j[0].n, j[0].first_index, j[0].confidence.stop_below) for j in jobs] == [(2, 0, None), (3, 2, pytest.approx(1.1))]


@pytest.mark.parametrize("rerank, param", [
    ({"select": "deepconf_vote"}, "rerank.extractor"),  # a vote needs answers
    ({"select": "confidence", "confidence": {"online": {"warmup": 5}}}, "rerank.confidence.online.warmup"),
    ({"select": "confidence", "adaptive": True, "confidence": {"online": {}}}, "rerank.confidence.online"),
    ({"select": "confidence", "prune": True}, "rerank.prune"),
    ({"select": "confidence", "confidence": {"score": "loud"}}, None),
])
def test_api_refuses_what_cannot_work(srv, rerank, param):
    r = _post(srv, rerank)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param
    r = _post(srv, {"select": "confidence", "confidence": {"online": {}}}, stream=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "rerank.confidence.online"


def test_api_adaptive_confidence_vote_stops_on_consensus(srv):
    # rounds of 2: 0, 1 both positive (2.0 + 1.0 of 3.0): settled at once under 0.75
    r = _post(srv, {"select": "deepconf_vote", **LABELS, "adaptive": {"round": 2}}).json()
    assert r["rerank"]["adaptive"]["stopped"] == "settled" and r["rerank"]["adaptive"]["candidates"] == 2
    assert r["rerank"]["chosen"] == [0]


def test_api_every_candidates_logprobs_when_asked(srv):
    r = _post(srv, {"select": "confidence"}, logprobs=True).json()
    cands = r["rerank"]["candidates"]
    # every candidate, not only the returned choice: one entry per token, -1 / c_t here (the fake's log-probs)
    for c, text in zip(cands, TOKEN_CONF):
        got = [e["logprob"] for e in c["logprobs"]["content"]]
        assert got == pytest.approx([-1 / x for x in TOKEN_CONF[text]]) and "".join(e["token"] for e in c["logprobs"]["content"]) == text
    assert r["choices"][0]["logprobs"]["content"] == cands[r["rerank"]["chosen"][0]]["logprobs"]["content"]
    r = _post(srv, {"select": "confidence"}).json()
    assert all("logprobs" not in c for c in r["rerank"]["candidates"])  # not asked: not sent


# --- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_hf_decode_loop_confidence_equals_a_teacher_forced_forward_and_stops_online(backbone):
    """Every candidate's confidence from the decode loop (full distribution, no extra forward) equals
    ``candidate_confidence``'s teacher-forced forward over the tokens it sampled (itself checked against numpy over
    the whole vocabulary in tests/test_confidence.py); an impossible threshold stops all but min_keep candidates at
    their first full window."""
    from arbiter.backbone import prompt_ids
    from arbiter.confidence import SCORE_NAMES, candidate_confidence
    from arbiter.generation.base import ConfidenceSpec, GenerationJob, SamplingParams
    from arbiter.generation.hf import HFEngine

    eng = HFEngine(backbone)
    p = prompt_ids(eng.tokenizer, [{"role": "user", "content": "Name a colour and say why you like it."}])
    job = GenerationJob(p, 4, SamplingParams(max_tokens=12, temperature=1.0, seed=5), confidence=ConfidenceSpec(window=4))
    (res,) = eng.generate([job])
    ref = candidate_confidence(eng.model, p, [c.token_ids for c in res.candidates], window=4)
    for c, want in zip(res.candidates, ref):
        assert c.confidence.tokens == len(c.token_ids) == want.tokens
        for name in SCORE_NAMES:
            got, exp = c.confidence.score(name), want.score(name)
            assert math.isfinite(got) and got == pytest.approx(exp, rel=0.02, abs=0.02), (name, got, exp)
    stop = GenerationJob(p, 4, SamplingParams(max_tokens=12, temperature=1.0, seed=5),
                         confidence=ConfidenceSpec(window=3, stop_below=math.inf, min_keep=1))
    (res,) = eng.generate([stop])
    pruned = [c for c in res.candidates if c.pruned]
    assert len(pruned) == 3 and all(c.pruned_at == 3 == len(c.token_ids) for c in pruned)
    assert sum(not c.pruned for c in res.candidates) == 1


def test_a_head_rule_may_be_a_training_free_policy_with_its_knobs():
    """What the verifier recipe writes when its head does not beat the best free rule: the policy with its score
    and kept share, validated at load, applied by the server when the request names the head (the request's own
    ``confidence`` fields win)."""
    from arbiter.heads import SelectionRule
    from arbiter.testing.fakes import linear_head

    with pytest.raises(ValueError, match="training-free"):
        SelectionRule(select="majority_vote", extractor="last_number", score="deepconf")
    with pytest.raises(ValueError):
        SelectionRule(select="confidence", score="loudness")
    module, cfg = linear_head("H", [1, 0, 0, 0])
    rule = SelectionRule(select="deepconf_vote", extractor="label_words", labels=["negative", "positive"],
                         score="deepconf", keep=0.4)
    engine = FakeEngine(SCRIPT, token_confidence=TOKEN_CONF)
    app = create_app(Settings(), engine=engine, heads=registry_with((module, cfg.model_copy(update={"selection": rule}))),
                     exit_on_engine_death=False)
    with ServerThread(app) as s:
        info = _post(s, {"heads": ["H"]}).json()["rerank"]
        # keep 0.4 of the head's rule: the two most confident vote (3.0 negative > 2.0 positive)
        assert info["rule"] == {"select": "deepconf_vote", "extractor": "label_words", "labels": ["negative", "positive"],
                                "score": "deepconf", "keep": 0.4, "source": "head"}
        assert info["chosen"] == [2] and info["heads"] == ["H"]
        info = _post(s, {"heads": ["H"], "confidence": {"keep": 1.0}}).json()["rerank"]
        assert info["rule"]["keep"] == 1.0 and info["chosen"] == [0]  # all five: positive 4.5 > negative 3.5


def test_the_recipe_falls_back_to_the_best_free_rule_on_dev(monkeypatch):
    """``fallback``: the head's dev pick must beat the best free rule (majority or a training-free rule, ties to the
    majority) by more than one paired SE, else the head's rule is that free rule (worked by hand on 8 dev questions)."""
    from types import SimpleNamespace

    from arbiter.training.recipes import verifier as R

    dev = list(range(8))
    rights = [[True, False]] * 4 + [[False, True]] * 4
    answers = [["a", "b"]] * 8
    rewards = [torch.tensor([1.0, 0.0])] * 8  # argmax picks candidate 0: right on the first 4
    data = SimpleNamespace(of=lambda split, v: [v[i] for i in dev], answers=answers, rights=rights,
                           questions=[None] * 8, samples=[None] * 8, backbone=None)
    free = {"conf_logprob": [True] * 6 + [False] * 2, "conf_cisc": [True] * 6 + [False] * 2}
    monkeypatch.setattr(R, "_confidence_right", lambda *a: {k: free.get(k, [False] * 8) for k, *_ in RULES})
    cfg = R.VerifierConfig()
    fb = R._fallback(cfg, data, "argmax", rewards, None, None)
    # argmax 4/8 against mean log-prob 6/8 (the first of the two best free rules): gain -0.25, no gain at all
    assert fb["free_rule"] == "conf_logprob" and fb["dev_free"] == 0.75 and fb["dev_accuracy"] == 0.5
    assert fb["gain"] == pytest.approx(-0.25)
    free.clear()
    rights[:] = [[True, False]] * 8  # argmax right everywhere; majority (a 1-1 tie to the better reward: a) too
    assert R._fallback(cfg, data, "argmax", rewards, None, None)["free_rule"] == "majority_vote"
    assert R._fallback(R.VerifierConfig(fallback=False), data, "argmax", rewards, None, None) is None


def test_an_empty_answer_has_no_confidence_and_is_never_the_most_confident():
    """A candidate that closes at once has no answer tokens: its scores are null in the API (JSON has no -inf) and
    the confidence argmax never picks it."""
    from arbiter.testing.served import served

    engine = FakeEngine([Scripted("", (0.0, 0, 0, 0)), Scripted("positive", (0.0, 0, 0, 0))],
                        token_confidence={"positive": [0.1] * 8})
    with served(engine, registry_with()) as s:
        info = _post(s, {"select": "confidence", "candidates": 2}).json()["rerank"]
    empty = info["candidates"][0]["confidence"]
    assert empty["tokens"] == 0 and all(empty[k] is None for k in empty if k != "tokens")
    assert info["chosen"] == [1]
